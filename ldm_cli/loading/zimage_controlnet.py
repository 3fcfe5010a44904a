"""Z-Image ControlNets (diffusers' ZImageControlNetModel: alibaba-pai's Fun ControlNet Union) from
diffusers folders, offline.

The net borrows the transformer's embedders, refiners and pad tokens (ZImageControlNetPipeline's
from_transformer), so its width and heads must be the model's. Which transformer layers take
its samples (control_layers_places) is in its config, not its tensors: a lone weights file is
refused with that reason.
"""
from __future__ import annotations

from pathlib import Path

from ldm_cli.errors import LdmError
from ldm_cli.loading import controlnet_files

CLASS = "ZImageControlNetModel"


def load(path: str, model, config: dict | None):
    """The Z-Image ControlNet in the folder `path` (`config`: its config.json; None: not a folder),
    joined to `model`'s transformer."""
    from diffusers import ZImageControlNetModel

    config = controlnet_files.folder_config(path, config, CLASS, "a Z-Image ControlNet", "the transformer layers it steers")
    ours = model.denoiser.config
    if (config.get("dim"), config.get("n_heads")) != (ours.dim, ours.n_heads):
        raise LdmError(f"--controlnet {path!r} is for a Z-Image model {config.get('dim')} wide with "
                       f"{config.get('n_heads')} heads; this one is {ours.dim} wide with {ours.n_heads}")
    net = ZImageControlNetModel.from_pretrained(Path(path).expanduser(), local_files_only=True)
    net = ZImageControlNetModel.from_transformer(net, model.denoiser)
    return net.to(model.device, model.dtype).eval().requires_grad_(False)
