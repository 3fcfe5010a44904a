"""ldm against diffusers' stock pipelines on one GPU, side by side in one run.

    python bench/gpu_speed.py                       # CUDA: SD1.5 at 512x512, SDXL at 1024x1024, 30 steps, fp16
    python bench/gpu_speed.py --tiny --device cpu   # tiny models at 64x64, 2 steps (the tests compile
                                                    # only SD1.5: --compile-models sd15)

Random weights in the real architectures (the configs shipped in ldm_cli/loading/configs); nothing
is downloaded. For each model, in this order, in one process (the fast path changes the modules in
place, so the stock pipeline runs first):
  stock    diffusers' StableDiffusionPipeline / StableDiffusionXLPipeline over the same modules,
           scheduler (DPM++ 2M Karras), dtype, prompt, cfg and seed
  plain    ldm's own pipeline without its fast path (what the CPU runs): ldm's loop against diffusers'
  default  the same with its default fast path on (ldm_cli/speed.py): what `ldm` runs on CUDA
  compile  the same with --compile (ldm_cli/compiling.py); its first image, compiling included,
           is reported apart
  fresh    a new `ldm generate --compile` process on the same model saved to disk, with the
           compile cache the in-process run filled: time to its first step and to its image
and, once, SD1.5 in fp32 (TF32 off; 512x512, 10 steps): stock against default, for the 2/255 parity goal.

Per variant: seconds per image (prompt to PIL image, median of --runs after warm-up), denoiser
it/s (between the first and last step callbacks, the device synchronised at both), peak GPU memory
(max allocated over the timed runs, weights included), the largest pixel difference from the stock
image, and host syncs inside ldm's loop (torch.cuda sync debug mode). The markdown table is
rewritten after each stage, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import random_models  # noqa: E402
from timing import bench_device, show, timed  # noqa: E402
from ldm_cli import compiling, hashing, pipeline, sampling, schedulers, speed  # noqa: E402
from ldm_cli.loading import quiet_libraries  # noqa: E402
from ldm_cli.model import Model  # noqa: E402
from ldm_cli.settings import Settings  # noqa: E402

PROMPT, NEGATIVE, CFG, SEED = "a red fox in snow, detailed", "blurry, low quality", 7.5, 1
SCHEDULER, SCHEDULE = "dpmpp_2m", "karras"


@dataclass(frozen=True)
class Spec:
    name: str  # as the table shows it
    family: str  # ldm family, and the folder of its shipped configs
    size: int
    steps: int
    tiny: bool = False


REAL = {"sd15": Spec("SD1.5", "sd1", 512, 30), "sdxl": Spec("SDXL", "sdxl", 1024, 30)}
TINY = {"sd15": Spec("SD1.5 (tiny)", "sd1", 64, 2, True), "sdxl": Spec("SDXL (tiny)", "sdxl", 64, 2, True)}


def stock_pipeline(model: Model):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    parts = dict(vae=model.vae, unet=model.denoiser, text_encoder=model.text_encoders[0], tokenizer=model.tokenizers[0],
                 scheduler=schedulers.build(SCHEDULER, SCHEDULE, model.scheduler_config))
    if model.family.name == "sdxl":
        pipe = StableDiffusionXLPipeline(text_encoder_2=model.text_encoders[1], tokenizer_2=model.tokenizers[1], **parts)
    else:
        pipe = StableDiffusionPipeline(safety_checker=None, feature_extractor=None, requires_safety_checker=False, **parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ldm_render(model: Model, spec: Spec):
    s = Settings(prompt=PROMPT, negative=NEGATIVE, steps=spec.steps, cfg=CFG, seed=SEED, width=spec.size,
                 height=spec.size, scheduler=SCHEDULER, schedule=SCHEDULE).resolve({}, model.native_size)
    return lambda on_step: pipeline.text_to_image(model, [s], on_step=on_step)[0]


def stock_render(pipe, spec: Spec):
    def render(on_step):
        def callback(p, i, t, kwargs):
            on_step()
            return kwargs
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=spec.steps, guidance_scale=CFG,
                    height=spec.size, width=spec.size, generator=torch.Generator("cpu").manual_seed(SEED),
                    callback_on_step_end=callback).images[0]
    return render


@dataclass
class Row:
    model: str
    variant: str
    seconds: float = float("nan")  # per image
    rate: float = float("nan")  # denoiser it/s
    peak_gib: float | None = None
    diff: int | None = None  # largest |pixel - stock pixel|, of 255
    mean_diff: float | None = None
    syncs: int | None = None  # host syncs inside ldm's loop, per image
    note: str = ""
    image: object = field(default=None, repr=False)


def measure(model_name: str, variant: str, render, device: torch.device, steps: int, runs: int, warmup: int) -> Row:
    for _ in range(warmup):
        render(lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    results = [timed(render, device, steps) for _ in range(runs)]
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return Row(model_name, variant, statistics.median(r[0] for r in results), statistics.median(r[2] for r in results),
               peak, image=results[-1][1])


def pixel_diff(a, b) -> np.ndarray:
    return np.abs(np.asarray(a, np.int16) - np.asarray(b, np.int16))


@contextlib.contextmanager
def counting_loop_syncs(counts: list[int]):
    """Count the host syncs CUDA's sync debug mode reports inside sampling.denoise."""
    original = sampling.denoise

    def denoise(*args, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                return original(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                counts.append(sum("synchroniz" in str(w.message) for w in caught))
    sampling.denoise = denoise
    try:
        yield
    finally:
        sampling.denoise = original


def loop_syncs(render, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    counts: list[int] = []
    with counting_loop_syncs(counts):
        render(lambda: None)
    return sum(counts)


# -- a fresh process --------------------------------------------------------------------------
def fresh_process(spec: Spec, model_folder: Path, device: torch.device) -> Row:
    from PIL import Image

    with tempfile.TemporaryDirectory() as out:
        args = ["generate", PROMPT, "--model", str(model_folder), "--negative", NEGATIVE, "--steps", str(spec.steps),
                "--cfg", str(CFG), "--seed", str(SEED), "-W", str(spec.size), "-H", str(spec.size), "--scheduler",
                SCHEDULER, "--schedule", SCHEDULE, "--device", device.type, "--compile", "--out", out, "-q"]
        start = time.time()
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "timed_ldm.py"), str(start), *args],
                              capture_output=True, text=True, cwd=ROOT, timeout=900)
        wall = time.time() - start
        if done.returncode:
            print(done.stderr[-3000:], file=sys.stderr)  # into the log: device time is too short to rerun
            said = [line for line in done.stderr.strip().splitlines() if not line.startswith("LDM_")]
            raise RuntimeError(f"exit {done.returncode}: {said[-1:]}")  # its error, not timed_ldm.py's marks
        marks = dict(line.split(" ", 1) for line in done.stderr.splitlines() if line.startswith("LDM_"))
        image = Image.open(next(Path(out).glob("*.png"))).convert("RGB")
    hits, misses = marks.get("LDM_FX_CACHE", "? ?").split()
    note = f"first step ends {float(marks.get('LDM_FIRST_STEP', 'nan')):.1f} s after start; FX graph cache {hits} hit, {misses} miss"
    return Row(spec.name, "fresh process --compile, warm cache: start to image", wall, note=note, image=image)


