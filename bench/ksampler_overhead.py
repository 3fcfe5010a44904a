"""What A1111's k-diffusion samplers (ksamplers.py, dpm_solver.py, restart.py) cost beyond their
denoiser calls: per sampler, the time of its whole run against the time spent inside the
denoiser (the model's call with CFG and the k-diffusion scalings), so the rest is the sampler's
own arithmetic, its noise (Brownian trees for the SDE samplers) and the loop's bookkeeping.

The small random SD1 model of bench/generate_vs_diffusers.py (diffusers folder), 256x256,
cfg 7.5, one image; medians of --runs runs after a warm-up. `--flow`: the small random SD3 of
bench/loop_vs_diffusers.py instead (the samplers' flow forms; 128x128, its toy size's double).

    python bench/ksampler_overhead.py --runs 3 --steps 10
    python bench/ksampler_overhead.py --runs 3 --steps 10 --flow
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from generate_vs_diffusers import build_small_sd1  # noqa: E402

from ldm_cli import ksampling, loading, pipeline, schedulers  # noqa: E402
from ldm_cli.settings import Settings  # noqa: E402


def measured(model, s: Settings) -> tuple[float, float, int]:
    """(seconds in the sampler's run, seconds of it inside the denoiser, denoiser calls)."""
    record = []
    real = ksampling.KRun.sample

    def sample(self, denoiser, x, sigmas, generators, done):
        inside, calls = [0.0], [0]

        def timed(x, sigma):
            start = time.perf_counter()
            out = denoiser(x, sigma)
            inside[0] += time.perf_counter() - start
            calls[0] += 1
            return out
        start = time.perf_counter()
        out = real(self, timed, x, sigmas, generators, done)
        record.append((time.perf_counter() - start, inside[0], calls[0]))
        return out

    ksampling.KRun.sample = sample
    try:
        pipeline.text_to_image(model, [s])
    finally:
        ksampling.KRun.sample = real
    return record[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--flow", action="store_true", help="a flow-matching model (SD3) instead of SD1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.flow:
            from loop_vs_diffusers import sd3_pipe

            sd3_pipe().save_pretrained(tmp)
        else:
            build_small_sd1(Path(tmp))
        model = loading.load(tmp)
    size = 128 if args.flow else 256
    names = [n for n, spec in schedulers.SCHEDULERS.items() if spec.k is not None
             and (not args.flow or n in schedulers.flow_names())]  # DDIM CFG++: noise-prediction models
    print(f"{'sampler':<20}{'calls':>6}{'denoiser ms/call':>18}{'run ms':>10}{'beyond the denoiser':>21}")
    for name in names:
        schedule = "default" if schedulers.cfg_pp(name) else "sgm_uniform"  # DDIM CFG++ walks its own timesteps
        s = Settings(prompt="a red fox in snow, detailed", steps=args.steps, cfg=7.5, seed=1, scheduler=name,
                     schedule=schedule, width=size, height=size)
        s = s.resolve(model.defaults if args.flow else {}, (size, size))
        measured(model, s)  # warm-up
        runs = [measured(model, s) for _ in range(args.runs)]
        total, inside = statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs)
        calls = runs[0][2]
        print(f"{name:<20}{calls:>6}{1000 * inside / calls:>18.1f}{1000 * total:>10.0f}"
              f"{100 * (total - inside) / inside:>20.2f}%")


if __name__ == "__main__":
    main()
