"""Images in and out: pictures and masks read upright and in 8 bits (image_modes); PNGs written
safely: metadata in, never overwrite, never leave half a file."""
from __future__ import annotations

import errno
import io
import math
import os
import re
import tempfile
import time
import uuid
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from PIL import ExifTags, Image, ImageOps, PngImagePlugin

from ldm_cli import files, image_modes, limits
from ldm_cli.errors import LdmError

_NUMBERED = re.compile(r"^(\d{5,})-")


def check_writable(folder: Path) -> None:
    """Fail before any work if images could not be saved in `folder`. Nothing is created: the
    folder is made when the first image is saved, so a failed run leaves no empty folder."""
    existing = _nearest_existing(folder)
    if existing.is_symlink() and not existing.exists():  # mkdir would fail on it after the render
        raise LdmError(f"cannot write to output folder {str(folder)!r} ({str(existing)!r} is a symbolic link to "
                       f"{os.readlink(existing)!r}, which does not exist); choose another with --out")
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR))
        probe = tempfile.NamedTemporaryFile(dir=existing, prefix=".ldm-probe-", delete=True)
        probe.close()
    except OSError as e:
        raise LdmError(f"cannot write to output folder {str(folder)!r} ({e.strerror or e}); choose another with --out") from None


def _nearest_existing(path: Path) -> Path:
    """`path`, or its closest ancestor that exists (a link that leads nowhere counts)."""
    path = path.absolute()
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _next_number(folder: Path) -> int:
    numbers = [int(m.group(1)) for name in os.listdir(folder) if (m := _NUMBERED.match(name))]
    return max(numbers, default=-1) + 1


def png_info(text_chunks: dict[str, str]) -> PngImagePlugin.PngInfo:
    info = PngImagePlugin.PngInfo()
    for key, value in text_chunks.items():
        info.add_text(key, value)
    return info


