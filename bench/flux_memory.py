"""FLUX.1 dev in the memory people have: each memory flag of ldm beside diffusers' FluxPipeline
with the same setting, one process, one GPU.

    python bench/flux_memory.py                      # CUDA: FLUX.1 dev 1024x1024, 28 steps, bf16
    python bench/flux_memory.py --steps 8            # a shorter run (the table says how many steps)
    python bench/flux_memory.py --tiny --device cpu  # a dry run: toy FLUX, 64x64, 2 steps

Random weights in the real architecture (the configs ldm ships; nothing is downloaded), kept in
CPU memory; every row gets fresh modules over those weights, placed as its flags say:
  (none)             everything on the GPU               diffusers: pipe.to("cuda")
  --weights fp8      + float8 storage (T5 too in ldm)    transformer.enable_layerwise_casting(float8)
  --offload model    components take turns on the GPU    enable_model_cpu_offload()
  --offload sequential  layers stream to the GPU         enable_sequential_cpu_offload()
and the two offloads with --weights fp8. ldm runs as `ldm generate` does (its prompts encoded
first, then its text encoders freed: ahead.py). Per row: seconds per image (prompt to PIL image,
median of --runs, after one 1-step warm-up per process), peak GPU memory allocated and reserved
(weights included; the counters reset before the row's modules are placed), and the smallest
card it fits: reserved peak plus the CUDA context, measured once. The table is rewritten after
every row, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

import random_models  # noqa: E402
from timing import bench_device, show, synchronize  # noqa: E402
from ldm_cli import ahead, memory, pipeline, speed  # noqa: E402
from ldm_cli.loading import LoadOptions, quiet_libraries  # noqa: E402
from ldm_cli.settings import Settings  # noqa: E402

PROMPT, SEED, GUIDANCE = "a red fox in snow, detailed", 1, 3.5
FLAGS = [("none", None), ("none", "fp8"), ("model", None), ("model", "fp8"), ("sequential", None),
         ("sequential", "fp8")]
CARDS = (8, 12, 16, 24, 48, 80)  # GB


@dataclass
class Row:
    flags: str
    side: str  # ldm or diffusers
    seconds: float = float("nan")
    allocated: float | None = None  # GiB
    reserved: float | None = None
    note: str = ""


def flag_text(offload: str, weights: str | None) -> str:
    parts = ([f"--offload {offload}"] if offload != "none" else []) + ([f"--weights {weights}"] if weights else [])
    return " ".join(parts) or "(none)"


def reset(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def peaks(device: torch.device) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30


# -- the two sides ------------------------------------------------------------------------------
def ldm_side(weights: dict, device: torch.device, offload: str, storage: str | None, args):
    """A render function over a fresh ldm Model placed as `ldm generate` would place it."""
    model = random_models.flux_model(weights)
    options = LoadOptions(device=str(device), offload=offload, weights=storage)
    for module in memory.modules(model):
        module.to(memory.load_device(device, options))
    memory.place(model, device, options)
    speed.apply(model)

    def render() -> object:
        s = Settings(prompt=PROMPT, steps=args.steps, seed=SEED, guidance=GUIDANCE, width=args.size,
                     height=args.size).resolve(model.defaults, model.native_size)
        model.encoded = ahead.Ahead(model, [[s]])  # as a run: prompts first, then the text encoders freed
        return pipeline.text_to_image(model, [s])[0]
    return render


def diffusers_side(weights: dict, device: torch.device, offload: str, storage: str | None, args):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    model = random_models.flux_model(weights)  # the same fresh modules and tokenizers
    pipe = FluxPipeline(transformer=model.denoiser, vae=model.vae, text_encoder=model.text_encoders[0],
                        tokenizer=model.tokenizers[0], text_encoder_2=model.text_encoders[1],
                        tokenizer_2=model.tokenizers[1],
                        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config))
    pipe.set_progress_bar_config(disable=True)
    if storage == "fp8":  # diffusers' own default: layers named like norms stay in the compute dtype
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=model.dtype)
    if offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    elif offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)

    def render() -> object:
        return pipe(PROMPT, num_inference_steps=args.steps, guidance_scale=GUIDANCE, height=args.size,
                    width=args.size, generator=torch.Generator("cpu").manual_seed(SEED)).images[0]
    return render


def measure(side: str, make, weights: dict, device: torch.device, offload: str, storage: str | None, args) -> Row:
    row = Row(flag_text(offload, storage), side)
    try:
        times = []
        reset(device)
        for _ in range(args.runs):  # each run places fresh modules: ldm frees its text encoders after encoding
            render = make(weights, device, offload, storage, args)
            synchronize(device)
            start = time.perf_counter()
            render()
            synchronize(device)
            times.append(time.perf_counter() - start)
            del render
        row.seconds = statistics.median(times)
        row.allocated, row.reserved = peaks(device)
    except Exception as e:  # noqa: BLE001 - device time is short: keep every other figure
        traceback.print_exc()
        row.note = f"failed: {type(e).__name__}: " + " ".join(str(e).split())[:160]
    reset(device)
    return row


# -- the table ----------------------------------------------------------------------------------
def fits(row: Row, context_gib: float | None) -> str:
    if row.reserved is None or context_gib is None:
        return ""
    need = (row.reserved + context_gib) * 2**30 / 1e9  # cards are sold in GB
    return next((f"{card} GB" for card in CARDS if need <= card), "more")


def markdown(rows: list[Row], header: str, context_gib: float | None) -> str:
    lines = [header, "", "| flags | side | s/image | vs diffusers | peak allocated GiB | peak reserved GiB | "
             "fits | note |", "|---|---|---|---|---|---|---|---|"]
    theirs = {r.flags: r for r in rows if r.side == "diffusers"}
    for r in rows:
        base = theirs.get(r.flags)
        ratio = show(r.seconds / base.seconds, ".2f", "x") if r.side == "ldm" and base else ""
        lines.append(f"| {r.flags} | {r.side} | {show(r.seconds, '.2f')} | {ratio} | {show(r.allocated, '.2f')} | "
                     f"{show(r.reserved, '.2f')} | {fits(r, context_gib)} | {r.note} |")
    return "\n".join(lines) + "\n"


def context_gib(device: torch.device) -> float | None:
    """What the GPU holds besides the allocator's memory (the CUDA context, libraries)."""
    if device.type != "cuda":
        return None
    torch.zeros(1, device=device)
    free, total = torch.cuda.mem_get_info(device)
    return (total - free - torch.cuda.memory_reserved(device)) / 2**30


