"""--vae: a VAE replacing the model's own, from a diffusers VAE folder or a single file in the
original or diffusers layout. components.py tells from a file's header where its weights lie and
that its latent channels fit the model; this reads them."""
from __future__ import annotations

from pathlib import Path

import torch

from ldm_cli.errors import LdmError
from ldm_cli.loading import components, convert, plan, recipe
from ldm_cli.loading.prefetch import Prefetch
from ldm_cli.loading.recipe import read_json


def load_vae(path: Path, dtype, config: dict | None = None, allow_pickle: bool = False):
    """A VAE replacing a model's own: a diffusers VAE folder, or a single file in the original or
    diffusers layout. A single file has no config: `config` (the replaced VAE's, whose latent
    scaling the model was trained with) describes it, else SD's."""
    path = Path(path).expanduser()
    config = config or read_json(recipe.config_file(recipe.SHIPPED / "sd1", "vae"))
    if path.is_dir():
        vae = vae_folder(path, dtype, config.get("_class_name", "AutoencoderKL"))
        components.check_channels(path.name, vae.config.get("latent_channels", vae.config.get("z_dim")), config)
        return vae
    checkpoint, slot = components.vae_file(path, config, allow_pickle)
    module = convert.empty("vae", config)
    planned = plan.for_module(slot, module, checkpoint)
    with Prefetch(checkpoint, [slot.prefix], dtype, torch.device("cpu")) as reading:
        return convert.fill(module, planned, reading.result())


def vae_folder(path: Path, dtype, wanted: str):
    """A diffusers VAE folder holding the class the model's VAE is (`wanted`: Qwen-Image's is not
    an AutoencoderKL, nor FLUX.2's)."""
    import diffusers

    subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
    if subfolder is None and not (path / "config.json").is_file():
        raise LdmError(f"--vae {str(path)!r} is a folder without config.json (or vae/config.json); pass a diffusers VAE folder")
    if wanted not in convert.VAES:
        raise LdmError(f"this model's VAE config describes a {wanted}; ldm runs {', '.join(convert.VAES)}")
    held = read_json(path / (subfolder or "") / "config.json").get("_class_name", "AutoencoderKL")
    if held != wanted:
        raise LdmError(f"--vae {str(path)!r} holds a {held}, but this model's VAE is a {wanted}; pass a VAE of the "
                       "model's own family")
    try:
        return getattr(diffusers, wanted).from_pretrained(path, subfolder=subfolder, torch_dtype=dtype,
                                                         local_files_only=True)
    except (OSError, ValueError) as e:
        raise LdmError(f"--vae {str(path)!r}: cannot load it ({str(e).splitlines()[0]})") from None
