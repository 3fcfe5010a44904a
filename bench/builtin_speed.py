"""Speed of the built-in model on this machine: 20 guided steps, denoising + decoding, for one
image and for 16 in one batch (issue 4's targets: under 0.5 s and under 3 s on a 2-core CPU).

    python bench/builtin_speed.py [--runs 5] [--threads 2]

Prints medians over --runs runs (after one warm-up); prompt encoding is shown apart.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from ldm_cli import loading, pipeline, sampling, vae
from ldm_cli.settings import Settings

TARGETS = {1: 0.5, 16: 3.0}  # seconds of denoising + decoding


def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def one_run(model, group: list[Settings]) -> tuple[float, float]:
    """(prompt encoding seconds, denoising + decoding seconds) for one batch."""
    encode_s, (positive, negative) = timed(lambda: pipeline.encode_prompts(model, group))

    def rest():
        scheduler = pipeline.make_scheduler(model, group)
        generators = pipeline.generators_for(group)
        latents = pipeline.initial_noise(model, group, generators) * scheduler.init_noise_sigma
        latents = sampling.denoise(model, scheduler, latents, positive, negative, group[0].cfg,
                                   generators, scheduler.timesteps)
        return vae.decode(model, latents)
    return encode_s, timed(rest)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="default: the built-in model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = loading.load(args.model)
    base = Settings(prompt="a large red circle on the left, white background", seed=1)
    base = base.resolve(model.defaults, model.native_size)
    print(f"{model.name}: {base.steps} steps, cfg {base.cfg}, {base.scheduler} {base.schedule}, "
          f"{base.width}x{base.height}, {args.threads} threads, median of {args.runs}")
    print("| images | encode prompt (s) | denoise + decode (s) | per image (s) | target (s) |")
    print("|---|---|---|---|---|")
    for count, target in TARGETS.items():
        group = [base.merged(seed=base.seed + i) for i in range(count)]
        one_run(model, group)  # warm-up
        runs = [one_run(model, group) for _ in range(args.runs)]
        encode, rest = (statistics.median(r[k] for r in runs) for k in (0, 1))
        print(f"| {count} | {encode:.3f} | {rest:.3f} | {rest / count:.3f} | {target} |")


if __name__ == "__main__":
    main()
