"""What each command does, as plain functions of plain values; cli.py only parses and prints."""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from ldm_cli import files, hires_plan, images, limits, model_lookup, render, upscaling
from ldm_cli.errors import LdmError
from ldm_cli.limits import MAX_IMAGES
from ldm_cli.loading import LoadOptions
from ldm_cli.model_slot import ModelSlot
from ldm_cli.networks.lookup import NetworkOptions
from ldm_cli.notes import note
from ldm_cli.settings import Settings, check_seed_room


@dataclass
class RunOptions:
    """How to run, as opposed to what to make (that is Settings)."""
    num_images: int = 1
    batch_size: int = 1
    out: Path | None = Path("outputs")  # None: the images are kept in memory (Result.image), not saved
    quiet: bool = False
    load: LoadOptions = field(default_factory=LoadOptions)
    networks: NetworkOptions = field(default_factory=NetworkOptions)  # where LoRAs and embeddings are
    watch: Callable[[int, int], None] | None = None  # told (steps done, steps in all) after each step; may raise to stop

    def validate(self) -> None:
        if not 1 <= self.num_images <= MAX_IMAGES:  # every image's settings are listed up front
            raise LdmError(f"--num-images must be between 1 and {MAX_IMAGES} (got {self.num_images})")
        if self.batch_size < 1:
            raise LdmError(f"--batch-size must be at least 1 (got {self.batch_size})")


def base_settings(flags: Settings, from_png: Path | None, models_dir: str | None = None,
                  refines: bool = False) -> Settings:
    """The settings of --from-png (if any) with every flag given on top; a recorded model no
    longer at its path is found by name in the models folders (model_lookup), else refused, and
    so is --model NAME. `refines`: the command runs a recorded refiner (generate), found as the
    model is; the others leave it out."""
    if flags.model is not None:
        flags = flags.merged(model=model_lookup.given_model(flags.model, models_dir))
    base = render.settings_from_png(from_png) if from_png else Settings()
    if from_png and flags.model is None:
        base.model = model_lookup.recorded_model(base.model, base.model_name, base.model_hash, from_png, models_dir)
    if not refines:
        base = replace(base, refiner=None, refiner_name=None, refiner_hash=None, refiner_switch_at=None)
    elif from_png and flags.refiner is None and base.refiner_name:
        base.refiner = model_lookup.recorded_model(base.refiner, base.refiner_name, base.refiner_hash, from_png,
                                                   models_dir, "refiner")
    given = {k: v for k, v in flags.to_dict().items() if k != "prompt" or v}
    if from_png:
        render.check_recorded(from_png, base, set(given))  # a bad recorded value is the PNG's, unless overridden
    merged = base.merged(**given)
    if not from_png and flags.prompt is None:
        raise LdmError("a prompt is required (or --from-png IMAGE to reuse an image's settings)")
    merged.validate()
    return merged


def load_model(settings: Settings, options: RunOptions, slot: ModelSlot | None = None):
    """The model, with its LoRAs and embeddings session and its ControlNets; the LoRAs the prompt
    names and the ControlNet files are found before it loads. With a `slot` (ldm serve), the
    model it holds when loaded alike."""
    from ldm_cli import control_units, loading
    from ldm_cli.networks import lookup

    if settings.seed is not None:  # checked before the load, like every other setting
        check_seed_room(settings.seed, options.num_images)
    lookup.check_folders(options.networks)
    lookup.check_loras(settings, options.networks)
    units = control_units.from_text(settings.controlnet)
    for unit in units:  # its files found before the model loads
        unit.validate()
    check_upscaler(settings)
    if slot is not None:
        model = slot.get(settings.model, bool(settings.no_t5), replace(options.load, variant=settings.variant),
                         options.networks)
    else:
        early = (lambda m: _encode_early(m, settings, options)) if _encodes_early(settings, options, units) else None
        model = loading.load(settings.model, replace(options.load, without_t5=bool(settings.no_t5),
                                                     variant=settings.variant), early)
        if model.networks is None:  # not attached for encoding early
            from ldm_cli.networks import session  # imports torch: after the load has begun

            session.attach(model, options.networks, settings.model)
    model.controls = []  # a held model keeps no ControlNet of an earlier run acting
    model.refiner = None  # nor a refiner
    if settings.refiner:
        from ldm_cli import refiner

        refiner.attach(model, settings.refiner, options.load)
    if units:  # ControlNet code is imported only for a run that asks for one
        from ldm_cli.loading import controlnet

        with slot.loading() if slot is not None else nullcontext():
            controlnet.attach(model, units)
    return model


