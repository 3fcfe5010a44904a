"""ControlNet units: what the user asked for, their control images, and their residuals in the loop.

A unit (control_units.py) pairs a ControlNet with a control image, a scale and a window of steps. Its image is
fitted to the render size as A1111's "Crop and Resize" (scaled to cover, centre-cropped) and may
be turned into an edge map first (`canny`, A1111's thresholds 100 and 200). Depth and pose maps
need their own detector models: such units take preprocessed images.

In the loop each acting unit reads the scaled latents, the timestep, the same conditioning as the
denoiser and its control input, rows for rows (both CFG halves); the residuals of all units, each
times its scale, are summed as diffusers' MultiControlNetModel sums them. What a unit reads and
adds is its family's (Family.control_input, control_residuals): a U-Net's ControlNet the image's
pixels and residuals for the down and middle blocks, FLUX's the image's VAE latents and samples
for the transformer's blocks.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from ldm_cli.control_units import CANNY_THRESHOLDS, ControlUnit


def crop_and_resize(image: Image.Image, width: int, height: int) -> Image.Image:
    """A1111's "Crop and Resize": scaled to cover width x height, then centre-cropped to it."""
    if image.size == (width, height):
        return image
    scale = max(width / image.width, height / image.height)
    size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
    left, top = (size[0] - width) // 2, (size[1] - height) // 2
    # Straight to the target: the crop's box in the image's own pixels gives the pixels that
    # scaling the whole image and cropping gives, without the whole scaled image (a 1x60000
    # image covering 64x64 would be 64x3840000 of them).
    sx, sy = image.width / size[0], image.height / size[1]
    box = (left * sx, top * sy, (left + width) * sx, (top + height) * sy)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=box)


def canny(image: Image.Image) -> Image.Image:
    """White edges on black, from OpenCV's Canny detector with A1111's thresholds."""
    import cv2

    edges = cv2.Canny(np.asarray(image.convert("RGB")), *CANNY_THRESHOLDS)
    return Image.fromarray(edges).convert("RGB")


def control_image(unit: ControlUnit, width: int, height: int) -> Image.Image:
    """The unit's image as its ControlNet reads it at this render size."""
    from ldm_cli import files, images

    image = crop_and_resize(images.load_image(files.user_path(unit.image)), width, height)
    return canny(image) if unit.preprocess == "canny" else image


def as_tensor(image: Image.Image, count: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(count, 3, h, w) in [0, 1], as diffusers' control image processor gives it (no normalising)."""
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]
    return array.repeat(count, 1, 1, 1).to(device, dtype)


@dataclass
class Control:
    """The loaded units of one batch: ControlNets, their images (one row per latent row), scales
    and step windows; `scales` are those of the current step (0: the unit rests)."""
    nets: list[Any]
    images: list[torch.Tensor]
    scales: list[float]
    windows: list[tuple[float, float]]
    modes: list[int | None]  # a union net's control type

    def for_rows(self, rows: Callable[[torch.Tensor], torch.Tensor]) -> Control:
        return replace(self, images=[rows(image) for image in self.images])

    def at(self, i: int, steps: int) -> Control:
        """The scales at step i of `steps`: a unit acts where diffusers' controlnet_keep is 1."""
        keep = [1.0 - float(i / steps < start or (i + 1) / steps > end) for start, end in self.windows]
        return replace(self, scales=[s * k for s, k in zip(self.scales, keep)])

    def with_residuals(self, model, x: torch.Tensor, t: torch.Tensor, cond: dict, rows) -> dict:
        """`cond` with the summed residuals of the acting units for latent rows `x` (rows `rows`)."""
        summed: dict | None = None
        for net, image, scale, mode in zip(self.nets, self.images, self.scales, self.modes):
            if scale == 0.0:
                continue
            added = model.family.control_residuals(model, net, x, t, cond, image[rows], scale, mode)
            summed = added if summed is None else {k: _sum(summed[k], v) for k, v in added.items()}
        return cond if summed is None else {**cond, **summed}


def _sum(a, b):
    """Two units' residuals for one input: tensors, lists of them (one per block), tables of them by
    layer (Z-Image's: each net steers its own layers), or a flag both share."""
    if isinstance(a, torch.Tensor):
        return a + b
    if isinstance(a, (list, tuple)):
        return [_sum(x, y) for x, y in zip(a, b)]
    if isinstance(a, dict):
        return {k: _sum(a[k], b[k]) if k in a and k in b else a.get(k, b.get(k)) for k in {**a, **b}}
    return a


def for_batch(model, width: int, height: int, generators: list[torch.Generator]) -> Control | None:
    """The model's ControlNet units made ready for a batch (one generator per image) at this
    size. Call it before drawing the starting noise: a ControlNet that reads VAE latents (FLUX's)
    samples them from the images' generators first, as diffusers does."""
    loaded = getattr(model, "controls", None) or []
    if not loaded:
        return None
    images = [model.family.control_input(
        model, net, as_tensor(control_image(unit, width, height), len(generators), model.device, model.dtype), generators)
        for unit, net in loaded]
    return Control([net for _, net in loaded], images, [unit.scale for unit, _ in loaded],
                   [(unit.start, unit.end) for unit, _ in loaded], [unit.mode for unit, _ in loaded])
