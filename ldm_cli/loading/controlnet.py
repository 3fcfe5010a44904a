"""Loading ControlNets (diffusers' ControlNetModel) as people download them, offline.

A diffusers folder brings its config. A single diffusers-layout file (most SDXL ControlNets: a
lone diffusion_pytorch_model.safetensors) does not: a ControlNet copies its base model's encoder,
so its config is the base UNet's, corrected by what the file's tensors show (the hint encoder's
widths, transformer depth per block, cross-attention width). Recognised from tensors, never names.
"""
from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import torch

from ldm_cli.errors import LdmError

HINT_KEY = "controlnet_cond_embedding.conv_in.weight"  # diffusers' layout
ORIGINAL_PREFIX = "control_model."  # lllyasviel's original layout
FILE_NAME = "diffusion_pytorch_model.safetensors"


def load(path: str, model):
    """The ControlNet at `path` (folder or file), checked against `model`, on its device and dtype."""
    from diffusers import ControlNetModel

    if getattr(model.denoiser.config, "cross_attention_dim", None) is None or not hasattr(model.denoiser, "down_blocks"):
        raise LdmError(f"--controlnet works with SD1, SD2 and SDXL models only (this one is {model.family.label})")
    folder = Path(path).expanduser()
    if folder.is_dir():
        config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").exists() else None
        if config is None:
            raise LdmError(f"--controlnet {path!r} is a folder without config.json (not a diffusers ControlNet)")
        check_fits(path, config, model)
        net = ControlNetModel.from_pretrained(folder, local_files_only=True)
    else:
        net = _from_file(path, model)
    return net.to(model.device, model.dtype).eval().requires_grad_(False)


def _from_file(path: str, model):
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    try:
        state = load_file(str(Path(path).expanduser()))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise LdmError(f"--controlnet {path!r} is not a readable safetensors file ({e})") from None
    if HINT_KEY not in state:
        kind = "an original-layout (control_model.*) ControlNet, not supported yet" \
            if any(k.startswith(ORIGINAL_PREFIX) for k in state) else "not a ControlNet"
        raise LdmError(f"--controlnet {path!r} is {kind}; give a diffusers ControlNet folder or file")
    config = config_for(state, model.denoiser.config)
    check_fits(path, config, model)
    net = ControlNetModel.from_config(config)
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else str(e)
        raise LdmError(f"--controlnet {path!r} does not fit this model's ControlNet layout ({first})") from None
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
    """Load each unit's ControlNet onto `model` (model.controls), recording its name and hashes;
    a control image that no longer matches its recorded hash (--from-png) is refused."""
    model.controls = [(_recorded(unit), load(unit.controlnet, model)) for unit in units]


def _recorded(unit):
    """The unit with its ControlNet's name and short hash and its control image's hash."""
    from dataclasses import replace

    from ldm_cli import hashing

    path = Path(unit.controlnet).expanduser()
    weights = path / FILE_NAME if path.is_dir() else path
    # a folder, or a lone diffusers file, is known by its folder's name; any other file by its own
    name = path.name if path.is_dir() else path.parent.name if path.name == FILE_NAME else path.stem
    image_hash = hashing.sha256_file(Path(unit.image).expanduser())[:10]
    if unit.image_hash and unit.image_hash != image_hash:
        raise LdmError(f"the control image {unit.image!r} has changed since it was recorded (hash {image_hash}, "
                       f"recorded {unit.image_hash}); give --control-image again")
    model_hash = hashing.sha256_file(weights)[:8] if weights.exists() else None
    return replace(unit, model_name=name, model_hash=model_hash, image_hash=image_hash)
