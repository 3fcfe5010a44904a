"""What every ControlNet loader (SD's, FLUX's, Qwen-Image's) does with a lone weights file: read
it whole, and fill a net built from its config strictly; and what the folder-only ones (SD3's,
Z-Image's) ask of a folder's config. Each failure one line naming the file."""
from __future__ import annotations

from pathlib import Path

from ldm_cli.errors import LdmError


def read(path: str) -> dict:
    """Every tensor of the safetensors file at `path` (--controlnet's)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(Path(path).expanduser()))
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's to fix
        raise LdmError(f"--controlnet {path!r} is not a readable safetensors file ({e})") from None


def filled(net, state: dict, path: str, layout: str):
    """`net` with exactly `state`'s weights; `layout` names what a mismatch does not fit."""
    try:
        net.load_state_dict(state, strict=True)
    except RuntimeError as e:
        lines = str(e).splitlines()
        first = (lines[1] if len(lines) > 1 else lines[0]).strip()  # torch's first named mismatch
        raise LdmError(f"--controlnet {path!r} does not fit {layout} ({first})") from None
    return net


def folder_config(path: str, config: dict | None, cls: str, what: str, why: str) -> dict:
    """The config of `what` (diffusers' `cls`), a net that loads from its folder only (`config`:
    its config.json; None: `path` is not a folder); `why`: what only that config says."""
    if config is None:
        raise LdmError(f"--controlnet {path!r}: {what} loads from its folder (config.json beside its weights), "
                       f"which says {why}")
    if config.get("_class_name") != cls:
        raise LdmError(f"--controlnet {path!r} holds a {config.get('_class_name')!r}, not {what} ({cls})")
    return config