def header(device: torch.device, args) -> str:
    import diffusers

    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({os.cpu_count()} threads)"
    model = "toy FLUX.1-dev" if args.tiny else "FLUX.1-dev (random weights, real architecture)"
    day = datetime.now(timezone.utc).date().isoformat()
    return (f"{model} at {args.size}x{args.size}, {args.steps} steps, guidance {GUIDANCE}, on {name}, {day}: "
            f"torch {torch.__version__}, diffusers {diffusers.__version__}, median of {args.runs} run(s).")


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="toy FLUX at 64x64, 2 steps (a dry run)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int)
    parser.add_argument("--size", type=int)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--flags", help="comma-separated rows to run, e.g. model+fp8,sequential (default: all)")
    default_out = Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "bench" / "out"
    parser.add_argument("--out", type=Path, default=default_out / "flux_memory.md")
    args = parser.parse_args(argv)
    args.steps = args.steps or (2 if args.tiny else 28)
    args.size = args.size or (64 if args.tiny else 1024)
    return args


def chosen(spec: str | None) -> list[tuple[str, str | None]]:
    if not spec:
        return FLAGS
    wanted = [tuple(item.split("+")) for item in spec.split(",")]
    return [(o, w) for o, w in FLAGS if (o, w) in wanted or ((o,) in wanted and w is None)]


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    quiet_libraries()
    device = bench_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    weights = random_models.flux_modules(args.tiny, device, dtype)
    reset(device)
    context = context_gib(device)
    rows: list[Row] = []
    header_text = header(device, args)
    warm = argparse.Namespace(**{**vars(args), "steps": 1, "runs": 1})  # CUDA's libraries load here, untimed
    measure("ldm", ldm_side, weights, device, *chosen(args.flags)[0], warm)
    for offload, storage in chosen(args.flags):
        for side, make in (("diffusers", diffusers_side), ("ldm", ldm_side)):
            rows.append(measure(side, make, weights, device, offload, storage, args))
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(markdown(rows, header_text, context))
    print(markdown(rows, header_text, context))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