# -- the table --------------------------------------------------------------------------------
class Table:
    COLUMNS = ("model", "variant", "s/image", "denoiser it/s", "it/s vs stock", "s/image vs stock",
               "peak GPU GiB", "max diff vs stock /255", "mean diff /255", "syncs in loop", "note")

    def __init__(self, path: Path, header: str):
        self.path, self.header, self.rows, self.stock = path, header, [], {}

    def add(self, row: Row) -> None:
        if row.variant == "stock":
            self.stock[row.model] = row
        self.rows.append(row)
        self.write()

    def cells(self, row: Row) -> list[str]:
        base = self.stock.get(row.model)
        ratios = ["", ""]
        if base is not None and row is not base and row.rate == row.rate:  # in-process rows only
            ratios = [show(row.rate / base.rate, ".2f", "x"), show(base.seconds / row.seconds, ".2f", "x")]
        return [row.model, row.variant, show(row.seconds, ".3f"), show(row.rate, ".2f"), *ratios,
                show(row.peak_gib, ".2f"), show(row.diff, "d"), show(row.mean_diff, ".3f"), show(row.syncs, "d"),
                row.note]

    def markdown(self) -> str:
        lines = [self.header, "", "| " + " | ".join(self.COLUMNS) + " |", "|" + "---|" * len(self.COLUMNS)]
        lines += ["| " + " | ".join(self.cells(r)) + " |" for r in self.rows]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(self.markdown())


