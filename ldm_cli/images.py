"""Writing PNGs safely: metadata in, never overwrite, never leave half a file."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from PIL import Image, PngImagePlugin

from ldm_cli.errors import LdmError

_NUMBERED = re.compile(r"^(\d{5,})-")


def check_writable(folder: Path) -> None:
    """Fail before any work if images could not be saved in `folder`."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=folder, prefix=".ldm-probe-", delete=True)
        probe.close()
    except OSError as e:
        raise LdmError(f"cannot write to output folder {str(folder)!r} ({e.strerror or e}); choose another with --out") from None


def _next_number(folder: Path) -> int:
    numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := _NUMBERED.match(name))]
    return max(numbers, default=-1) + 1


def png_info(text_chunks: dict[str, str]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in text_chunks.items():
        info.add_text(key, value)
    return info


def save_png(image: Image.Image, folder: Path, stem: str, text_chunks: dict[str, str]) -> Path:
    """Save as `NNNNN-<stem>.png`, numbered after what the folder holds.

    The image goes to a hidden temporary file first and is then hard-linked to its final name;
    a link never replaces an existing file, so two runs sharing a folder cannot overwrite each
    other, and an interrupted run leaves no partial PNG under a real name.
    """
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".ldm-", suffix=".png.part")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=png_info(text_chunks))
            f.flush()
            os.fsync(f.fileno())
        number = _next_number(folder)
        while True:
            final = folder / f"{number:05d}-{stem}.png"
            try:
                os.link(tmp, final)
                return final
            except FileExistsError:
                number += 1
    finally:
        os.unlink(tmp)


def read_text_chunks(path: Path) -> dict[str, str]:
    """The PNG's text chunks; a clear error for anything that is not a readable image."""
    try:
        with Image.open(path) as im:
            im.load()
            return {k: v for k, v in getattr(im, "text", {}).items() if isinstance(v, str)}
    except FileNotFoundError:
        raise LdmError(f"no such file: {str(path)!r}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise LdmError(f"{str(path)!r} is not a readable image ({e})") from None
