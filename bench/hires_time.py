"""Hires fix's time against its two passes done by hand, in ldm and with diffusers' pipelines.

One process, one small random SD1 model (bench/generate_vs_diffusers.py's), the same prompt, seed,
scheduler (Euler), sizes and steps for all four; each measure the median of --runs, taking turns:
  ldm hires fix:        hires.text_to_image (Latent upscale), what `ldm generate --hires-scale 2` runs
  ldm by hand:          text-to-image, a Lanczos resize of the PNG, img2img at the strength
  diffusers hires fix:  StableDiffusionPipeline to latents, torch's interpolate, the img2img
                        pipeline from those latents (A1111's step rule)
  diffusers by hand:    StableDiffusionPipeline to an image, the Lanczos resize, the img2img pipeline

    python bench/hires_time.py                      # 128x128 -> 256x256, 10 + 5 steps, 3 runs
    python bench/hires_time.py --size 256 --runs 5
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from generate_vs_diffusers import build_small_sd1  # noqa: E402

from ldm_cli import hires, img2img, loading, pipeline  # noqa: E402
from ldm_cli.settings import Settings  # noqa: E402

PROMPT, SEED, CFG, STRENGTH = "a red fox in snow, detailed", 1, 7.0, 0.5


def ldm_runs(folder: Path, size: int, steps: int, hires_steps: int):
    model = loading.load(str(folder))
    base = Settings(prompt=PROMPT, steps=steps, cfg=CFG, seed=SEED, width=size, height=size, scheduler="euler",
                    schedule="default")
    fix = base.merged(hires_scale=2.0, hires_steps=hires_steps, strength=STRENGTH).resolve({}, model.native_size)
    # by hand: the second render's steps make the same N of int(N / strength) as the hires pass
    second = base.merged(width=2 * size, height=2 * size, steps=int(hires_steps / STRENGTH), strength=STRENGTH)

    def by_hand():
        first = pipeline.text_to_image(model, [base.resolve({}, model.native_size)])[0]
        up = first.resize((2 * size, 2 * size), Image.LANCZOS)
        return img2img.image_to_image(model, [second.resolve({}, model.native_size)], [up])[0]

    return {"ldm hires fix": lambda: hires.text_to_image(model, [fix])[0], "ldm by hand": by_hand}


def diffusers_runs(folder: Path, size: int, steps: int, hires_steps: int):
    from diffusers import EulerDiscreteScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    text = StableDiffusionPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True,
                                                   safety_checker=None, requires_safety_checker=False)
    text.scheduler = EulerDiscreteScheduler.from_config(text.scheduler.config)
    image = StableDiffusionImg2ImgPipeline(**text.components)
    for pipe in (text, image):
        pipe.set_progress_bar_config(disable=True)
    total = int(hires_steps / STRENGTH)
    common = dict(guidance_scale=CFG, num_inference_steps=total, strength=(hires_steps + 0.5) / total)

    def generator():
        return torch.Generator().manual_seed(SEED)

    def fix():
        latents = text(PROMPT, num_inference_steps=steps, guidance_scale=CFG, width=size, height=size,
                       generator=generator(), output_type="latent").images
        up = torch.nn.functional.interpolate(latents, scale_factor=2, mode="bilinear")
        return image(PROMPT, image=up, generator=generator(), **common).images[0]

    def by_hand():
        first = text(PROMPT, num_inference_steps=steps, guidance_scale=CFG, width=size, height=size,
                     generator=generator()).images[0]
        up = first.resize((2 * size, 2 * size), Image.LANCZOS)
        return image(PROMPT, image=up, generator=generator(), **common).images[0]

    return {"diffusers hires fix": fix, "diffusers by hand": by_hand}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128, help="first pass side (the second is twice it)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--hires-steps", type=int, default=5)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = ROOT / "bench" / "out" / "small-sd1"
    if not (folder / "model_index.json").exists():
        build_small_sd1(folder)
    runs = {**ldm_runs(folder, args.size, args.steps, args.hires_steps),
            **diffusers_runs(folder, args.size, args.steps, args.hires_steps)}
    times: dict[str, list[float]] = {name: [] for name in runs}
    for name, run in runs.items():  # a warm-up each, untimed
        run()
    for _ in range(args.runs):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"small random SD1, {args.size}x{args.size} -> {2 * args.size}x{2 * args.size}, {args.steps} + "
          f"{args.hires_steps} steps (strength {STRENGTH}), Euler, cfg {CFG}, CPU threads {torch.get_num_threads()}, "
          f"median of {args.runs} runs")
    print("| run | seconds | x ldm hires fix |\n|---|---|---|")
    for name, t in med.items():
        print(f"| {name} | {t:.2f} | {t / med['ldm hires fix']:.2f} |")


if __name__ == "__main__":
    main()