def attempt(table: Table, model: str, variant: str, work) -> Row | None:
    """Run one stage; a failure becomes a row saying so, and the run goes on."""
    try:
        row = work()
    except Exception as e:  # noqa: BLE001 - device time is short: keep every other figure
        traceback.print_exc()
        row = Row(model, variant, note=f"failed: {type(e).__name__}: {str(e)[:200]}")
    table.add(row)
    return row if row.image is not None else None


# -- the stages -------------------------------------------------------------------------------
def bench_model(spec: Spec, device: torch.device, dtype: torch.dtype, args, table: Table, work: Path) -> None:
    model = random_models.build_model(spec.family, spec.tiny, device, dtype)
    stock = stock_pipeline(model)
    saved = None
    if args.fresh:  # before the fast path changes the modules
        saved = work / spec.family
        stock.save_pretrained(saved, safe_serialization=True)
        hashing.short_hash(next((saved / "unet").glob("*.safetensors")))  # as a second run finds it: hashed
    base = attempt(table, spec.name, "stock", lambda: measure(spec.name, "stock", stock_render(stock, spec), device,
                                                               spec.steps, args.runs, 1))
    render = ldm_render(model, spec)
    attempt(table, spec.name, "ldm, no fast path", lambda: compared(
        measure(spec.name, "ldm, no fast path", render, device, spec.steps, args.runs, 1), base))
    speed.apply(model)
    attempt(table, spec.name, "ldm default", lambda: compared(
        measure(spec.name, "ldm default", render, device, spec.steps, args.runs, 1), base, render, device))
    if args.compile:
        attempt(table, spec.name, "ldm --compile", lambda: compiled(model, spec, device, args.runs, base))
    if saved is not None:
        attempt(table, spec.name, "fresh process", lambda: compared(fresh_process(spec, saved, device), base))


def compared(row: Row, base: Row | None, render=None, device: torch.device | None = None) -> Row:
    if base is not None:
        diff = pixel_diff(row.image, base.image)
        row.diff, row.mean_diff = int(diff.max()), float(diff.mean())
    if render is not None:
        row.syncs = loop_syncs(render, device)
    return row


def compiled(model: Model, spec: Spec, device: torch.device, runs: int, base: Row | None) -> Row:
    speed.apply(model, compile=True)
    render = ldm_render(model, spec)
    before = fx_graph_cache()
    first, _, _ = timed(render, device, spec.steps)
    hits, misses = (now - then for now, then in zip(fx_graph_cache(), before))
    row = measure(spec.name, "ldm --compile", render, device, spec.steps, runs, 1)  # one more: graphs record
    row.note = (f"first image, compiling included: {first:.1f} s, FX graph cache {hits} hit, {misses} miss; "
                f"mode {compiling.mode_for(device)}")
    return compared(row, base, render, device)


