"""Inpainting (and outpainting, which is inpainting a grown canvas), in the order diffusers'
inpaint pipelines run it: check inputs, encode the prompt, timesteps from strength, latents
(image latents, then noise), mask and masked-image latents, denoise, decode; then the result is
pasted into the original picture.

White in the mask is repainted, black is kept. The model sees the mask blurred by --mask-blur
and binarised at one half. A dedicated inpainting model (9-channel U-Net) gets the mask and the
masked image's latents as extra input channels; an ordinary model gets the kept part of its
latents replaced by the image's own, noised to the next timestep, after every step. The saved
picture takes the model's pixels where the blurred mask is at least half white, fades to the
original across the blur outside that, and keeps the original's pixels exactly where the
blurred mask is black. With --only-masked, the mask's bounding box plus --padding (widened to
the render's aspect ratio) is cut out, rendered at the model's size and pasted back.

--masked-content (A1111's "Masked content") is what the repainted part starts from: the picture
(original), the picture with that part painted in the colours around it (fill), or, in the image's
latents before they are noised, the seed's noise (latent noise) or zeros (latent nothing). Only
a strength below 1 starts from the latents; fill changes the pixels a 9-channel model sees too.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageFilter

from ldm_cli import control, hires_plan, images, limits, pipeline, sampling, strength, vae
from ldm_cli.errors import LdmError
from ldm_cli.settings import Settings

DEFAULTS = {"strength": 1.0, "mask_blur": 4, "only_masked": False}
FILL_RADII = (256, 64, 16, 4, 2)  # masked content "fill": blurs from wide to fine, each finer one overwriting where it reaches
DEFAULT_PADDING = 32
WHITE = 128  # grey levels from here up are repainted (one half, as diffusers binarises masks)

Box = tuple[int, int, int, int]


def with_defaults(s: Settings) -> Settings:
    """The defaults, and no hires settings (a --from-png may record them)."""
    s = hires_plan.without(s)
    out = s.merged(**{k: v for k, v in DEFAULTS.items() if getattr(s, k) is None})
    return out.merged(padding=DEFAULT_PADDING) if out.only_masked and out.padding is None else out


# -- masks ------------------------------------------------------------------------------------
def check_mask(mask: Image.Image, image_size: tuple[int, int], name: str = "the mask") -> None:
    """A mask must have the image's shape (any size) and something to repaint."""
    (mw, mh), (iw, ih) = mask.size, image_size
    if abs(mh - mw * ih / iw) > max(1.0, 0.01 * mh):
        raise LdmError(f"{name} is {mw}x{mh} but the image is {iw}x{ih}: a different aspect ratio; "
                       "make the mask the image's shape")
    if mask.convert("L").getextrema()[1] < WHITE:
        raise LdmError(f"{name} is empty: nothing in it is white; paint white what should be repainted")


def blurred(mask: Image.Image, radius: int) -> Image.Image:
    return mask.filter(ImageFilter.GaussianBlur(radius)) if radius else mask


def overlay_alpha(soft_mask: Image.Image) -> Image.Image:
    """How much of the model's picture the saved one takes: doubled, so all of the repainted part
    (at least half white) takes it and the blur fades only into the kept part."""
    return soft_mask.point(lambda v: min(255, 2 * v))


def mask_tensor(masks: list[Image.Image]) -> torch.Tensor:
    """N x 1 x H x W: 1 where the model repaints."""
    arr = np.stack([np.asarray(m.convert("L")) >= WHITE for m in masks]).astype(np.float32)
    return torch.from_numpy(arr)[:, None]


# -- the region each image renders --------------------------------------------------------------
def _span(lo: int, hi: int, length: int, limit: int) -> tuple[int, int]:
    """[lo, hi) grown about its centre to `length`, then shifted to lie inside [0, limit)."""
    start = min(max(round((lo + hi - length) / 2), 0), limit - length)
    return start, start + length