def _encodes_early(settings: Settings, options: RunOptions, units: list) -> bool:
    """Whether the first batch's prompts can be encoded while the denoiser's weights are still
    read, exactly as they would be after: not with LoRAs (merged per batch, text encoders too), an
    edit's images, a ControlNet, a hires pass or a refiner (each set up after the load), a --vae file
    (loaded after the rest), or weights moved or changed after loading (offload, fp8, --compile)."""
    from ldm_cli.networks import tags

    load = options.load
    return not (tags.lora_tags(settings.prompt) or tags.lora_tags(settings.negative or "") or settings.edit_images
                or units or hires_plan.enabled(settings) or settings.refiner or load.vae or load.offload != "none"
                or load.weights or load.compile)


def _encode_early(model, settings: Settings, options: RunOptions) -> None:
    from ldm_cli.networks import session

    session.attach(model, options.networks, settings.model)  # its embeddings are read as prompts are
    render.encode_first(settings, model, options.num_images, options.batch_size)


def check_upscaler(settings: Settings) -> None:
    """Hires fix's upscaler model (a file, or a name in $LDM_MODELS_DIR's upscaler folders) is
    there, before any model loads."""
    if hires_plan.enabled(settings) and settings.hires_upscaler not in (None, *hires_plan.UPSCALERS):
        upscaling.locate(settings.hires_upscaler, None)


def with_lora_flags(settings: Settings, options: RunOptions) -> Settings:
    """The prompt (and hires prompt) with a `<lora:NAME:W>` tag for each --lora FILE[:W] it does not name already."""
    from ldm_cli.networks import tags

    if not options.networks.lora_files and settings.prompt is not None:  # a copy per line of a long file costs seconds
        return settings
    files = options.networks.lora_files
    return settings.merged(prompt=tags.with_flag_loras(settings.prompt, files),
                           hires_prompt=settings.hires_prompt and tags.with_flag_loras(settings.hires_prompt, files))


def not_an_edit(settings: Settings) -> Settings:
    """Without an edit's record of its inputs (a --from-png of an edited image): other commands
    neither read them (Qwen-Image-Edit's text encoder would) nor record them."""
    return replace(settings, edit_images=None, edit_mask=None) if settings.edit_images else settings


def generate(settings: Settings, options: RunOptions, slot: ModelSlot | None = None) -> Iterator[render.Result]:
    """Render options.num_images images; image i uses seed + i. Yields each as it is saved."""
    options.validate()
    yield from _run(settings, options, None, slot)


def png_info(path: Path) -> dict:
    """What an image was made with: the A1111 text and the parsed settings. A record ldm cannot
    use is still shown where it has A1111's text, with a `problem` naming what is bad."""
    chunks = images.read_text_chunks(path)
    try:
        settings = render.settings_from_png(path)
        render.check_recorded(path, settings, set())
    except LdmError as e:
        if "parameters" not in chunks:
            raise
        return {"parameters": chunks["parameters"], "problem": str(e)}
    return {"parameters": chunks.get("parameters") or settings.to_infotext(""), **settings.to_dict()}


def checkpoint_info(path: Path, config: str | None = None, allow_pickle: bool = False,
                    variant: str | None = None) -> dict:
    """What a checkpoint holds: family, prediction, native size, component sizes, dtype, hash, EMA."""
    from ldm_cli.loading import info

    files.check_openable(Path(path).expanduser(), folders=True)  # a FIFO would hang: refused before the imports
    return info.describe(path, config, allow_pickle, variant)


# -- img2img, inpaint, outpaint: the same run, starting from an image ---------------------------
@dataclass
class Upload:
    """An image sent in a request (ldm serve) rather than read from a file."""
    data: bytes
    name: str  # how messages name it, e.g. "init_images[0]"


def _named(source: Path | Upload) -> str:
    return source.name if isinstance(source, Upload) else repr(str(source))