def fx_graph_cache() -> tuple[int, int]:
    """Inductor's FX graph cache hits and misses so far in this process."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["fxgraph_cache_hit"], counters["inductor"]["fxgraph_cache_miss"]


def precision_settings() -> list[tuple[object, str, object]]:
    """(namespace, attribute, the value for true fp32) of torch's fp32 precision settings: the
    fp32_precision strings of torch >= 2.9 (mixed with the allow_tf32 switches they would leave
    cuDNN's flags unreadable), else the switches."""
    b = torch.backends
    if hasattr(b.cuda.matmul, "fp32_precision"):
        return [(space, "fp32_precision", "ieee") for space in (b.cuda.matmul, b.cudnn.conv, b.cudnn.rnn)]
    return [(b.cuda.matmul, "allow_tf32", False), (b.cudnn, "allow_tf32", False)]


@contextlib.contextmanager
def true_fp32():
    """fp32 arithmetic throughout: cuDNN's convolutions default to TF32, whose rounding would be
    compared instead of the two pipelines. Afterwards every setting is put back as it was, not
    merely to an equivalent: inductor's cache key holds the matmul precision, and restoring
    `allow_tf32 = False` leaves "ieee" where the default is "none", so the stages compiled after
    this one filled cache entries a fresh `ldm` process never looks up, and it compiled again."""
    settings = precision_settings()
    saved = [getattr(space, name) for space, name, _ in settings]
    for space, name, value in settings:
        setattr(space, name, value)
    try:
        yield
    finally:
        for (space, name, _), value in zip(settings, saved):
            setattr(space, name, value)


def bench_fp32(spec: Spec, device: torch.device, table: Table) -> None:
    """Parity in fp32 (TF32 off): stock against ldm's default path, one image each."""
    name = f"{spec.name} fp32, {spec.size}px, {spec.steps} steps"
    model = random_models.build_model(spec.family, spec.tiny, device, torch.float32)
    with true_fp32():
        base = attempt(table, name, "stock", lambda: measure(name, "stock", stock_render(stock_pipeline(model), spec),
                                                              device, spec.steps, 1, 0))
        speed.apply(model)
        attempt(table, name, "ldm default", lambda: compared(
            measure(name, "ldm default", ldm_render(model, spec), device, spec.steps, 1, 0), base))


def guarded(table: Table, name: str, stage, device: torch.device) -> None:
    """A model's stages; a failure outside them (building, saving) is a row too."""
    try:
        stage()
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        table.add(Row(name, "setup", note=f"failed: {type(e).__name__}: {str(e)[:200]}"))
    release(device)


def release(device: torch.device) -> None:
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def header(device: torch.device, dtype: torch.dtype, args) -> str:
    import diffusers

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} threads)"
    day = datetime.now(timezone.utc).date().isoformat()
    return (f"ldm against diffusers' stock pipelines on {name}, {day}: torch {torch.__version__}, diffusers "
            f"{diffusers.__version__}, {str(dtype).removeprefix('torch.')}, random weights, cfg {CFG}, DPM++ 2M Karras, "
            f"batch 1, median of {args.runs} runs after warm-up; --compile mode {compiling.mode_for(device)}.")


def parse(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny models, 64x64, 2 steps")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--models", default="sd15,sdxl", help="comma-separated: sd15, sdxl")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compile-models", help="comma-separated: the models to run --compile and the fresh "
                        "process for (default: all of --models)")
    parser.add_argument("--no-compile", dest="compile_models", action="store_const", const="")
    parser.add_argument("--no-fresh", dest="fresh", action="store_false", help="skip the fresh-process run")
    parser.add_argument("--no-fp32", dest="fp32", action="store_false", help="skip the fp32 parity run")
    default_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "out"
    parser.add_argument("--out", type=Path, default=default_out / "gpu_speed.md")
    args = parser.parse_args(argv)
    args.compile_models = args.models if args.compile_models is None else args.compile_models
    return args


def for_model(args, key: str) -> argparse.Namespace:
    """`args` as one model's stages read them: `compile`, and `fresh` (the fresh process measures
    a warm compile cache) only where --compile-models names the model."""
    wanted = key in args.compile_models.split(",")
    return argparse.Namespace(**{**vars(args), "compile": wanted, "fresh": args.fresh and wanted})


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    quiet_libraries()
    device = bench_device(args.device)
    specs = TINY if args.tiny else REAL
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    table = Table(args.out, header(device, dtype, args))
    with tempfile.TemporaryDirectory() as work:
        for key in args.models.split(","):
            spec = specs[key]
            guarded(table, spec.name, lambda: bench_model(spec, device, dtype, for_model(args, key), table, Path(work)),
                    device)
            if key == "sd15" and args.fp32:
                small = Spec(spec.name, spec.family, spec.size, spec.steps if spec.tiny else 10, spec.tiny)
                guarded(table, spec.name + " fp32", lambda: bench_fp32(small, device, table), device)
    print(table.markdown())
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