def crop_box(soft_mask: Image.Image, padding: int, aspect: float) -> Box:
    """The mask's bounding box plus padding, widened to width/height = aspect, inside the image."""
    w, h = soft_mask.size
    x1, y1, x2, y2 = soft_mask.getbbox() or (0, 0, w, h)
    x1, y1, x2, y2 = max(x1 - padding, 0), max(y1 - padding, 0), min(x2 + padding, w), min(y2 + padding, h)
    bw, bh = x2 - x1, y2 - y1
    if bw / bh < aspect:
        bw = min(w, round(bh * aspect))
    else:
        bh = min(h, round(bw / aspect))
    (x1, x2), (y1, y2) = _span(x1, x2, bw, w), _span(y1, y2, bh, h)
    return x1, y1, x2, y2


@dataclass
class Region:
    """One image's share of a batch: what the model sees, and how its picture goes back."""
    original: Image.Image  # RGB: the picture the result is pasted into
    alpha: Image.Image  # L, original's size: 255 takes the model's pixels, 0 keeps the original's
    box: Box  # where in `original` the model's picture goes
    image: Image.Image  # RGB at the render size
    mask: Image.Image  # L at the render size


def filled(image: Image.Image, mask: Image.Image) -> Image.Image:
    """`image` with its repainted part (mask >= WHITE) painted with the colours around it: each
    pixel the mean of the kept pixels near it, weighted by a Gaussian, from wide blurs to fine."""
    from scipy.ndimage import gaussian_filter

    picture = np.asarray(image.convert("RGB"), dtype=np.float64)
    repaint = np.asarray(mask.convert("L").resize(image.size)) >= WHITE
    keep = (~repaint).astype(np.float64)
    out = picture.copy()
    for radius in FILL_RADII:
        weight = gaussian_filter(keep, radius, mode="nearest")
        reached = repaint & (weight > 1e-3)
        for channel in range(3):
            colour = gaussian_filter(picture[..., channel] * keep, radius, mode="nearest")
            out[..., channel][reached] = colour[reached] / weight[reached]
    return Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))


def prepare(s: Settings, init: Image.Image, mask: Image.Image) -> Region:
    """The whole image at the render size, or (--only-masked) the mask's surroundings cut out and
    scaled; with masked content "fill", the repainted part painted from around it first."""
    init = init.convert("RGB")
    if s.masked_content == "fill":
        init = filled(init, mask)
    original = init if s.only_masked else images.resized(init, s.width, s.height)
    soft = blurred(images.resized(mask.convert("L"), *original.size), s.mask_blur or 0)
    box = crop_box(soft, s.padding or 0, s.width / s.height) if s.only_masked else (0, 0, *original.size)
    return Region(original, overlay_alpha(soft), box, images.resized(original.crop(box), s.width, s.height),
                  images.resized(soft.crop(box), s.width, s.height))


def paste(region: Region, rendered: Image.Image) -> Image.Image:
    x1, y1, x2, y2 = region.box
    canvas = region.original.copy()
    canvas.paste(images.resized(rendered, x2 - x1, y2 - y1), (x1, y1))
    return Image.composite(canvas, region.original, region.alpha)


# -- outpainting's canvas ----------------------------------------------------------------------
Margins = tuple[int, int, int, int]  # left, top, right, bottom


def check_margins(margins: Margins) -> None:
    if min(margins) < 0:
        raise LdmError("--left, --right, --top and --bottom must be 0 or more")
    if not any(margins):
        raise LdmError("nothing to outpaint: give --left, --right, --top or --bottom in pixels")


def check_canvas(size: tuple[int, int], margins: Margins) -> None:
    """Margins that would grow the canvas past the size limit are refused before it is allocated."""
    check_margins(margins)
    width, height = canvas_size(size, margins)
    if max(width, height) > limits.MAX_SIDE or width * height > limits.max_pixels():
        raise LdmError(f"the outpainted canvas would be {width}x{height}, over ldm's limit of {limits.MAX_SIDE} "
                       f"pixels a side and {limits.max_pixels():,} in all; use smaller margins "
                       f"(or set {limits.MAX_PIXELS_ENV})")


