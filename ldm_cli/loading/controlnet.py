"""Loading ControlNets (diffusers' ControlNetModel) as people download them, offline.

A diffusers folder brings its config. A single diffusers-layout file (most SDXL ControlNets: a
lone diffusion_pytorch_model.safetensors) does not: a ControlNet copies its base model's encoder,
so its config is the base UNet's, corrected by what the file's tensors show (the hint encoder's
widths, transformer depth per block, cross-attention width). Recognised from tensors, never names.
"""
from __future__ import annotations

import functools
import inspect
import json
import re
from pathlib import Path

import torch

from ldm_cli.errors import LdmError
from ldm_cli.loading import controlnet_files
from ldm_cli.loading.detect import CONTROLNET_HINT as HINT_KEY
from ldm_cli.loading.detect import FLUX_CONTROLNET_KEY
from ldm_cli.loading.detect import ORIGINAL_CONTROLNET_HINT as ORIGINAL_HINT
from ldm_cli.loading.detect import ORIGINAL_CONTROLNET_PREFIX as ORIGINAL_PREFIX

FILE_NAME = "diffusion_pytorch_model.safetensors"


def load(path: str, model):
    """The ControlNet at `path` (folder or file), checked against `model`, on its device and dtype."""
    from diffusers import ControlNetModel

    folder = Path(path).expanduser()
    config = folder_config(path, folder) if folder.is_dir() else None
    if model.family.name == "flux":
        from ldm_cli.loading import flux_controlnet

        return flux_controlnet.load(path, model, config)
    if model.family.name == "sd3":
        from ldm_cli.loading import sd3_controlnet

        return sd3_controlnet.load(path, model, config)
    if model.family.name == "zimage":
        from ldm_cli.loading import zimage_controlnet

        return zimage_controlnet.load(path, model, config)
    if model.family.name == "qwen-image":
        from ldm_cli.loading import qwen_image_controlnet

        return qwen_image_controlnet.load(path, model, config)
    if model.family.control_residuals is None:
        raise LdmError(f"--controlnet works with SD1, SD2, SDXL, SD3, FLUX, Z-Image and Qwen-Image models (this one "
                       f"is {model.family.label})")
    if config is not None:
        if config.get("_class_name") in ("FluxControlNetModel", "SD3ControlNetModel"):
            kind = "a FLUX" if config["_class_name"].startswith("Flux") else "an SD3"
            raise LdmError(f"--controlnet {path!r} is {kind} ControlNet; this model is {model.family.label}")
        check_fits(path, config, model)
        net = ControlNetModel.from_pretrained(folder, local_files_only=True)
    else:
        net = _from_file(path, model)
    return net.to(model.device, model.dtype).eval().requires_grad_(False)


def folder_config(path: str, folder: Path) -> dict:
    """A diffusers ControlNet folder's config.json, whatever the family."""
    if not (folder / "config.json").exists():
        raise LdmError(f"--controlnet {path!r} is a folder without config.json (not a diffusers ControlNet)")
    return json.loads((folder / "config.json").read_text())


def _from_file(path: str, model):
    from diffusers import ControlNetModel

    state = {k.removeprefix(ORIGINAL_PREFIX): v for k, v in controlnet_files.read(path).items()}
    if ORIGINAL_HINT in state:
        state = from_original(state, model.denoiser.config)
    if FLUX_CONTROLNET_KEY in state:
        raise LdmError(f"--controlnet {path!r} is a FLUX ControlNet; this model is {model.family.label}")
    if HINT_KEY not in state:
        raise LdmError(f"--controlnet {path!r} is not a ControlNet; give a ControlNet folder or .safetensors file")
    config = config_for(state, model.denoiser.config)
    check_fits(path, config, model)
    net = controlnet_files.filled(ControlNetModel.from_config(config), state, path, "this model's ControlNet layout")
    return net


