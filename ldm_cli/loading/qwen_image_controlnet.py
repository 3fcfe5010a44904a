"""Qwen-Image ControlNets (diffusers' QwenImageControlNetModel: InstantX's Union and the like)
from diffusers folders or a lone file in diffusers' names, offline.

A Qwen-Image ControlNet is a few of its transformer's blocks plus a zeroed input projection for
the control latents, so a lone file's config is the transformer's with the depth, width and
input channels its tensors show. The inpainting kind (extra input channels for a mask) needs
the mask ldm does not give it: refused in one line.
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from ldm_cli.errors import LdmError
from ldm_cli.loading import controlnet_files
from ldm_cli.loading.detect import FLUX_CONTROLNET_KEY

CLASS = "QwenImageControlNetModel"
BLOCK_KEY = "transformer_blocks.0.attn.to_q.weight"  # beside FLUX's input key: told from a FLUX net


def load(path: str, model, config: dict | None):
    """The Qwen-Image ControlNet at `path`, checked against `model`'s transformer; `config`: its
    folder's config.json (None: a lone file, whose config is read from its tensors)."""
    from diffusers import QwenImageControlNetModel

    if config is not None:
        if config.get("_class_name") != CLASS:
            raise LdmError(f"--controlnet {path!r} holds a {config.get('_class_name')!r}, not a Qwen-Image "
                           f"ControlNet ({CLASS})")
        check_fits(path, config, model)
        net = QwenImageControlNetModel.from_pretrained(Path(path).expanduser(), local_files_only=True)
    else:
        state = _read(path)
        config = config_for(state, model.denoiser.config)
        check_fits(path, config, model)
        net = controlnet_files.filled(QwenImageControlNetModel.from_config(config), state, path, "a Qwen-Image ControlNet's layout")
    return net.to(model.device, model.dtype).eval().requires_grad_(False)


def _read(path: str) -> dict[str, torch.Tensor]:
    state = controlnet_files.read(path)
    if FLUX_CONTROLNET_KEY not in state or BLOCK_KEY not in state:
        raise LdmError(f"--controlnet {path!r} is not a Qwen-Image ControlNet in diffusers' names")
    return state


def config_for(state: dict[str, torch.Tensor], transformer_config) -> dict:
    """A QwenImageControlNetModel config for the tensors `state`: the transformer's, as the file shows it."""
    import inspect

    from diffusers import QwenImageControlNetModel

    accepted = set(inspect.signature(QwenImageControlNetModel.__init__).parameters)
    config = {k: v for k, v in dict(transformer_config).items() if k in accepted}
    width, in_channels = state["img_in.weight"].shape
    head = state["transformer_blocks.0.attn.norm_q.weight"].shape[0]
    layers = len({m[1] for k in state if (m := re.match(r"transformer_blocks\.(\d+)\.", k))})
    config.update(num_layers=layers, in_channels=in_channels, attention_head_dim=head,
                  num_attention_heads=width // head, joint_attention_dim=state["txt_in.weight"].shape[1],
                  extra_condition_channels=state[FLUX_CONTROLNET_KEY].shape[1] - in_channels)
    return config


def check_fits(path: str, config: dict, model) -> None:
    """A net of another width or text width cannot steer the model; the inpainting kind is not run."""
    ours = model.denoiser.config
    inner = config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0)
    our_inner = ours.num_attention_heads * ours.attention_head_dim
    if (inner, config.get("joint_attention_dim")) != (our_inner, ours.joint_attention_dim):
        raise LdmError(f"--controlnet {path!r} is for a Qwen-Image model of width {inner}; this one is {our_inner} wide")
    if config.get("extra_condition_channels", 0):
        raise LdmError(f"--controlnet {path!r} is an inpainting ControlNet (it reads a mask beside the image), "
                       "which ldm does not run")
