"""`ldm batch`: render every image of a prompts file, resumably, in one or many processes.

The file's images are listed in one order that every process computes alike (grouped by model,
so each model loads once per process). Images the manifest already holds are dropped; of the
rest, process r of n renders every n-th one from r. Within a process, images that can share a
denoiser batch (same mode, size, steps, cfg, scheduler, strength) are rendered together, up to
--batch-size, whatever their lines. Each image is saved (atomically) and then recorded in the
manifest before the next batch starts; the main process merges the manifest parts and draws the
contact sheets once every process is done.

Separate runs may share the output folder (two `ldm batch` commands started at once): a process
renders an image only while it holds the image's claim (claims.py), leaves images that another
live run holds to it, and at the end waits for those, rendering any that run left unfinished.

Run alone it is one process. Under `accelerate launch` (or torchrun) accelerate's PartialState
says which process this is; it is only asked for the process index and count and a barrier.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import timedelta
from functools import lru_cache
from itertools import groupby
from pathlib import Path
from typing import Callable, Iterator

from PIL import Image

from ldm_cli import claims, images, render
from ldm_cli.errors import LdmError
from ldm_cli.manifest import Manifest
from ldm_cli.prompts_file import Job
from ldm_cli.settings import Settings
from ldm_cli.stopping import signals_held

# The main process waits at the end for the slowest process, which may take hours; the default
# 30-minute barrier timeout would kill a long run.
BARRIER_TIMEOUT = timedelta(days=30)
GRID_KEY = "ldm-grid"  # a contact sheet's text chunk: the images it shows, to know when it is stale


@dataclass(frozen=True)
class Task:
    """Image `index` of the job on line `job.line`, made with `settings` (seed + index)."""
    job: Job
    index: int
    settings: Settings

    def identity(self, settings: Settings | None = None) -> dict:
        """What makes this image: a manifest record agreeing with it means the image is done.
        Before a model loads it holds what the file and the flags say (a record made with the
        model's defaults agrees with it); with the resolved `settings`, every setting."""
        paths = {k: str(v) for k, v in (("init_image", self.job.init_image), ("mask", self.job.mask)) if v}
        return {"line": self.job.line, "index": self.index, **(settings or self.settings).to_dict(), **paths}


def tasks(jobs: list[Job]) -> list[Task]:
    """Every image of the file, grouped by model, models in the order the file first names them."""
    every = [Task(job, i, s) for job in jobs for i, s in enumerate(render.per_image(job_settings(job), job.count))]
    return neighbours(every, key=lambda t: (t.settings.model, t.settings.refiner, t.settings.variant))


def neighbours(items: list, key: Callable) -> list:
    """`items` with equal keys made neighbours: groups in the order their keys first appear,
    items in their own order within."""
    groups: dict = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return [item for group in groups.values() for item in group]


def job_settings(job: Job) -> Settings:
    """An img2img or inpaint job's settings completed before any model loads: the mode's
    defaults, the init image's hash, and the image's own size unless a size is given."""
    if job.mode == "txt2img":
        return job.settings
    if job.edit:
        return edit_settings(job)
    from ldm_cli import img2img, inpaint

    s = (inpaint if job.mode == "inpaint" else img2img).with_defaults(job.settings)
    s = s.merged(init_image_hash=init_image_hash(job.init_image))
    if not s.only_masked:  # --only-masked renders at the model's size and pastes back
        from ldm_cli import loading

        width, height = images.rounded_down(images.image_size(job.init_image), loading.size_multiple(s.model))
        s = s.merged(width=s.width or width, height=s.height or height)
    return s


def edit_settings(job: Job) -> Settings:
    """An edit line's settings as `ldm edit` completes them, before any model loads (edit.py)."""
    from ldm_cli import edit

    return edit.line_settings(job.settings, job.inputs, job.mask, init_image_hash)


def init_image_hash(path: Path) -> str:
    stat = path.stat()
    return _hash(path, stat.st_size, stat.st_mtime_ns)


@lru_cache(maxsize=256)  # keyed by size and time too: a file rewritten in place is hashed again
def _hash(path: Path, size: int, mtime_ns: int) -> str:
    from ldm_cli import hashing

    return hashing.sha256_file(path)[:10]  # A1111's short form, as `ldm img2img` records it


def run(jobs: list[Job], options, grid_name: str | None = None) -> Iterator[render.Result]:
    """Render the images of `jobs` that options.out's manifest does not hold; yields each as
    it is saved. `grid_name`: also write a contact sheet per line, named after it."""
    state = distributed_state(options.load.device)
    rank, world, main = state.process_index, state.num_processes, state.is_main_process
    if main:
        prepare(options.out, world)
        if grid_name:
            grids_folder(options.out)  # refused before the first image, not after the last
    manifest = Manifest(options.out, rank, world)
    every = tasks(jobs)
    todo = [t for t in every if manifest.find(t.identity()) is None]
    state.wait_for_everyone()  # every process has read the manifest before any adds to it
    if main:
        say(options, f"{len(every)} images from {len(jobs)} lines: {len(every) - len(todo)} already in "
                     f"{options.out}, {len(todo)} to render" + (f" by {world} processes" if world > 1 else ""))
    with FileProgress(len(every), len(every) - len(todo), manifest, options.quiet or not main) as progress:
        for (source, refiner, _), group in groupby(todo[rank::world], key=lambda t: (
                t.settings.model, t.settings.refiner, t.settings.variant)):
            yield from render_model(source, list(group), manifest, options, progress, refiner)
    state.wait_for_everyone()
    if main:
        say(options, f"manifest: {manifest.merge()}")
        if grid_name:
            write_grids(jobs, Manifest(options.out), options.out, grid_name)


def prepare(folder: Path, world: int) -> None:
    images.remove_stale_temporaries(folder)
    claims.remove_free(folder)
    if world == 1 and "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ:
        # `accelerate launch --cpu --num_processes N` without an MPI setup starts one process
        print("ldm batch: warning: the launcher started this process only; for several CPU processes use "
              "`accelerate launch --multi_gpu --num_processes N -m ldm_cli batch ... --device cpu`", file=sys.stderr)


def distributed_state(device: str):
    """accelerate's view of the launch: this process's index, the number of processes (1 when
    not launched), and a barrier. On CPUs the processes talk over gloo."""
    import torch
    from accelerate import PartialState

    cpu = device == "cpu" or (device == "auto" and not torch.cuda.is_available())
    return PartialState(cpu=cpu, timeout=BARRIER_TIMEOUT)


def say(options, message: str) -> None:
    if not options.quiet:
        print(f"ldm batch: {message}", file=sys.stderr, flush=True)


def render_model(source: str | None, group: list[Task], manifest: Manifest, options,
                 progress: FileProgress, refiner: str | None = None) -> Iterator[render.Result]:
    """Load one model and render `group`, which all use it, in shared batches. Images that
    another run sharing the folder has claimed are left to it, and waited for at the end."""
    from ldm_cli import ahead, hires

    without_t5 = all(task.settings.no_t5 for task in group)  # then SD3's T5 is not even read
    options = replace(options, load=replace(options.load, variant=group[0].settings.variant))  # one a group
    model = loaded(source, options, without_t5, refiner)
    pending = [(task, line_resolved(task, model)) for task in group]
    while pending:
        if not model.text_encoders:  # freed by the pass before; a run that held images ended without them
            model = None  # its memory back before the new copy loads
            model = loaded(source, options, without_t5, refiner)
        planned = list(render.batches(by_lora_set(pending), options.batch_size, key=batch_key))
        model.encoded = ahead.Ahead(model, hires.planned(model, [[settings for _, settings in batch] for batch in planned]))
        theirs = []
        for batch in planned:
            with claimed(batch, manifest, options.out) as (mine, held):
                theirs += held
                yield from render_batch(model, mine, manifest, options, progress)
        pending = left_after_waiting(theirs, manifest, options)


def loaded(source: str | None, options, without_t5: bool = False, refiner: str | None = None):
    from ldm_cli import loading
    from ldm_cli.networks import session

    model = loading.load(source, replace(options.load, without_t5=without_t5))
    if refiner:
        from ldm_cli import refiner as refiners

        refiners.attach(model, refiner, options.load)
    session.attach(model, options.networks, source)
    return model


def line_resolved(task: Task, model) -> Settings:
    """The task's settings completed for the loaded model; an error (a LoRA or an embedding
    that does not fit this model) names the line, and comes before any image of the model."""
    try:
        return render.resolved(task.settings, model)
    except LdmError as e:
        raise LdmError(f"line {task.job.line}: {e}") from None


def by_lora_set(pending: list[tuple[Task, Settings]]) -> list[tuple[Task, Settings]]:
    """Images grouped by their LoRA set first, then by what can share a batch, so each set is
    merged into the model once."""
    from ldm_cli.networks import session

    return neighbours(neighbours(pending, batch_key), key=lambda item: session.lora_key(item[1].prompt))


def render_batch(model, batch: list[tuple[Task, Settings]], manifest: Manifest, options,
                 progress: FileProgress) -> Iterator[render.Result]:
    from ldm_cli import control_units

    if not batch:
        return
    with lines_named(batch):
        steps = steps_run(batch[0][0].job, batch[0][1], model.family)
        units = control_units.from_text(batch[0][1].controlnet)  # a batch shares its units
        if units or model.controls:  # ControlNet code is imported only for a file that asks for one
            from ldm_cli.loading import controlnet

            controlnet.attach(model, units)
        pictures = draw(model, batch, progress.batch(len(batch), steps))
        for picture, (task, settings) in zip(pictures, batch):
            with signals_held():  # an image saved is an image recorded
                result = render.save(picture, settings, options.out)
                recorded(result, {"path": result.path.name, **task.identity(settings),
                                  "base_seed": task.job.settings.seed}, manifest)
            yield result
    progress.batch_done()


@contextmanager
def lines_named(batch: list[tuple[Task, Settings]]) -> Iterator[None]:
    """An error while rendering `batch` names its lines; what earlier batches saved stays recorded."""
    try:
        yield
    except LdmError as e:
        lines = sorted({task.job.line for task, _ in batch})
        raise LdmError(f"line{'s' * (len(lines) > 1)} {', '.join(map(str, lines))}: {e}") from None


def recorded(result: render.Result, record: dict, manifest: Manifest) -> None:
    """Record a saved image; one that cannot be (a full disk) is removed, since a rerun, finding no
    record, would render it again beside it."""
    try:
        manifest.add(record)
    except LdmError:
        result.path.unlink(missing_ok=True)
        raise


def identity(item: tuple[Task, Settings]) -> dict:
    return item[0].identity(item[1])


@contextmanager
def claimed(batch: list[tuple[Task, Settings]], manifest: Manifest,
            folder: Path) -> Iterator[tuple[list, list]]:
    """(the items of `batch` this process claimed and nobody has finished, those another live
    process holds); the claims are let go on leaving."""
    held: list[tuple[tuple, claims.Claim | None]] = []
    try:
        for item in batch:
            held.append((item, claims.take(folder, identity(item))))
        manifest.refresh()  # another run may have finished some since this one read the manifest
        yield ([item for item, claim in held if claim and manifest.find(identity(item)) is None],
               [item for item, claim in held if claim is None])
    finally:
        for _, claim in held:
            if claim:
                claim.release()


def left_after_waiting(theirs: list[tuple[Task, Settings]], manifest: Manifest, options) -> list:
    """Of the images other runs were rendering, those still missing once the first is let go:
    a holder that ended without finishing its images leaves them to this run."""
    if not theirs:
        return []
    say(options, f"waiting for {claims.holder(options.out, identity(theirs[0]))}, which is rendering "
                 f"images of this file into {options.out}")
    claims.wait(options.out, identity(theirs[0]))
    manifest.refresh()
    return [item for item in theirs if manifest.find(identity(item)) is None]


def batch_key(item: tuple[Task, Settings]) -> tuple:
    from ldm_cli import pipeline

    job = item[0].job
    # an edit's inputs condition every row alike in size (and its text encoder may read them)
    return (job.mode, pipeline.batch_key(item[1]), item[1].edit_images if job.edit else None, job.mask is not None)


def steps_run(job: Job, s: Settings, family=None) -> int:
    if job.mode == "txt2img" or (job.edit and not job.mask):
        from ldm_cli import hires

        return hires.steps(s)
    from ldm_cli import strength

    return strength.steps_run(s, family)


def draw(model, batch: list[tuple[Task, Settings]], on_step: Callable[[], None]) -> list[Image.Image]:
    from ldm_cli import hires, img2img, inpaint

    group = [settings for _, settings in batch]
    jobs = [task.job for task, _ in batch]
    if jobs[0].mode == "txt2img":
        return hires.text_to_image(model, group, on_step)
    if jobs[0].edit:
        return draw_edits(model, group, jobs, on_step)
    inits = read_once([job.init_image for job in jobs], "RGB")
    if jobs[0].mode == "img2img":
        return img2img.image_to_image(model, group, inits, on_step)
    return inpaint.inpaint(model, group, inits, read_once([job.mask for job in jobs], "L"), on_step)


def draw_edits(model, group: list[Settings], jobs: list[Job], on_step: Callable[[], None]) -> list[Image.Image]:
    from ldm_cli import edit

    read = iter(read_once([path for job in jobs for path in job.inputs], "RGB"))
    masks = read_once([job.mask for job in jobs], "L") if jobs[0].mask else None
    return edit.run(model, group, [[next(read) for _ in job.inputs] for job in jobs], masks, on_step)


def read_once(paths: list[Path], mode: str) -> list[Image.Image]:
    """The images at `paths`, each file read once (a line's images share theirs)."""
    read = {path: images.load_image(path, mode) for path in dict.fromkeys(paths)}
    return [read[path] for path in paths]


class FileProgress:
    """One bar over every image of the file: images done, rate, time left. Images finished by
    any process are counted from the manifest files; the batch being denoised moves the bar by
    steps. Only the main process draws it."""

    def __init__(self, total: int, done: int, manifest: Manifest, quiet: bool):
        from tqdm import tqdm

        self.manifest, self.finished, self.partial = manifest, done, 0.0
        self.done_before = done
        self.bar = tqdm(total=total, initial=done, unit="img", file=sys.stderr, disable=quiet, delay=1.0,
                        dynamic_ncols=True, leave=False,
                        bar_format="{l_bar}{bar}| {n:.0f}/{total_fmt} images [{elapsed}<{remaining}, {rate_fmt}]")

    def batch(self, images: int, steps: int) -> Callable[[], None]:
        """The step callback for a batch of `images`, each taking `steps` steps."""
        share = images / max(steps, 1)

        def on_step() -> None:
            self.partial = min(self.partial + share, images - 0.5)
            self._show()
        return on_step

    def batch_done(self) -> None:
        if self.bar.disable:
            return  # the other processes' manifest files are read for the bar only
        self.partial = 0.0
        self.finished = self.done_before + self.manifest.count_new()
        self._show()

    def _show(self) -> None:
        self.bar.update(self.finished + self.partial - self.bar.n)

    def __enter__(self) -> FileProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()


# -- contact sheets -----------------------------------------------------------------------------
def write_grids(jobs: list[Job], manifest: Manifest, folder: Path, name: str) -> None:
    """A contact sheet per line of two or more images, in `folder`/grids; rewritten only when the
    images it shows changed."""
    for job in (j for j in jobs if j.count > 1):
        records = [manifest.find(Task(job, i, s).identity())
                   for i, s in enumerate(render.per_image(job_settings(job), job.count))]
        if None in records:
            continue
        paths = [r["path"] for r in records]
        target = grids_folder(folder) / f"{name}-{job.line:05d}.png"
        if grid_sources(target) == paths:
            continue
        sheet = images.grid([images.load_image(folder / p) for p in paths])
        chunks = {"parameters": render.metadata(Settings.from_dict(records[0]))["parameters"],
                  GRID_KEY: json.dumps(paths)}
        images.replace_png(sheet, target, chunks)


def grids_folder(folder: Path) -> Path:
    """OUT/grids, unless something other than a folder is there: a link would have the sheets
    written wherever it leads."""
    grids = folder / "grids"
    if os.path.lexists(grids) and (grids.is_symlink() or not grids.is_dir()):
        raise LdmError(f"{str(grids)!r} is not a folder (a symbolic link or a file); --grid writes its contact "
                       "sheets there: remove or rename it")
    return grids


def grid_sources(path: Path) -> list[str] | None:
    if path.is_symlink() or not path.is_file():  # replaced, never read: a FIFO there would block
        return None
    try:
        with Image.open(path) as im:
            return json.loads(im.info.get(GRID_KEY, "null"))
    except (OSError, ValueError):
        return None