def _grown(side: int, low: int, high: int, multiple: int) -> tuple[int, int]:
    """Margins on one axis grown the least that makes side + both a multiple of `multiple`: the
    only one asked takes it all, else it is shared (the picture is never cropped or stretched)."""
    extra = -(side + low + high) % multiple
    if bool(low) != bool(high):
        return (low + extra, high) if low else (low, high + extra)
    return low + extra // 2, high + extra - extra // 2


def grown_margins(size: tuple[int, int], margins: Margins, multiple: int = 8) -> Margins:
    """The margins, grown so that each side of the canvas is a multiple of the model's size
    multiple (the VAE's factor, times a DiT's patch size)."""
    check_margins(margins)
    (left, right) = _grown(size[0], margins[0], margins[2], multiple)
    (top, bottom) = _grown(size[1], margins[1], margins[3], multiple)
    return left, top, right, bottom


def canvas_size(size: tuple[int, int], margins: Margins) -> tuple[int, int]:
    left, top, right, bottom = margins
    return size[0] + left + right, size[1] + top + bottom


def canvas_render_size(canvas: tuple[int, int], width: int | None, height: int | None,
                       multiple: int = 8) -> tuple[int, int]:
    """The size a whole canvas renders at: its own, or scaled as a whole to the width or height
    asked, the other side following its shape (to the nearest multiple of `multiple`). A size whose
    shape is not the canvas's is refused: it would stretch the picture."""
    cw, ch = canvas
    if not (width or height):
        return canvas

    def nearest(value: float) -> int:
        return max(multiple, multiple * round(value / multiple))
    by_width = (width, nearest(width * ch / cw)) if width else None
    by_height = (nearest(height * cw / ch), height) if height else None
    if not (width and height) or (width, height) in (by_width, by_height):
        return by_width or by_height
    raise LdmError(f"a {width}x{height} render would stretch the {cw}x{ch} canvas (the image plus the margins); "
                   f"give only --width or --height and the other follows its shape (--width {width}: "
                   f"{by_width[0]}x{by_width[1]}), or neither to render at {cw}x{ch}")


def extend(image: Image.Image, left: int, top: int, right: int, bottom: int) -> tuple[Image.Image, Image.Image]:
    """Outpainting's canvas and mask: the image grown by the margins, the new border filled by
    repeating the image's edge pixels (a start that strength < 1 can build on), white in the mask."""
    check_canvas(image.size, (left, top, right, bottom))
    pixels = np.pad(np.asarray(image.convert("RGB")), ((top, bottom), (left, right), (0, 0)), mode="edge")
    canvas = Image.fromarray(pixels)
    mask = Image.new("L", canvas.size, 255)
    mask.paste(0, (left, top, left + image.width, top + image.height))
    return canvas, mask


