"""FLUX ControlNets (diffusers' FluxControlNetModel) as people download them, offline.

InstantX's and Shakker's ship diffusers folders; a lone file in diffusers' names works too: a
FLUX ControlNet is a few of its transformer's blocks, so its config is the transformer's with the
depths, the guidance embedding, the union modes and any hint encoder the file's tensors show.
XLabs' own layout (BFL's block names) is not read: it is refused in one line.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ldm_cli.errors import LdmError
from ldm_cli.loading import controlnet_files
from ldm_cli.loading.detect import CONTROLNET_HINT, FLUX_CONTROLNET_KEY, ORIGINAL_CONTROLNET_PREFIX

XLABS_KEYS = ("double_blocks.0.img_attn.qkv.weight", "controlnet_blocks.0.weight")


def load(path: str, model, config: dict | None):
    """The FLUX ControlNet at `path`, checked against `model`'s transformer; `config`: its
    folder's config.json (None: a lone file, whose config is read from its tensors)."""
    from diffusers import FluxControlNetModel

    if config is not None:
        _check_class(path, config)
        check_fits(path, config, model, _width(config))
        net = FluxControlNetModel.from_pretrained(Path(path).expanduser(), local_files_only=True)
    else:
        state = _read(path)
        config = config_for(state, model.denoiser.config)
        check_fits(path, config, model, state["x_embedder.weight"].shape[0])
        net = controlnet_files.filled(FluxControlNetModel.from_config(config), state, path, "a FLUX ControlNet's layout")
    return net.to(model.device, model.dtype).eval().requires_grad_(False)


def _check_class(path: str, config: dict) -> None:
    if config.get("_class_name") != "FluxControlNetModel":
        raise LdmError(f"--controlnet {path!r} holds a {config.get('_class_name')!r}, not a FLUX ControlNet "
                       "(FluxControlNetModel)")


def _width(config: dict) -> int:
    return config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)


def _read(path: str) -> dict[str, torch.Tensor]:
    state = controlnet_files.read(path)
    if FLUX_CONTROLNET_KEY in state:
        return state
    if all(k in state for k in XLABS_KEYS):
        raise LdmError(f"--controlnet {path!r} is in XLabs' own layout, which ldm does not read yet; use a "
                       "diffusers-format FLUX ControlNet (InstantX's, Shakker's)")
    if CONTROLNET_HINT in state or any(k.startswith(ORIGINAL_CONTROLNET_PREFIX) for k in state):
        raise LdmError(f"--controlnet {path!r} is a ControlNet for SD1, SD2 or SDXL, not for FLUX")
    raise LdmError(f"--controlnet {path!r} is not a ControlNet; give a ControlNet folder or .safetensors file")


def config_for(state: dict[str, torch.Tensor], transformer_config) -> dict:
    """A FluxControlNetModel config for the tensors `state`: the transformer's, as the file shows it."""
    import inspect

    from diffusers import FluxControlNetModel

    accepted = set(inspect.signature(FluxControlNetModel.__init__).parameters)
    config = {k: v for k, v in dict(transformer_config).items() if k in accepted}

    def count(prefix: str) -> int:
        return len({m.group(1) for k in state if (m := re.match(rf"{prefix}\.(\d+)\.", k))})

    config.update(num_layers=count("transformer_blocks"), num_single_layers=count("single_transformer_blocks"),
                  in_channels=state["x_embedder.weight"].shape[1],
                  joint_attention_dim=state["context_embedder.weight"].shape[1],
                  pooled_projection_dim=state["time_text_embed.text_embedder.linear_1.weight"].shape[1],
                  guidance_embeds="time_text_embed.guidance_embedder.linear_1.weight" in state)
    if "controlnet_mode_embedder.weight" in state:
        config["num_mode"] = state["controlnet_mode_embedder.weight"].shape[0]
    if "input_hint_block.0.weight" in state:
        config["conditioning_embedding_channels"] = state["input_hint_block.0.weight"].shape[0]
    return config


def check_fits(path: str, config: dict, model, inner: int) -> None:
    """A ControlNet of another width (`inner`), text width or guidance than the model's cannot steer it."""
    ours = model.denoiser.config
    if (inner, config.get("joint_attention_dim")) != (ours.num_attention_heads * ours.attention_head_dim,
                                                      ours.joint_attention_dim):
        raise LdmError(f"--controlnet {path!r} is for a FLUX model of width {inner}; this one is "
                       f"{ours.num_attention_heads * ours.attention_head_dim} wide")
    if config.get("guidance_embeds") and not ours.guidance_embeds:
        raise LdmError(f"--controlnet {path!r} takes FLUX dev's distilled guidance; this model (schnell) has none")
