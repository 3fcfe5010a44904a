"""`ldm generate` against the equivalent diffusers StableDiffusionPipeline call, side by side.

Same diffusers-layout model, prompt, seed, scheduler (DPM++ 2M Karras), steps, cfg and size.
Two measures, each the median of --runs runs, alternating ldm and diffusers back to back:
  whole process: a fresh `python` from start to PNG on disk (imports and model load included)
  loop:          seconds per denoising step inside one process (time between step callbacks)

    python bench/generate_vs_diffusers.py                 # builds a small random SD1 model
    python bench/generate_vs_diffusers.py --model DIR     # any diffusers SD1/SD2 folder
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROMPT, SEED, CFG = "a red fox in snow, detailed", 1, 7.5
DIFFUSERS_SCRIPT = """
import sys, time, torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
model, out, steps, size = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
pipe = StableDiffusionPipeline.from_pretrained(model, dtype=torch.float32, local_files_only=True,
                                               safety_checker=None, requires_safety_checker=False)
pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True,
                                                         algorithm_type="dpmsolver++")
pipe.set_progress_bar_config(disable=True)
stamps = []
def on_step(p, i, t, kw):
    stamps.append(time.perf_counter())
    return kw
image = pipe({prompt!r}, num_inference_steps=steps, guidance_scale={cfg}, height=size, width=size,
             generator=torch.Generator("cpu").manual_seed({seed}), callback_on_step_end=on_step).images[0]
image.save(out)
print("STEP", (stamps[-1] - stamps[0]) / (len(stamps) - 1))
""".format(prompt=PROMPT, cfg=CFG, seed=SEED)
LDM_LOOP_SCRIPT = """
import sys, time
from ldm_cli import loading, pipeline
from ldm_cli.settings import Settings
model, steps, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
m = loading.load(model)
s = Settings(prompt={prompt!r}, steps=steps, cfg={cfg}, seed={seed}, width=size, height=size,
             scheduler="dpmpp_2m", schedule="karras").resolve({{}}, m.native_size)
stamps = []
pipeline.text_to_image(m, [s], on_step=lambda: stamps.append(time.perf_counter()))
print("STEP", (stamps[-1] - stamps[0]) / (len(stamps) - 1))
""".format(prompt=PROMPT, cfg=CFG, seed=SEED)


def build_small_sd1(folder: Path) -> None:
    """An SD1-architecture model at reduced width (random weights), enough work per step to time."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ldm_cli.loading.folder import load_tokenizer

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=32, block_out_channels=(64, 128, 256, 256), layers_per_block=1,
                                cross_attention_dim=256, attention_head_dim=8)
    vae = AutoencoderKL(block_out_channels=(32, 64, 64, 64), layers_per_block=1, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
    text = CLIPTextModel(CLIPTextConfig(hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                        num_attention_heads=4, bos_token_id=49406, eos_token_id=49407))
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    tokenizer = load_tokenizer(ROOT / "ldm_cli" / "loading" / "configs" / "clip_tokenizer")
    StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False
                            ).save_pretrained(folder)


def timed(cmd: list[str]) -> tuple[float, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - start, done.stdout


def step_time(stdout: str) -> float:
    return float(next(line.split()[1] for line in stdout.splitlines() if line.startswith("STEP")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    out = ROOT / "bench" / "out"
    model = args.model or out / "small-sd1"
    if not (model / "model_index.json").exists():
        build_small_sd1(model)
    py, steps, size = sys.executable, str(args.steps), str(args.size)
    whole = {"ldm": [], "diffusers": []}
    loop = {"ldm": [], "diffusers": []}
    for _ in range(args.runs):
        t, _ = timed([py, "-m", "ldm_cli", "generate", PROMPT, "--model", str(model), "--steps", steps,
                      "--cfg", str(CFG), "--seed", str(SEED), "-W", size, "-H", size, "--out", str(out / "ldm"), "-q"])
        whole["ldm"].append(t)
        t, stdout = timed([py, "-c", DIFFUSERS_SCRIPT, str(model), str(out / "diffusers.png"), steps, size])
        whole["diffusers"].append(t)
        loop["diffusers"].append(step_time(stdout))
        loop["ldm"].append(step_time(timed([py, "-c", LDM_LOOP_SCRIPT, str(model), steps, size])[1]))
    med = {k: {n: statistics.median(v) for n, v in d.items()} for k, d in (("whole", whole), ("loop", loop))}
    print(f"model {model.name}, {args.size}x{args.size}, {args.steps} steps, cfg {CFG}, DPM++ 2M Karras, "
          f"CPU threads {os.cpu_count()}, median of {args.runs} runs")
    print("| measure | ldm | diffusers | ldm / diffusers |\n|---|---|---|---|")
    print(f"| whole process, start to PNG (s) | {med['whole']['ldm']:.2f} | {med['whole']['diffusers']:.2f} "
          f"| {med['whole']['ldm'] / med['whole']['diffusers']:.2f} |")
    print(f"| denoising loop, per step (ms) | {1000 * med['loop']['ldm']:.1f} | {1000 * med['loop']['diffusers']:.1f} "
          f"| {med['loop']['ldm'] / med['loop']['diffusers']:.2f} |")


if __name__ == "__main__":
    main()