def config_for(state: dict[str, torch.Tensor], unet_config) -> dict:
    """A ControlNetModel config for the tensors `state`: the base UNet's, as the file shows it."""
    from diffusers import ControlNetModel

    accepted = set(inspect.signature(ControlNetModel.__init__).parameters)
    config = {k: v for k, v in dict(unet_config).items() if k in accepted}
    config["in_channels"] = state["conv_in.weight"].shape[1]
    blocks = sorted({int(m.group(1)) for k in state if (m := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.", k))})
    widths = [state[f"controlnet_cond_embedding.blocks.{b}.weight"].shape[0] for b in blocks if b % 2 == 1]
    config["conditioning_embedding_out_channels"] = [state[HINT_KEY].shape[0], *widths]
    cross = next((v.shape[1] for k, v in state.items() if k.endswith("attn2.to_k.weight")), None)
    if cross is not None:
        config["cross_attention_dim"] = cross
    depth = [len({m.group(1) for k in state if (m := re.match(rf"down_blocks\.{i}\.attentions\.0\.transformer_blocks\.(\d+)\.", k))})
             for i in range(len(config["down_block_types"]))]
    config["transformer_layers_per_block"] = [d or 1 for d in depth]
    _pooled_input(config, state)
    return config


def _pooled_input(config: dict, state: dict[str, torch.Tensor]) -> None:
    """SDXL's pooled-text and size input, as the file has it or not (whatever the base has)."""
    added = state.get("add_embedding.linear_1.weight")
    if added is None:
        config.update(addition_embed_type=None, projection_class_embeddings_input_dim=None)
    else:
        config.update(addition_embed_type="text_time", projection_class_embeddings_input_dim=added.shape[1])


def check_fits(path: str, config: dict, model) -> None:
    """A ControlNet made for another family or text width cannot steer this model."""
    theirs, ours = config.get("cross_attention_dim"), model.denoiser.config.cross_attention_dim
    their_xl = config.get("addition_embed_type") == "text_time"
    our_xl = model.denoiser.config.get("addition_embed_type") == "text_time"
    if theirs != ours or their_xl != our_xl:
        kind = "SDXL" if their_xl else "SD1/SD2"
        raise LdmError(f"--controlnet {path!r} is for {kind} models with cross-attention width {theirs}; "
                       f"this {model.family.label} model has width {ours}")


def attach(model, units: list) -> None:
    """Put the units' ControlNets on `model` (model.controls), each file loaded once per model."""
    for unit in units:
        if unit.controlnet not in model.controlnets:
            model.controlnets[unit.controlnet] = load(unit.controlnet, model)
        check_mode(unit, model.controlnets[unit.controlnet])
    model.controls = [(unit, model.controlnets[unit.controlnet]) for unit in units]


def check_mode(unit, net) -> None:
    """A union ControlNet (one net, several control types) needs its unit's --control-mode; no other takes one."""
    from ldm_cli.control_units import UNION_MODES

    modes = getattr(net.config, "num_mode", None)
    if modes is None and unit.mode is not None:
        raise LdmError(f"--control-mode is for union ControlNets; {unit.controlnet!r} is not one")
    if modes is not None and (unit.mode is None or unit.mode >= modes):
        names = ", ".join(UNION_MODES[:modes])
        raise LdmError(f"{unit.controlnet!r} is a union ControlNet of {modes} control types: give --control-mode "
                       f"({names}, or a number below {modes})" + ("" if unit.mode is None else f" (got {unit.mode})"))


def recorded(unit):
    """The unit with its ControlNet's name and short hash and its control image's hash."""
    from dataclasses import replace

    from ldm_cli import files, hashing

    path = files.user_path(unit.controlnet)
    weights = path / FILE_NAME if path.is_dir() else path
    # a folder, or a lone diffusers file, is known by its folder's name; any other file by its own
    name = path.name if path.is_dir() else path.parent.name if path.name == FILE_NAME else path.stem
    image_hash = hashing.sha256_file(files.user_path(unit.image))[:10]
    if unit.image_hash and unit.image_hash != image_hash:
        raise LdmError(f"the control image {unit.image!r} has changed since it was recorded (hash {image_hash}, "
                       f"recorded {unit.image_hash}); give --control-image again")
    model_hash = _short_hash(weights) if weights.exists() else None
    return replace(unit, model_name=name, model_hash=model_hash, image_hash=image_hash)


@functools.lru_cache(maxsize=64)
def _short_hash(weights: Path) -> str:
    """sd-webui-controlnet's 8 hex digits; once per file in a run (a batch names it on every line)."""
    from ldm_cli import hashing

    return hashing.sha256_file(weights)[:8]


def from_original(state: dict[str, torch.Tensor], unet_config) -> dict[str, torch.Tensor]:
    """lllyasviel's layout in diffusers' names: the encoder copy is named as the UNet's input and
    middle blocks (keymap.UNetNames), plus the hint encoder, zero convs and middle-block output.
    A tensor with no place is left under its own name, so the strict load names it."""
    from diffusers import ControlNetModel

    from ldm_cli.loading.keymap import UNetNames

    hints = sorted({int(k.split(".")[1]) for k in state if k.startswith("input_hint_block.")})
    config = {k: v for k, v in dict(unet_config).items() if k in inspect.signature(ControlNetModel.__init__).parameters}
    config["conditioning_embedding_out_channels"] = [state[f"input_hint_block.{hints[i]}.weight"].shape[0]
                                                     for i in range(0, len(hints) - 1, 2)]
    names, out = UNetNames(dict(unet_config)), dict(state)
    special = {"controlnet_cond_embedding.conv_in": f"input_hint_block.{hints[0]}",
               "controlnet_cond_embedding.conv_out": f"input_hint_block.{hints[-1]}",
               "controlnet_mid_block": "middle_block_out.0",
               **{f"controlnet_cond_embedding.blocks.{i}": f"input_hint_block.{h}" for i, h in enumerate(hints[1:-1])},
               **{f"controlnet_down_blocks.{k.split('.')[1]}": f"zero_convs.{k.split('.')[1]}.0"
                  for k in state if k.startswith("zero_convs.")}}
    with torch.device("meta"):
        keys = ControlNetModel.from_config({**config, **_original_shape(state, config, names)}).state_dict()
    for key in keys:
        module, _, leaf = key.rpartition(".")
        original = f"{special[module]}.{leaf}" if module in special else _unet_name(names, key)
        if original in out:
            out[key] = out.pop(original)
    return out


def _unet_name(names, key: str) -> str | None:
    try:
        return names.origin(key).key
    except LdmError:
        return None


def _original_shape(state: dict[str, torch.Tensor], config: dict, names) -> dict:
    """What the base UNet's config may get wrong for an original file: SDXL's extra inputs and the
    transformer depth, read from the input blocks (each level's first block)."""
    shape, depth = {}, []
    for level in range(len(config["down_block_types"])):
        prefix = f"input_blocks.{names.down(level, 0)}.1.transformer_blocks."
        depth.append(len({k[len(prefix):].split(".")[0] for k in state if k.startswith(prefix)}) or 1)
    shape["transformer_layers_per_block"] = depth
    if "label_emb.0.0.weight" not in state:
        shape.update(addition_embed_type=None, projection_class_embeddings_input_dim=None)
    return shape
