"""From resolved settings to saved PNGs: batching, saving with metadata, reporting results."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from ldm_cli import __version__, control_units, images, schedulers, untrusted_json
from ldm_cli.errors import LdmError
from ldm_cli.settings import LABELS, SAMPLER_OPTIONS, BadSetting, Settings, flag_name

METADATA_KEY = "ldm"  # our own chunk: the settings as JSON, for an exact --from-png


@dataclass
class Result:
    path: Path | None  # None: kept in memory (ldm serve), as `image`
    settings: Settings
    image: Image.Image | None = None

    def to_dict(self) -> dict:
        return {"path": str(self.path), **self.settings.to_dict()}


def metadata(settings: Settings) -> dict[str, str]:
    return {"parameters": settings.to_infotext(__version__), METADATA_KEY: settings.to_json()}


def save(image: Image.Image, settings: Settings, folder: Path) -> Result:
    return Result(images.save_png(image, folder, str(settings.seed), metadata(settings)), settings)


def png_bytes(result: Result) -> bytes:
    """A kept image as the PNG `save` writes: the same pixels and metadata."""
    return images.png_bytes(result.image, metadata(result.settings))


def settings_from_png(path: Path) -> Settings:
    """The settings an image was made with: ours exactly, or parsed from A1111's text. A value of
    the wrong type is an error naming the PNG and the field; `check_recorded` checks the ranges."""
    chunks = images.read_text_chunks(path)
    try:
        ours = ldm_chunk(chunks, path)
    except LdmError:
        if "parameters" not in chunks:
            raise
        ours = None  # A1111's text says the same, and is read instead
    if ours is not None:
        try:
            return Settings.from_dict(ours)
        except BadSetting as e:
            raise LdmError(e.named(f'the "{e.field}" in the {METADATA_KEY} metadata of {str(path)!r}')) from None
    if "parameters" not in chunks:
        raise LdmError(f"{str(path)!r} has no generation parameters (no A1111 'parameters' text chunk)")
    try:
        return Settings.from_infotext(chunks["parameters"])
    except BadSetting as e:
        raise LdmError(e.named(f"the {LABELS[e.field]} recorded in {str(path)!r}")) from None


def ldm_chunk(chunks: dict[str, str], path: Path) -> dict | None:
    """Our JSON chunk as a dict (None when absent); an error naming the PNG when it is not a
    JSON object ldm reads (too large, too deep, malformed)."""
    if METADATA_KEY not in chunks:
        return None
    data = untrusted_json.loads(chunks[METADATA_KEY], f"the {METADATA_KEY} metadata of {str(path)!r}")
    if not isinstance(data, dict):
        raise LdmError(f"the {METADATA_KEY} metadata of {str(path)!r} is not a JSON object")
    return data


def check_recorded(path: Path, recorded: Settings, overridden: set[str]) -> None:
    """Validate what the PNG at `path` recorded, except the fields in `overridden` (flags given on
    top): a bad value is named as the PNG's field, with the flag that overrides it."""
    kept = dataclasses.replace(recorded, **{k: None for k in overridden})
    try:
        kept.validate()
    except BadSetting as e:
        size = LABELS.get(e.field) == "Size"
        flags = "--width and --height" if size else "a prompt of your own" if e.field == "prompt" else flag_name(e.field)
        raise LdmError(e.named(f"the {LABELS.get(e.field, e.field)} recorded in {str(path)!r}",
                               f"{recorded.width}x{recorded.height}" if size else None,
                               f"; override it with {flags}" + (e.hint if e.field == "size" else ""))) from None
    except LdmError as e:  # a scheduler or ControlNet record no flag names
        raise LdmError(f"{str(path)!r} records settings ldm cannot use: {e}") from None


def resolved(settings: Settings, model) -> Settings:
    """The settings completed for the loaded model (its defaults, name, hash and modules) and
    checked against its sampler, LoRAs and embeddings, whose hashes they record."""
    from ldm_cli import hires, pipeline

    defaults = model.defaults if model.networks is None else {
        **model.defaults, **model.networks.few_step_defaults(settings.prompt)}  # a LoRA made for few steps
    out = settings.resolve(defaults, model.native_size, model.train_timesteps)
    if model.family.flow:  # churn raises a VE model's noise: on a flow model neither run nor recorded
        out = out.merged()
        for name in SAMPLER_OPTIONS:
            if name not in schedulers.flow_takes(out.scheduler):
                setattr(out, name, None)
        if out.schedule == "simple":  # Forge's label of a flow model's own spacing
            out.schedule = "default"
    pipeline.check_steps(model, out)
    hires.check(model, out)
    out.model_name, out.model_hash = model.name, model.hash
    out.model = model.path
    out.modules = ", ".join(model.modules) or None
    if model.refiner is not None:
        out.refiner_name, out.refiner_hash, out.refiner = model.refiner.name, model.refiner.hash, model.refiner.path
    else:  # what ran, only
        out.refiner = out.refiner_name = out.refiner_hash = out.refiner_switch_at = None
    _check_negative_used(out)
    if out.controlnet:  # the ControlNets' names and hashes, the control images checked
        from ldm_cli.loading import controlnet

        out.controlnet = control_units.to_text([controlnet.recorded(u) for u in control_units.from_text(out.controlnet)])
    if model.networks is not None:  # the LoRAs and embeddings fit the model; their hashes recorded
        out = model.networks.resolve(out)
    return out


def _check_negative_used(s: Settings) -> None:
    """At --cfg 1 no negative pass runs (FLUX's default: dev steers by --guidance instead)."""
    from ldm_cli import conditioning
    from ldm_cli.notes import note_once

    if s.negative and not conditioning.uses_negative(s):
        note_once("the negative prompt is unused at --cfg 1, which runs no negative pass; "
                  "give --cfg above 1 for real classifier-free guidance")


def encode_first(settings: Settings, model, count: int, batch_size: int) -> None:
    """The run's first batch's prompts encoded into model.prepared, where conditioning.py finds
    them (called while the model's denoiser is still being read, loading's `early`)."""
    from ldm_cli import conditioning, pipeline

    first = next(batches(per_image(resolved(settings, model), count), batch_size, pipeline.batch_key))
    conditioning.encode(model, first, model.prepared)


def per_image(base: Settings, count: int) -> list[Settings]:
    """Image i of a run uses seed + i."""
    return [base.merged(seed=base.seed + i) for i in range(count)]


def batches(jobs: list[Settings], batch_size: int, key: Callable[[Settings], tuple]) -> Iterator[list[Settings]]:
    """Consecutive jobs that can share a denoiser batch, at most batch_size at a time."""
    for _, run in groupby(jobs, key=key):
        run = list(run)
        for i in range(0, len(run), batch_size):
            yield run[i:i + batch_size]


def render(model, jobs: list[Settings], batch_size: int, folder: Path | None, progress,
           make: Callable | None = None) -> Iterator[Result]:
    """`make(model, group, on_step)` renders one batch; text-to-image (with hires fix where the
    settings ask) unless given (img2img, inpaint). Each image is saved in `folder`, or with folder
    None kept in memory in its Result."""
    from ldm_cli import ahead, hires, pipeline

    make = make or hires.text_to_image
    planned = list(batches(jobs, batch_size, pipeline.batch_key))
    model.encoded = ahead.Ahead(model, hires.planned(model, planned))
    for group in planned:
        pictures = make(model, group, on_step=progress.step)
        for picture, settings in zip(pictures, group):
            yield save(picture, settings, folder) if folder is not None else Result(None, settings, picture)
        progress.image_done(len(group))