def png_bytes(image: Image.Image, text_chunks: dict[str, str]) -> bytes:
    """The PNG save_png writes, in memory."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_info(text_chunks))
    return buffer.getvalue()


def _write_temporary(image: Image.Image, folder: Path, text_chunks: dict[str, str]) -> str:
    """The PNG, complete and synced, under a hidden name in `folder`; the caller moves it into place."""
    # os.open honours the umask, so the PNG gets the user's usual permissions (mkstemp's are 0600)
    tmp = str(folder / f".ldm-{uuid.uuid4().hex}.png.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=png_info(text_chunks))
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def save_png(image: Image.Image, folder: Path, stem: str, text_chunks: dict[str, str]) -> Path:
    """Save as `NNNNN-<stem>.png`, numbered after what the folder holds.

    The image goes to a hidden temporary file first and is then hard-linked to its final name;
    a link never replaces an existing file, so two runs sharing a folder cannot overwrite each
    other, and an interrupted run leaves no partial PNG under a real name. The folder is made
    here, with the first image. Neither step follows a link planted in the folder: the temporary
    is created exclusively (O_EXCL) and a link's name is taken, so the next number is used. A
    write that fails (a full disk, a folder made read-only) is one line; the images saved
    before are kept.
    """
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = _write_temporary(image, folder, text_chunks)
        try:
            return _linked(tmp, folder, stem)
        finally:
            os.unlink(tmp)
    except OSError as e:
        raise LdmError(f"cannot save an image in {str(folder)!r} ({e.strerror or e}); the images saved before "
                       "it are kept") from None


def _linked(tmp: str, folder: Path, stem: str) -> Path:
    """`tmp` hard-linked under the first free `NNNNN-<stem>.png` name."""
    number = _next_number(folder)
    while True:
        final = folder / f"{number:05d}-{stem}.png"
        try:
            os.link(tmp, final, follow_symlinks=False)
            return final
        except FileExistsError:
            number += 1


@contextmanager
def opened(path: Path) -> Iterator[Image.Image]:
    """The image at `path`, its header read: every image ldm reads is opened here (or by
    `decoded`), so that one of more than limits.max_image_pixels() is refused before its pixels
    are decoded (Pillow's decompression-bomb limit, set from ldm's; its warning, past the limit,
    is the refusal)."""
    files.check_openable(path)
    with _bounded(path, repr(str(path))) as im:
        yield im


@contextmanager
def _bounded(source, what: str) -> Iterator[Image.Image]:
    Image.MAX_IMAGE_PIXELS = limit = limits.max_image_pixels()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(source)
    except (Image.DecompressionBombWarning, Image.DecompressionBombError):
        raise LdmError(f"{what} has more than {limit:,} pixels, more than ldm reads (4 times the largest "
                       f"image it makes); set {limits.MAX_PIXELS_ENV} to allow more, or use a smaller image") from None
    with im:
        yield im


def read_text_chunks(path: Path) -> dict[str, str]:
    """The PNG's text chunks; a clear error for anything that is not a readable image."""
    try:
        with opened(path) as im:
            im.load()
            return {k: v for k, v in getattr(im, "text", {}).items() if isinstance(v, str)}
    except FileNotFoundError:
        raise LdmError(f"no such file: {str(path)!r}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise LdmError(f"{str(path)!r} is not a readable image ({e})") from None


def decoded_text_chunks(data: bytes, what: str) -> dict[str, str]:
    """The text chunks of a PNG sent as bytes (ldm serve's png-info)."""
    try:
        with _bounded(io.BytesIO(data), what) as im:
            im.load()
            return {k: v for k, v in getattr(im, "text", {}).items() if isinstance(v, str)}
    except (OSError, SyntaxError, ValueError) as e:
        raise LdmError(f"{what} is not a readable image ({e})") from None


def load_image(path: Path, mode: str = "RGB") -> Image.Image:
    """The image at `path`, fully read and upright (EXIF orientation applied): mode "RGB" an 8-bit
    picture, mode "L" an 8-bit mask (image_modes says how each source mode is read); a clear
    error for a missing, unreadable or non-image file."""
    try:
        with opened(path) as im:
            return _converted(im, mode, repr(str(path)))
    except FileNotFoundError:
        raise LdmError(f"no such file: {str(path)!r}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise LdmError(f"{str(path)!r} is not a readable image ({e})") from None


def decoded(data: bytes, mode: str, what: str) -> Image.Image:
    """An image sent as bytes (ldm serve), read as load_image reads a file; `what` names it."""
    try:
        with _bounded(io.BytesIO(data), what) as im:
            return _converted(im, mode, what)
    except (OSError, SyntaxError, ValueError) as e:
        raise LdmError(f"{what} is not a readable image ({e})") from None


def _converted(im: Image.Image, mode: str, what: str) -> Image.Image:
    convert = {"RGB": image_modes.picture, "L": image_modes.mask}[mode]
    turned = _orientation(im) != 1
    im.load()
    return convert(ImageOps.exif_transpose(im) if turned else im, what)


def _orientation(im: Image.Image) -> int:
    """The EXIF orientation (1: upright), read without decoding the pixels: a PNG's eXIf chunk
    counts only before them, so that image_size and load_image always agree."""
    if im.format == "PNG" and "exif" not in im.info:
        return 1
    return im.getexif().get(ExifTags.Base.Orientation, 1)


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) of the image load_image returns, from the file's header alone."""
    with opened(path) as im:
        width, height = im.size
        return (height, width) if _orientation(im) in (5, 6, 7, 8) else (width, height)


MIN_SIDE = 8  # the VAE's factor: a narrower image is not one latent pixel wide, nothing to start from
QUIET_UPSCALE = 4  # a larger enlargement is said: it starts from little detail


def check_min_size(size: tuple[int, int], what: str) -> None:
    """Refuse an image too small to start from (it would be silently blown up)."""
    if min(size) < MIN_SIDE:
        raise LdmError(f"{what} is {size[0]}x{size[1]}: too small to start from (at least {MIN_SIDE} pixels "
                       "a side); use a larger image")


def enlargement(size: tuple[int, int], target: tuple[int, int]) -> str:
    """Words for a large enlargement from `size` to `target` ("" when at most QUIET_UPSCALE)."""
    factor = max(t / s for t, s in zip(target, size))
    return f" ({factor:.0f}x larger: little detail to start from)" if factor > QUIET_UPSCALE else ""


def rounded_down(size: tuple[int, int], multiple: int = 8) -> tuple[int, int]:
    """(width, height) rounded down to multiples of `multiple` (at least one), the sizes a latent
    model takes: 8 for the VAE's factor, 16 for a DiT with 2x2 patches."""
    return tuple(max(multiple, side - side % multiple) for side in size)


def resized(image: Image.Image, width: int, height: int) -> Image.Image:
    """`image` at width x height (Lanczos, as diffusers' image processor resizes); itself if already so."""
    if image.size == (width, height):
        return image
    return image.resize((width, height), Image.Resampling.LANCZOS)


STALE_AFTER_S = 60  # a PNG takes well under a second to write; an older temporary was orphaned


def remove_stale_temporaries(folder: Path) -> None:
    """Remove save_png's temporary files left by a killed process (SIGKILL skips its cleanup)."""
    for path in folder.glob(".ldm-*.png.part"):
        try:
            if time.time() - path.stat().st_mtime > STALE_AFTER_S:
                path.unlink()
        except FileNotFoundError:
            pass  # its writer finished meanwhile


def grid(pictures: list[Image.Image], columns: int | None = None) -> Image.Image:
    """A contact sheet: the pictures in rows, `columns` wide (default: about square), each in a
    cell the size of the largest."""
    columns = columns or math.ceil(math.sqrt(len(pictures)))
    rows = math.ceil(len(pictures) / columns)
    cell_w, cell_h = max(p.width for p in pictures), max(p.height for p in pictures)
    sheet = Image.new("RGB", (columns * cell_w, rows * cell_h), "white")
    for i, picture in enumerate(pictures):
        sheet.paste(picture.convert("RGB"), ((i % columns) * cell_w, (i // columns) * cell_h))
    return sheet


def replace_png(image: Image.Image, path: Path, text_chunks: dict[str, str]) -> Path:
    """Write `path` whole or not at all (a temporary file renamed over it, which replaces a link
    there rather than its target), replacing what was there."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _write_temporary(image, path.parent, text_chunks)
        try:
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        raise LdmError(f"cannot save {str(path)!r} ({e.strerror or e})") from None
    return path
