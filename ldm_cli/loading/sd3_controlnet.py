"""SD3 ControlNets (diffusers' SD3ControlNetModel) from diffusers folders, offline.

InstantX's SD3 nets and Stability's SD3.5 ones ship as folders; a folder's config says what the
tensors cannot (whether the net was trained with the pooled text zeroed and the latents
unshifted, InstantX's way), so a lone weights file is refused with that reason.
"""
from __future__ import annotations

from pathlib import Path

from ldm_cli.errors import LdmError
from ldm_cli.loading import controlnet_files

CLASS = "SD3ControlNetModel"


def load(path: str, model, config: dict | None):
    """The SD3 ControlNet in the folder `path` (`config`: its config.json; None: not a folder),
    checked against `model`'s transformer."""
    from diffusers import SD3ControlNetModel

    config = controlnet_files.folder_config(path, config, CLASS, "an SD3 ControlNet",
                                            "how it reads the pooled text and the latents")
    check_fits(path, config, model)
    net = SD3ControlNetModel.from_pretrained(Path(path).expanduser(), local_files_only=True)
    return net.to(model.device, model.dtype).eval().requires_grad_(False)


def check_fits(path: str, config: dict, model) -> None:
    ours = model.denoiser.config
    inner, our_inner = (config.get("num_attention_heads", 0) * config.get("attention_head_dim", 0),
                        ours.num_attention_heads * ours.attention_head_dim)
    if inner != our_inner or config.get("in_channels") != ours.in_channels:
        raise LdmError(f"--controlnet {path!r} is for an SD3 model of width {inner}; this one is {our_inner} wide")
