"""What each command does, as plain functions of plain values; cli.py only parses and prints."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from PIL import Image

from ldm_cli import images, render
from ldm_cli.errors import LdmError
from ldm_cli.loading import LoadOptions
from ldm_cli.settings import Settings


@dataclass
class RunOptions:
    """How to run, as opposed to what to make (that is Settings)."""
    num_images: int = 1
    batch_size: int = 1
    out: Path = Path("outputs")
    quiet: bool = False
    load: LoadOptions = field(default_factory=LoadOptions)

    def validate(self) -> None:
        if self.num_images < 1:
            raise LdmError(f"--num-images must be at least 1 (got {self.num_images})")
        if self.batch_size < 1:
            raise LdmError(f"--batch-size must be at least 1 (got {self.batch_size})")


def base_settings(flags: Settings, from_png: Path | None) -> Settings:
    """The settings of --from-png (if any) with every flag given on top."""
    base = render.settings_from_png(from_png) if from_png else Settings()
    if from_png and flags.model is None and base.model and not Path(base.model).exists():
        base.model = None  # recorded path gone: fall back to --model or the built-in model
    merged = base.merged(**{k: v for k, v in flags.to_dict().items() if k != "prompt" or v})
    if not from_png and flags.prompt is None:
        raise LdmError("a prompt is required (or --from-png IMAGE to reuse an image's settings)")
    merged.validate()
    return merged


def load_model(settings: Settings, options: RunOptions):
    from ldm_cli import loading

    return loading.load(settings.model, options.load)


def resolved(settings: Settings, model) -> Settings:
    out = settings.resolve(model.defaults, model.native_size)
    out.model_name, out.model_hash = model.name, model.hash
    out.model = model.path
    return out


def generate(settings: Settings, options: RunOptions) -> Iterator[render.Result]:
    """Render options.num_images images; image i uses seed + i. Yields each as it is saved."""
    from ldm_cli.progress import Progress

    options.validate()
    images.check_writable(options.out)
    model = load_model(settings, options)
    s = resolved(settings, model)
    jobs = render.per_image(s, options.num_images)
    with Progress(s.steps * len(jobs), len(jobs), options.quiet) as progress:
        yield from render.render(model, jobs, options.batch_size, options.out, progress)


def png_info(path: Path) -> dict:
    """What an image was made with: the A1111 text and the parsed settings."""
    chunks = images.read_text_chunks(path)
    settings = render.settings_from_png(path)
    return {"parameters": chunks.get("parameters", settings.to_infotext("")), **settings.to_dict()}


def checkpoint_info(path: Path, config: str | None = None, allow_pickle: bool = False) -> dict:
    """What a checkpoint holds: family, prediction, native size, component sizes, dtype, hash, EMA."""
    from ldm_cli.loading import info, quiet_libraries

    quiet_libraries()
    return info.describe(path, config, allow_pickle)


# -- img2img, inpaint, outpaint: the same run, starting from an image ---------------------------
def note(message: str) -> None:
    print(f"ldm: {message}", file=sys.stderr)


def _with_init_image(settings: Settings, path: Path) -> tuple[Image.Image, Settings]:
    """The init image, and the settings recording its hash (A1111's short form: 10 hex digits of sha256)."""
    from ldm_cli import hashing

    image = images.load_image(path)
    return image, settings.merged(init_image_hash=hashing.sha256_file(path)[:10])


def _sized_to(settings: Settings, image: Image.Image, what: str) -> Settings:
    """Render at the image's own size (rounded down to multiples of 8) unless a size is asked for."""
    width, height = images.multiple_of_8(image.size)
    out = settings.merged(width=settings.width or width, height=settings.height or height)
    if (out.width, out.height) != image.size:
        note(f"{what} is {image.width}x{image.height}; resizing it to {out.width}x{out.height}")
    return out


def _run(settings: Settings, options: RunOptions, make, steps_run) -> Iterator[render.Result]:
    """Load the model and render options.num_images images with `make`; image i uses seed + i."""
    from ldm_cli.progress import Progress

    images.check_writable(options.out)
    model = load_model(settings, options)
    s = resolved(settings, model)
    jobs = render.per_image(s, options.num_images)
    with Progress(steps_run(s) * len(jobs), len(jobs), options.quiet) as progress:
        yield from render.render(model, jobs, options.batch_size, options.out, progress, make)


def img2img(settings: Settings, image_path: Path, options: RunOptions) -> Iterator[render.Result]:
    """Redraw the image at image_path after the prompt, as much as settings.strength says."""
    from ldm_cli import img2img as flow

    options.validate()
    init, s = _with_init_image(flow.with_defaults(settings), image_path)
    s = _sized_to(s, init, repr(str(image_path)))

    def make(model, group, on_step):
        return flow.image_to_image(model, group, [init] * len(group), on_step)
    yield from _run(s, options, make, flow.steps_run)


def _inpaint(s: Settings, init: Image.Image, mask: Image.Image, what: str,
             options: RunOptions) -> Iterator[render.Result]:
    from ldm_cli import img2img
    from ldm_cli import inpaint as flow

    if not s.only_masked:  # --only-masked renders at the model's size, the picture keeps its own
        s = _sized_to(s, init, what)

    def make(model, group, on_step):
        return flow.inpaint(model, group, [init] * len(group), [mask] * len(group), on_step)
    yield from _run(s, options, make, img2img.steps_run)


def inpaint(settings: Settings, image_path: Path, mask_path: Path, options: RunOptions) -> Iterator[render.Result]:
    """Repaint the white part of the mask at mask_path in the image at image_path."""
    from ldm_cli import inpaint as flow

    options.validate()
    init, s = _with_init_image(flow.with_defaults(settings), image_path)
    mask = images.load_image(mask_path, "L")
    flow.check_mask(mask, init.size, f"the mask {str(mask_path)!r}")
    yield from _inpaint(s, init, mask, repr(str(image_path)), options)


def outpaint(settings: Settings, image_path: Path, margins: tuple[int, int, int, int],
             options: RunOptions) -> Iterator[render.Result]:
    """Grow the image by margins (left, top, right, bottom) pixels and paint the new border."""
    from ldm_cli import inpaint as flow

    options.validate()
    image, s = _with_init_image(flow.with_defaults(settings), image_path)
    canvas, mask = flow.extend(image, *margins)
    yield from _inpaint(s, canvas, mask, "the extended canvas", options)


# -- batch: a prompts file ------------------------------------------------------------------------
def batch(path: Path, defaults: Settings, options: RunOptions, grid: bool = False) -> Iterator[render.Result]:
    """Render the images of the prompts file at `path` that options.out's manifest does not hold
    yet; `defaults` fill what a line leaves out. Yields each image as it is saved."""
    from ldm_cli import batch as batching
    from ldm_cli import prompts_file

    options.validate()
    if defaults.model:
        model = Path(defaults.model).expanduser().absolute()
        if not model.exists():
            raise LdmError(f"model not found: {str(model)!r}; pass a .safetensors file or a diffusers folder with --model")
        defaults = defaults.merged(model=str(model))
    defaults.validate()
    jobs = prompts_file.read(path, defaults, options.num_images)
    images.check_writable(options.out)
    yield from batching.run(jobs, options, path.stem if grid else None)
