"""What each command does, as plain functions of plain values; cli.py only parses and prints."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

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
