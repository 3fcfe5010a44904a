"""Model families, by name. Each is one module here (family.py says what a family is), so a DiT
family (SD3's MMDiT, FLUX, Z-Image) is one more module, not a change to the sampling loop, which knows
nothing else about a model.
"""
from __future__ import annotations

from ldm_cli.families.family import Family


def get(name: str) -> Family:
    from ldm_cli.families import chroma, flux, flux2, qwen_image, sd, sd3, sdxl, zimage

    registry = {f.name: f for f in (sd.SD1, sd.SD2, sdxl.SDXL, sd3.SD3, flux.FLUX, chroma.CHROMA, zimage.ZIMAGE,
                                   flux2.FLUX2, qwen_image.QWEN_IMAGE)}
    if name not in registry:
        from ldm_cli.errors import LdmError

        raise LdmError(f"unknown model family {name!r}; known: {', '.join(registry)}")
    return registry[name]
