"""Load a model from wherever it lives: the built-in file, a single-file checkpoint, or a
diffusers-layout folder. Nothing here ever reaches the network."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ldm_cli.errors import LdmError

BUILTIN = Path(__file__).resolve().parent.parent / "assets" / "builtin.safetensors"


@dataclass
class LoadOptions:
    vae: str | None = None  # a separate VAE file or folder replacing the model's own
    config: str | None = None  # a diffusers-layout folder describing a non-standard checkpoint
    prediction: str | None = None  # "epsilon" or "v", overriding what the model says
    allow_pickle: bool = False
    device: str = "auto"
    dtype: str = "auto"


def load(source: str | None, options: LoadOptions | None = None):
    """A ready-to-run `Model` on the chosen device and dtype."""
    from ldm_cli import device as devices

    options = options or LoadOptions()
    path = Path(source).expanduser() if source else BUILTIN
    if options.prediction not in (None, "epsilon", "v"):
        raise LdmError(f"unknown --prediction {options.prediction!r}; choose epsilon or v")
    if not path.exists():
        raise LdmError(f"model not found: {str(path)!r}; pass a .safetensors file or a diffusers folder with --model")
    device = devices.pick_device(options.device)
    if path.is_dir():
        from ldm_cli.loading import folder

        quiet_libraries()
        model = folder.load_folder(path, device, options)
    else:  # quiets the libraries itself, once its reading is under way
        from ldm_cli.loading import single_file

        model = single_file.load_single_file(path, device, options)
    if source is None:
        model.name = "ldm-builtin"
    return model


def quiet_libraries() -> None:
    """diffusers and transformers draw their own loading bars; ldm draws one bar, its own."""
    import diffusers
    import transformers

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    diffusers.utils.logging.set_verbosity_error()
    transformers.utils.logging.set_verbosity_error()