# -- latents ----------------------------------------------------------------------------------
def _latents(model, group: list[Settings], scheduler, timesteps: torch.Tensor, pixels: torch.Tensor,
             generators: list[torch.Generator], mask: torch.Tensor, mode: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(starting latents, noise, image latents), drawn from the generators in diffusers' order;
    `mode`: the image's latents are the VAE's mode, no draw (an edit's: FluxKontextInpaintPipeline).
    `mask` (latent size, 1 repainted) takes the masked content's latents before they are noised."""
    full = group[0].strength == 1
    image_latents = None
    if not (model.is_inpainting and full):  # ordinary models blend them back; strength < 1 starts from them
        image_latents = vae.encode(model, pixels, None if mode else generators)
    if full:
        noise = pipeline.initial_noise(model, group, generators)
        return noise * sampling.init_noise_sigma(scheduler), noise, image_latents
    started = _masked_content(model, group, image_latents, mask)
    latents, noise = strength.add_noise(model, group, scheduler, started, generators, timesteps)
    return latents, noise, image_latents


def _masked_content(model, group: list[Settings], image_latents: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The latents the repainted part starts from: the image's, the seed's noise (A1111's latent
    noise: each image's first draw from a fresh generator of its seed) or zeros (latent nothing).
    The kept part is the image's whatever: blending puts it back after every step."""
    content = group[0].masked_content
    if content == "latent nothing":
        return image_latents * (1 - mask)
    if content == "latent noise":
        noise = pipeline.initial_noise(model, group, pipeline.generators_for(group))
        return image_latents * (1 - mask) + noise * mask
    return image_latents


def _masked_image_latents(model, pixels: torch.Tensor, mask: torch.Tensor,
                          generators: list[torch.Generator]) -> torch.Tensor | None:
    """The image with the repainted part grey, encoded: a 9-channel model's extra input.

    diffusers encodes it for ordinary models too, drawing a latent sample from each generator; the
    same draws are made (and dropped) so that a stochastic scheduler's later noise matches."""
    if model.is_inpainting:
        return vae.encode(model, pixels * (mask < 0.5), generators)
    f = model.vae_scale_factor
    shape = (1, model.latent_channels, pixels.shape[2] // f, pixels.shape[3] // f)
    for g in generators:
        torch.randn(shape, generator=g, dtype=vae.compute_dtype(model.vae))
    return None


def _blend(scheduler, image_latents: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor,
           timesteps: torch.Tensor) -> sampling.Blend:
    """After step i the kept part becomes the image's latents noised to the next timestep (clean after the last)."""
    def blend(latents: torch.Tensor, i: int) -> torch.Tensor:
        known = image_latents
        if i < len(timesteps) - 1:
            known = sampling.add_noise(scheduler, image_latents, noise, timesteps[i + 1:i + 2])
        return (1 - mask) * known + mask * latents
    return blend


def check_inputs(model, group: list[Settings], init_images: list[Image.Image], masks: list[Image.Image]) -> None:
    strength.check_inputs(model, group, init_images)
    if len(masks) != len(group):
        raise ValueError("inpainting needs one mask per settings")
    for image, mask in zip(init_images, masks):
        check_mask(mask, image.size)


def inpaint(model, group: list[Settings], init_images: list[Image.Image], masks: list[Image.Image],
            on_step: Callable[[], None] | None = None, references: Callable[[torch.Tensor], dict] | None = None,
            sampled: bool = False) -> list[Image.Image]:
    """`references`: an edit's per-image conditioning, given the image's latents (edit.py, `ldm edit
    --mask`): the loop adds it to every call, and the image's latents are its VAE mode, as
    FluxKontextInpaintPipeline encodes them, unless `sampled` (QwenImageEditInpaintPipeline's)."""
    # 1. check inputs; each image's part at the render size
    check_inputs(model, group, init_images, masks)
    regions = [prepare(s, image, mask) for s, image, mask in zip(group, init_images, masks)]
    s = group[0]
    # 2. encode the prompts
    positive, negative = pipeline.encode_prompts(model, group)
    # 3. timesteps from strength
    scheduler = pipeline.make_scheduler(model, group)
    timesteps = strength.strength_timesteps(scheduler, s, model.family)
    # 4. latents: image latents, then noise
    generators = pipeline.generators_for(group)
    # at the render size (the region's with --only-masked), before the image's sample, as diffusers
    units = control.for_batch(model, *regions[0].image.size, generators)
    pixels = vae.to_tensor([r.image for r in regions])
    mask = mask_tensor([r.mask for r in regions])
    f = model.vae_scale_factor
    small = torch.nn.functional.interpolate(mask, size=(pixels.shape[2] // f, pixels.shape[3] // f))
    small = small.to(model.device, model.dtype)
    latents, noise, image_latents = _latents(model, group, scheduler, timesteps, pixels, generators, small,
                                             mode=references is not None and not sampled)
    # 5. the mask at latent size and the masked image
    masked = _masked_image_latents(model, pixels, mask, generators)
    mask = small
    # 6. denoise: a 9-channel model sees mask and masked image; an ordinary one gets the kept part back
    extra = torch.cat([mask, masked], dim=1) if masked is not None else None
    blend = None if masked is not None else _blend(scheduler, image_latents, noise, mask, timesteps)
    latents = sampling.denoise(model, scheduler, latents, positive, negative, s.cfg, generators, timesteps,
                               extra_input=extra, blend=blend, on_step=on_step, control=units,
                               references=None if references is None else references(image_latents))
    # 7. decode, and paste into the originals
    return [paste(r, picture) for r, picture in zip(regions, vae.decode(model, latents))]
