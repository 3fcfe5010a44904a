"""Upscalers as A1111 names them: `Lanczos`, `Nearest` and `None` (plain resizes) or a model
(ESRGAN, RealESRGAN and its compact SRVGG, SwinIR, DAT, HAT, OmniSR, SPAN... what spandrel's core
architectures read), given as a file or by name in the models folders (model_lookup).

A model file is read as tensors only: `.safetensors` through ldm's checked header, `.pth`/`.pt`
with torch.load(weights_only=True) (loading/safety.py), so a pickle that needs code is refused
before any of it runs (spandrel's own loader unpickles more). As A1111 does, a model is applied
whole passes (tiled, tiling.py) while the image is smaller than the size asked for, at most
three, and the result is resized to that size with Lanczos. Pixels go in as RGB in [0, 1].
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from PIL import Image

from ldm_cli import files, infotext, model_lookup
from ldm_cli.errors import LdmError

RESIZERS = {"Lanczos": Image.Resampling.LANCZOS, "Nearest": Image.Resampling.NEAREST,
            "None": Image.Resampling.LANCZOS}  # A1111's None: no upscaler, its final Lanczos resize alone
MAX_PASSES = 3  # A1111's
TILE, OVERLAP = 512, 32  # input pixels: a 4x model's 2048 px output tile fits a few GB of GPU memory
PURPOSES = ("SR", "Restoration")  # not FaceSR (aligned faces only) or Inpainting (takes a mask)


@dataclass
class Upscaler:
    name: str  # as the metadata records it: a resizer's name or the model file's stem
    model: Any = None  # spandrel's ImageModelDescriptor, on its device; None for a resizer
    scale: int = 1
    fitting_tile: int | None = None  # set once a tile ran out of memory: later passes start there

    @property
    def resample(self) -> Image.Resampling:
        return RESIZERS.get(self.name, Image.Resampling.LANCZOS)


def locate(upscaler: str, models_dir: str | None) -> Path | None:
    """The model file `upscaler` names (a path, or a name in the models folders); None for a resizer."""
    if upscaler in RESIZERS:
        return None
    path = files.user_path(upscaler)
    if files.exists(path) or os.sep in upscaler or path.suffix.lower() in model_lookup.UPSCALERS.suffixes:
        if not files.exists(path):
            raise LdmError(f"no such upscaler file: {upscaler!r}")
        files.check_openable(path)
        return path
    roots = model_lookup.folders(models_dir, model_lookup.UPSCALERS)
    found = model_lookup.find(upscaler, None, roots, model_lookup.UPSCALERS)
    if found is None:
        where = f"in {', '.join(repr(str(r)) for r in roots)}" if roots else \
            f"without a models folder (--models-dir or ${model_lookup.MODELS_ENV})"
        raise LdmError(f"no upscaler model named {upscaler!r} {where}; give its file, or one of "
                       f"{', '.join(RESIZERS)}")
    return found


def load(upscaler: str, models_dir: str | None = None, device="auto") -> Upscaler:
    """The upscaler `upscaler` names, its model (if any) read and placed on `device` (a name as
    --device takes, or a torch.device)."""
    path = locate(upscaler, models_dir)
    if path is None:
        return Upscaler(upscaler)
    return Upscaler(path.stem, *_placed(_model(path), device))


def _placed(model, device) -> tuple[Any, int]:
    import torch

    from ldm_cli.device import pick_device

    device = device if isinstance(device, torch.device) else pick_device(device)
    half = device.type != "cpu" and model.supports_half  # fp16 on GPUs, as A1111; fp32 on the CPU
    return model.to(device, torch.float16 if half else torch.float32).eval(), model.scale


def _model(path: Path):
    """spandrel's descriptor of the model in `path`; one line for anything it is not."""
    from ldm_cli.libraries import import_spandrel

    try:
        spandrel = import_spandrel()
    except ModuleNotFoundError as e:
        if e.name != "spandrel":
            raise
        raise LdmError("upscaler models need spandrel: pip install --no-deps 'spandrel>=0.4,<0.5' (without "
                       "--no-deps pip also installs torchvision, which ldm does not use)") from None
    state = {k: v for k, v in spandrel.canonicalize_state_dict(_tensors(path)).items() if hasattr(v, "shape")}
    try:
        model = spandrel.ModelLoader().load_from_state_dict(state)
    except spandrel.UnsupportedModelError:
        raise LdmError(f"{path.name} is no upscaler model ldm knows (ESRGAN, RealESRGAN, SwinIR, DAT, HAT, "
                       "OmniSR, SPAN... the architectures spandrel reads)") from None
    except Exception as e:  # spandrel's detection reads shapes a crafted file may make nonsense
        raise LdmError(f"{path.name} looks like a {type(e).__name__} to spandrel, not a model it can build "
                       f"({str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    purpose = str(model.purpose)
    if not isinstance(model, spandrel.ImageModelDescriptor) or purpose not in PURPOSES:
        raise LdmError(f"{path.name} is a {model.architecture.name} model for {purpose}, not an upscaler")
    if (model.input_channels, model.output_channels) != (3, 3):
        raise LdmError(f"{path.name} takes {model.input_channels} and gives {model.output_channels} channels; "
                       "ldm upscales RGB images (3 and 3)")
    return model


def _tensors(path: Path) -> dict:
    from ldm_cli.loading import safety, tensors

    kind = safety.sniff(path)
    if kind == "pickle":
        return safety.load_pickle(path, tensors_only=False)  # RealESRGAN nests its weights in params_ema
    if kind != "safetensors":
        raise LdmError(f"{path.name} is neither a .safetensors nor a PyTorch (.pth, .pt) file; ldm cannot read it")
    checkpoint = tensors.open_checkpoint(path)
    return {key: checkpoint.get(key).clone() for key in checkpoint.shapes}


def passes(size: tuple[int, int], target: tuple[int, int], scale: int, at_least: int = 0) -> int:
    """How many times a `scale`x model runs: while the image is smaller than `target` on either
    side (A1111: at most 3; once only for a model that keeps the size)."""
    done, (width, height) = 0, size
    while done < MAX_PASSES and (done < at_least or width < target[0] or height < target[1]) and (done == 0 or scale > 1):
        width, height, done = width * scale, height * scale, done + 1
    return done


def upscale(upscaler: Upscaler, image: Image.Image, size: tuple[int, int], *, tile: int = TILE,
            overlap: int = OVERLAP, at_least: int = 0, on_tile: Callable[[], None] = lambda: None,
            on_halved: Callable[[int], None] = lambda more: None) -> Image.Image:
    """`image` (RGB) at `size` (width, height): the model's passes, then a resize to `size`."""
    for _ in range(passes(image.size, size, upscaler.scale, at_least) if upscaler.model is not None else 0):
        image = _model_pass(upscaler, image, tile, overlap, on_tile, on_halved)
    return image if image.size == tuple(size) else image.resize(tuple(size), upscaler.resample)


def _model_pass(upscaler: Upscaler, image: Image.Image, tile: int, overlap: int, on_tile, on_halved) -> Image.Image:
    import numpy as np
    import torch

    from ldm_cli import tiling

    model = upscaler.model
    pixels = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None].float() / 255

    def apply(part):
        with torch.inference_mode():
            return model(part.to(model.device, model.dtype))

    if upscaler.fitting_tile and upscaler.fitting_tile < tile:
        fits = (upscaler.fitting_tile, min(overlap, upscaler.fitting_tile // 2))
        on_halved(tiling.count(image.size, *fits) - tiling.count(image.size, tile, overlap))
        tile, overlap = fits
    out, ran = tiling.run_halving(apply, pixels, upscaler.scale, tile, overlap, on_tile, on_halved)
    if ran < tile:
        upscaler.fitting_tile = ran
    return Image.fromarray((out[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())


def cover(size: tuple[int, int], box: tuple[int, int]) -> tuple[int, int]:
    """`size` scaled by the larger of the box's ratios, so it covers `box` (A1111's "Scale to")."""
    (width, height), (box_width, box_height) = size, box
    if box_width * height >= box_height * width:
        return box_width, max(box_height, round(height * box_width / width))
    return max(box_width, round(width * box_height / height)), box_height


def cropped(image: Image.Image, box: tuple[int, int]) -> Image.Image:
    """The middle of `image`, `box` in size (A1111's "crop to fit", its offsets)."""
    left, top = image.width // 2 - box[0] // 2, image.height // 2 - box[1] // 2
    return image.crop((left, top, left + box[0], top + box[1]))


def metadata(chunks: dict[str, str], upscaler: Upscaler, scale: float | None,
             box: tuple[int, int] | None = None) -> dict[str, str]:
    """The source image's text chunks (its `parameters` among them) and A1111's `postprocessing`
    chunk saying how it was upscaled (replacing an earlier one, as A1111's Extras tab does):
    by `scale`, or to `box` and cropped, in A1111's order."""
    done = {"Postprocess upscale to": f"{box[0]}x{box[1]}", "Postprocess crop to": f"{box[0]}x{box[1]}"} if box else \
        {"Postprocess upscale by": infotext.format_number(scale)}
    return {**chunks, infotext.POSTPROCESSING: infotext.format_params({**done, "Postprocess upscaler": upscaler.name})}


@functools.lru_cache(maxsize=1)
def _kept(path: str, device, stamp: tuple) -> Upscaler:
    """The model at `path` on `device`, loaded once while the file (`stamp`) stays the same."""
    return load(path, None, device)


def upscale_to(image: Image.Image, upscaler: str, size: tuple[int, int], *, models_dir: str | None,
               device="auto") -> Image.Image:
    """`image` at `size` through `upscaler` (Lanczos, Nearest, None, a model file or name) as A1111's
    hires fix resizes (its resize_image): None is one Lanczos resize; otherwise, when `size` is
    larger, the upscaler takes the image to its scale (the larger ratio) x its size rounded down
    to multiples of 8 (a resizer: its own resize to the scaled size, then Lanczos), and Lanczos
    makes that `size`. The last model used stays loaded for the next image."""
    size = tuple(size)
    scale = max(size[0] / image.width, size[1] / image.height)
    if upscaler != "None" and scale > 1:
        dest = (int(image.width * scale // 8 * 8), int(image.height * scale // 8 * 8))
        if upscaler in RESIZERS:
            image = image.resize((int(image.width * scale), int(image.height * scale)), RESIZERS[upscaler])
        else:
            path = locate(upscaler, models_dir)
            stat = os.stat(path)
            image = upscale(_kept(str(path), device, (stat.st_mtime_ns, stat.st_size)), image, dest)
        image = image if image.size == dest else image.resize(dest, Image.Resampling.LANCZOS)
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)