def _read(source: Path | Upload, mode: str = "RGB") -> Image.Image:
    if isinstance(source, Upload):
        return images.decoded(source.data, mode, source.name)
    return images.load_image(source, mode)


def _with_init_image(settings: Settings, source: Path | Upload) -> tuple[Image.Image, Settings]:
    """The init image, and the settings recording its hash (A1111's short form: 10 hex digits of sha256)."""
    import hashlib

    from ldm_cli import hashing

    image = _read(source)
    images.check_min_size(image.size, _named(source))
    digest = hashlib.sha256(source.data).hexdigest() if isinstance(source, Upload) else hashing.sha256_file(source)
    return image, settings.merged(init_image_hash=digest[:10])


def _sized_to(settings: Settings, image: Image.Image, what: str) -> Settings:
    """Render at the image's own size (rounded down to the model's size multiple: 8, or 16 for
    SD3) unless a size is asked for."""
    from ldm_cli import loading

    width, height = images.rounded_down(image.size, loading.size_multiple(settings.model))
    out = settings.merged(width=settings.width or width, height=settings.height or height)
    out.validate()  # a huge image is refused before the model loads, as a huge --width is
    if (out.width, out.height) != image.size:
        note(f"{what} is {image.width}x{image.height}; resizing it to {out.width}x{out.height}"
             + images.enlargement(image.size, (out.width, out.height)))
    return out


def _steps_run(s: Settings, family) -> int:
    from ldm_cli import strength

    return strength.steps_run(s, family)


def _run(settings: Settings, options: RunOptions, make, slot: ModelSlot | None = None) -> Iterator[render.Result]:
    """Load the model and render options.num_images images with `make` (None: text to image);
    image i uses seed + i."""
    from ldm_cli.progress import Progress

    if options.out is not None:
        images.check_writable(options.out)
    settings = with_lora_flags(not_an_edit(settings), options)
    model = load_model(settings, options, slot)
    from ldm_cli import hires  # imports torch: after the model's files have started loading

    s = render.resolved(settings, model)
    jobs = render.per_image(s, options.num_images)
    # text to image runs them all (and hires fix's second pass); img2img what its strength keeps
    steps = hires.steps(s) if make is None else _steps_run(s, model.family)
    with Progress(steps * len(jobs), len(jobs), options.quiet, watch=options.watch) as progress:
        yield from render.render(model, jobs, options.batch_size, options.out, progress, make)


def img2img(settings: Settings, image: Path | Upload, options: RunOptions,
            slot: ModelSlot | None = None) -> Iterator[render.Result]:
    """Redraw `image` after the prompt, as much as settings.strength says."""
    from ldm_cli import img2img as flow

    options.validate()
    init, s = _with_init_image(flow.with_defaults(settings), image)
    s = _sized_to(s, init, _named(image))

    def make(model, group, on_step):
        return flow.image_to_image(model, group, [init] * len(group), on_step)
    yield from _run(s, options, make, slot)


def _inpaint(s: Settings, init: Image.Image, mask: Image.Image, what: str,
             options: RunOptions, slot: ModelSlot | None = None) -> Iterator[render.Result]:
    from ldm_cli import inpaint as flow

    if not s.only_masked:  # --only-masked renders at the model's size, the picture keeps its own
        s = _sized_to(s, init, what)

    def make(model, group, on_step):
        return flow.inpaint(model, group, [init] * len(group), [mask] * len(group), on_step)
    yield from _run(s, options, make, slot)


def inpaint(settings: Settings, image: Path | Upload, mask: Path | Upload, options: RunOptions,
            slot: ModelSlot | None = None) -> Iterator[render.Result]:
    """Repaint the white part of `mask` in `image`."""
    from ldm_cli import inpaint as flow

    options.validate()
    init, s = _with_init_image(flow.with_defaults(settings), image)
    what = f"the mask {_named(mask)}" if isinstance(mask, Path) else mask.name
    loaded_mask = _read(mask, "L")
    images.check_min_size(loaded_mask.size, what)
    flow.check_mask(loaded_mask, init.size, what)
    yield from _inpaint(s, init, loaded_mask, _named(image), options, slot)


