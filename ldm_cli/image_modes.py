"""Any picture Pillow opens, made into what the pipelines take: an 8-bit RGB picture or an 8-bit
grey mask.

Pillow's own convert() clips deep grey values at 255 (a 16-bit PNG comes out almost all white)
and keeps whatever colour transparent pixels happen to hold. Here deep values are scaled down
to 8 bits, a picture's transparency is composited on white (as A1111 does with init images),
and a mask with transparency is its opacity: opaque is repainted, transparent kept (A1111's
rule too, so masks painted on a transparent layer work whatever the brush colour).
"""
from __future__ import annotations

import math

from PIL import Image

from ldm_cli.errors import LdmError

SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")  # 16-bit grey: white is 65535
RANGED = ("I", "F")  # 32-bit grey, integer or float: white depends on the range the values use


def _white_level(values, mode: str, what: str) -> float:
    """The value that means white: 65535 for 16-bit modes; for 32-bit ones, the smallest of 1.0
    (float fractions), 255 (8-bit values) and 65535 (16-bit values) that holds every value."""
    if mode in SIXTEEN_BIT:
        return 65535
    low, high = float(values.min()), float(values.max())
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high > 65535:
        raise LdmError(f"{what} holds {mode}-mode pixels outside 0-65535 (from {low:g} to {high:g}); "
                       "save it as an 8- or 16-bit image")
    if mode == "F" and high <= 1:
        return 1.0
    return 255 if high <= 255 else 65535


def eight_bit(im: Image.Image, what: str) -> Image.Image:
    """`im` with 8 bits a channel: deep grey scaled (not clipped) to L, LAB converted to RGB,
    premultiplied grey+alpha unpremultiplied; any other mode as it is."""
    if im.mode in SIXTEEN_BIT + RANGED:
        import numpy as np  # here, not above: `ldm info IMAGE` imports this module and stays quick

        values = np.asarray(im).astype(np.float64)
        scaled = np.rint(values * (255 / _white_level(values, im.mode, what)))
        return Image.fromarray(scaled.clip(0, 255).astype(np.uint8), "L")
    if im.mode == "LAB":  # its channels are not RGB's: convert() would only relabel them
        from PIL import ImageCms

        return ImageCms.profileToProfile(im, ImageCms.createProfile("LAB"), ImageCms.createProfile("sRGB"),
                                         outputMode="RGB")
    if im.mode == "La":  # Pillow converts it to nothing but LA
        return im.convert("LA")
    return im


def _transparent(im: Image.Image) -> Image.Image | None:
    """`im` as RGBA if any pixel is less than opaque (an alpha channel or a transparent colour)."""
    if im.mode not in ("RGBA", "LA", "PA", "RGBa") and "transparency" not in im.info:
        return None
    rgba = im.convert("RGBA")
    return rgba if rgba.getchannel("A").getextrema()[0] < 255 else None


def picture(im: Image.Image, what: str) -> Image.Image:
    """`im` as 8-bit RGB, transparency composited on white."""
    im = eight_bit(im, what)
    rgba = _transparent(im)
    if rgba is None:
        return im.convert("RGB")
    return Image.alpha_composite(Image.new("RGBA", im.size, "white"), rgba).convert("RGB")


def mask(im: Image.Image, what: str) -> Image.Image:
    """`im` as an 8-bit grey mask: its opacity if it has transparency, else its grey levels."""
    im = eight_bit(im, what)
    rgba = _transparent(im)
    return rgba.getchannel("A") if rgba is not None else im.convert("L")