def outpaint(settings: Settings, image_path: Path, margins: tuple[int, int, int, int],
             options: RunOptions) -> Iterator[render.Result]:
    """Grow the image by margins (left, top, right, bottom) pixels and paint the new border. Unless
    --only-masked, the margins grow so the canvas is a multiple of 8 a side, and a size asked
    scales the whole canvas (inpaint.canvas_render_size): the picture is never distorted."""
    from ldm_cli import inpaint as flow

    options.validate()
    image, s = _with_init_image(flow.with_defaults(settings), image_path)
    if not s.only_masked:  # the whole canvas renders: never cropped or stretched to fit the model
        from ldm_cli import loading

        multiple = loading.size_multiple(s.model)
        margins = _canvas_margins(image.size, margins, multiple)
        size = flow.canvas_render_size(flow.canvas_size(image.size, margins), s.width, s.height, multiple)
        s = s.merged(width=size[0], height=size[1])
    canvas, mask = flow.extend(image, *margins)
    yield from _inpaint(s, canvas, mask, "the extended canvas", options)


def _canvas_margins(size: tuple[int, int], margins: tuple[int, int, int, int],
                    multiple: int) -> tuple[int, int, int, int]:
    """The margins grown to make the canvas a multiple of `multiple` a side, said when that changes them."""
    from ldm_cli import inpaint as flow

    grown = flow.grown_margins(size, margins, multiple)
    if grown != margins:
        changed = [f"--{side} {new} (asked {old})" for side, new, old
                   in zip(("left", "top", "right", "bottom"), grown, margins) if new != old]
        note(f"outpaint margins grown so each side of the canvas is a multiple of {multiple} "
             f"(as the model needs): {', '.join(changed)}")
    return grown


# -- edit: an image changed by instruction, with reference images --------------------------------
def edit(settings: Settings, image_path: Path | None, references: list[Path], options: RunOptions,
         mask_path: Path | None = None) -> Iterator[render.Result]:
    """Edit the image at image_path as the prompt says, the reference images beside it (None:
    the images a --from-png edit recorded, found unchanged), only where the mask at mask_path is
    white if given; the model decides how (its family's Editing) and refuses in one line if it cannot."""
    from ldm_cli import edit as flow
    from ldm_cli import edit_inputs
    from ldm_cli.progress import Progress

    options.validate()
    if settings.controlnet:
        raise LdmError("--controlnet does not work with edit; the input images steer the edit")
    if image_path is None and references:
        raise LdmError("--reference needs an IMAGE to edit beside it")
    paths = [image_path, *references] if image_path is not None else edit_inputs.found(
        edit_inputs.from_text(settings.edit_images))
    if image_path is None and mask_path is None and settings.edit_mask:  # replayed with the inputs it went with
        recorded = edit_inputs.found(edit_inputs.from_text(settings.edit_mask, "the recorded edit_mask"), mask=True)
        if len(recorded) != 1:
            raise LdmError(f"the recorded edit_mask holds {len(recorded)} images, not one")
        mask_path = recorded[0]
    if not paths:
        raise LdmError("an IMAGE to edit is required (or --from-png of an image `ldm edit` made)")
    first, s = _with_init_image(settings, paths[0])
    inputs = [first]
    for path in paths[1:]:
        inputs.append(images.load_image(path))
        images.check_min_size(inputs[-1].size, f"the reference {str(path)!r}")
    s = replace(s, edit_images=edit_inputs.to_text([edit_inputs.recorded(p) for p in paths]),
                edit_mask=mask_path and edit_inputs.to_text([edit_inputs.recorded(mask_path)]))
    mask = _edit_mask(mask_path, first)
    if mask is not None:  # inpaint's strength and mask blur (not --only-masked: the edit sees the whole image)
        from ldm_cli import inpaint

        s = inpaint.with_defaults(replace(s, only_masked=False, padding=None))
    flow.check_model(s.model, s.variant)  # before the weights load
    images.check_writable(options.out)
    s = with_lora_flags(s, options)
    model = load_model(s, options)
    hook = flow.editing(model)
    flow.check_count(hook, len(inputs))
    asked = s.width is not None and s.height is not None
    s = flow.with_defaults(s, hook, [im.size for im in inputs], model.size_multiple, masked=mask is not None)
    s.validate()
    if not asked:
        note(f"editing at {s.width}x{s.height} ({hook.label}'s size for the input's aspect; --width/--height to choose)")
    s = render.resolved(s, model)
    jobs = render.per_image(s, options.num_images)

    def make(model, group, on_step):
        return flow.run(model, group, [inputs] * len(group), None if mask is None else [mask] * len(group), on_step)
    steps = s.steps if mask is None else _steps_run(s, model.family)
    with Progress(steps * len(jobs), len(jobs), options.quiet) as progress:
        yield from render.render(model, jobs, options.batch_size, options.out, progress, make)


def _edit_mask(path: Path | None, image: Image.Image) -> Image.Image | None:
    """--mask's image, checked as inpaint checks it (the image's shape, something white)."""
    if path is None:
        return None
    from ldm_cli import inpaint

    mask = images.load_image(path, "L")
    images.check_min_size(mask.size, f"the mask {str(path)!r}")
    inpaint.check_mask(mask, image.size, f"the mask {str(path)!r}")
    return mask


# -- batch: a prompts file ------------------------------------------------------------------------
def batch(path: Path, defaults: Settings, options: RunOptions, grid: bool = False) -> Iterator[render.Result]:
    """Render the images of the prompts file at `path` that options.out's manifest does not hold
    yet; `defaults` fill what a line leaves out. Yields each image as it is saved."""
    from ldm_cli import batch as batching
    from ldm_cli import prompts_file
    from ldm_cli.networks import lookup

    options.validate()
    if defaults.model:
        model = Path(defaults.model).expanduser().absolute()
        if not model.exists():
            raise LdmError(f"model not found: {str(model)!r}; pass a .safetensors file or a diffusers folder with --model")
        defaults = defaults.merged(model=str(model))
    defaults.validate()
    lookup.check_folders(options.networks)
    upscalers: set[str] = set()  # each found once, not once a line
    jobs = prompts_file.read(path, defaults, options.num_images, lambda job: _line_files(job, options, upscalers))
    _check_model_files(jobs, options)
    images.check_writable(options.out)
    yield from batching.run(jobs, options, path.stem if grid else None)


def _check_model_files(jobs: list, options: RunOptions) -> None:
    """Every model the file names, with the --vae and --text-encoder files, passes the check each
    load makes, before the first model loads: a bad second model is no error after hours."""
    from ldm_cli import loading

    for source in dict.fromkeys(job.settings.model for job in jobs):
        loading.check(loading.source_path(source), options.load)


def _line_files(job, options: RunOptions, upscalers_found: set[str]) -> Settings:
    """A prompts-file line's --lora tags added, its LoRAs and hires upscaler model found, an edit
    line's model and inputs checked, before any model loads."""
    from ldm_cli import batch as batching
    from ldm_cli.networks import lookup

    settings = with_lora_flags(batching.edit_settings(job) if job.edit else job.settings, options)
    lookup.check_loras(settings, options.networks)
    if settings.hires_upscaler not in upscalers_found:
        check_upscaler(settings)
        upscalers_found.add(settings.hires_upscaler)
    return settings


# -- upscale: finished images through an upscaler, no model of ldm's own ---------------------------

@dataclass
class UpscaleOptions:
    upscaler: str
    scale: float | None = None  # None: the model's own (unless resize)
    resize: str | None = None  # "WxH": covered, then cropped to it (A1111's "Scale to", crop to fit)
    tile: int = upscaling.TILE
    overlap: int = upscaling.OVERLAP
    out: Path = Path("outputs")
    models_dir: str | None = None
    device: str = "auto"
    quiet: bool = False

    def validate(self) -> None:
        if self.scale is not None and self.resize is not None:
            raise LdmError("give --scale or --resize, not both")
        if self.scale is None and self.resize is None and self.upscaler in upscaling.RESIZERS:
            raise LdmError(f"--scale or --resize is needed with --upscaler {self.upscaler} (a model's default is "
                           "its own scale)")
        self.box()
        if self.scale is not None and not 1 <= self.scale <= limits.MAX_UPSCALE:
            raise LdmError(f"--scale must be between 1 and {limits.MAX_UPSCALE} (got {self.scale:g})")
        if not limits.MIN_TILE <= self.tile <= limits.MAX_TILE:
            raise LdmError(f"--tile must be between {limits.MIN_TILE} and {limits.MAX_TILE} pixels (got {self.tile})")
        if not 0 <= self.overlap <= self.tile // 2:
            raise LdmError(f"--tile-overlap must be between 0 and half the tile, {self.tile // 2} (got {self.overlap})")

    def box(self) -> tuple[int, int] | None:
        """--resize as (width, height)."""
        if self.resize is None:
            return None
        parts = self.resize.lower().split("x")
        if len(parts) != 2 or not all(p.strip().isdigit() and 1 <= int(p) <= limits.MAX_SIDE for p in parts):
            raise LdmError(f"--resize must be WIDTHxHEIGHT, each 1 to {limits.MAX_SIDE}, such as 2048x1536 "
                           f"(got {self.resize!r})")
        return int(parts[0]), int(parts[1])


@dataclass
class Upscaled:
    path: Path
    source: Path
    size: tuple[int, int]
    upscaler: str

    def to_dict(self) -> dict:
        return {"path": str(self.path), "source": str(self.source), "width": self.size[0], "height": self.size[1],
                "upscaler": self.upscaler}


def upscale(paths: list[Path], options: UpscaleOptions) -> Iterator[Upscaled]:
    """Each image through the upscaler to scale x its size, saved with its text chunks and A1111's
    `postprocessing` record; every file and size is checked before the model loads."""
    from ldm_cli.progress import Progress

    options.validate()
    if not 1 <= len(paths) <= MAX_IMAGES:
        raise LdmError(f"give between 1 and {MAX_IMAGES} images to upscale (got {len(paths)})")
    sizes = [_source_size(path) for path in paths]
    images.check_writable(options.out)
    upscaler = upscaling.load(options.upscaler, options.models_dir, options.device)
    scale, box = options.scale or upscaler.scale, options.box()
    targets = [_upscaled_size(path, size, scale, box) for path, size in zip(paths, sizes)]
    tiles = sum(_tiles(size, target, upscaler, options) for size, target in zip(sizes, targets))
    with Progress(tiles, len(paths), options.quiet, unit="tile") as progress:
        for path, target in zip(paths, targets):
            image = upscaling.upscale(upscaler, images.load_image(path), target, tile=options.tile,
                                      overlap=options.overlap, at_least=1, on_tile=progress.step,
                                      on_halved=progress.grow)
            image = upscaling.cropped(image, box) if box else image
            chunks = upscaling.metadata(images.read_text_chunks(path), upscaler, None if box else scale, box)
            progress.image_done()
            yield Upscaled(images.save_png(image, options.out, path.stem, chunks), path, image.size, upscaler.name)


def _source_size(path: Path) -> tuple[int, int]:
    try:
        return images.image_size(path)
    except FileNotFoundError:
        raise LdmError(f"no such file: {str(path)!r}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise LdmError(f"{str(path)!r} is not a readable image ({e})") from None


def _upscaled_size(path: Path, size: tuple[int, int], scale: float, box: tuple[int, int] | None) -> tuple[int, int]:
    """What the upscaler makes of an image of `size`: scale x its size, or covering `box`."""
    target = upscaling.cover(size, box) if box else (int(size[0] * scale), int(size[1] * scale))
    if max(target) > limits.MAX_SIDE or target[0] * target[1] > limits.max_upscale_pixels():
        raise LdmError(f"{str(path)!r} upscaled would be {target[0]}x{target[1]}, more than ldm writes "
                       f"({limits.MAX_SIDE} a side, {limits.max_upscale_pixels():,} pixels; {limits.MAX_PIXELS_ENV} "
                       "raises the second); use a smaller --scale or --resize")
    return target


def _tiles(size: tuple[int, int], target: tuple[int, int], upscaler, options: UpscaleOptions) -> int:
    """Tiles the upscale of one image runs (planned: out-of-memory halving adds some)."""
    from ldm_cli import tiling

    if upscaler.model is None:
        return 0
    count = 0
    for _ in range(upscaling.passes(size, target, upscaler.scale, at_least=1)):
        count += tiling.count(size, options.tile, options.overlap)
        size = (size[0] * upscaler.scale, size[1] * upscaler.scale)
    return count
