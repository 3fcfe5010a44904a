"""ldm's denoising loop against diffusers' pipeline on the same model, per step, in one process.

Small random SD3 (4 MMDiT layers, width 256), FLUX.1-dev (2 double + 4 single blocks, width 256),
Z-Image, Chroma, FLUX.2 klein and dev and Qwen-Image at the tests' toy sizes, SD1 with one ControlNet
copied from its UNet and that FLUX with a ControlNet of its blocks: the
same weights, prompt, seed, scheduler, steps, cfg and size in both; after one warm-up each, runs
alternate ldm / diffusers, the side that goes first alternating too. A step is the time between
step callbacks ((last - first) / (steps - 1)), so text encoding and VAE decoding are left out.
The two images must agree within 2/255 per pixel, so the comparison is like for like.

    python bench/loop_vs_diffusers.py --runs 5
    python bench/loop_vs_diffusers.py --runs 5 --only ControlNet
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

from ldm_cli import control_units, loading, pipeline  # noqa: E402
from ldm_cli.loading import controlnet as controlnet_loading  # noqa: E402
from ldm_cli.settings import Settings  # noqa: E402
from tests import tiny_models as tiny  # noqa: E402

PROMPT, SEED = "a red fox in snow, detailed", 1


def sd3_pipe():
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(5)
    net = SD3Transformer2DModel(sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=4,
                                attention_head_dim=64, num_attention_heads=4, caption_projection_dim=256,
                                joint_attention_dim=tiny.T5_WIDTH, pooled_projection_dim=tiny.CLIP_L + tiny.CLIP_G,
                                pos_embed_max_size=32).eval()
    return StableDiffusion3Pipeline(
        transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny.sd3_vae(),
        text_encoder=tiny.text_encoder(projection=True, seed=3, width=tiny.CLIP_L), tokenizer=tiny.tokenizer(),
        text_encoder_2=tiny.text_encoder("gelu", True, seed=4, width=tiny.CLIP_G), tokenizer_2=tiny.tokenizer(True),
        text_encoder_3=tiny.t5_encoder(), tokenizer_3=tiny.t5_tokenizer())


def flux_pipe():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(7)
    net = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=2, num_single_layers=4,
                                 attention_head_dim=64, num_attention_heads=4, joint_attention_dim=tiny.T5_WIDTH,
                                 pooled_projection_dim=tiny.CLIP_L, guidance_embeds=True,
                                 axes_dims_rope=(16, 24, 24)).eval()
    return FluxPipeline(transformer=net, vae=tiny.flux_vae(),
                        scheduler=FlowMatchEulerDiscreteScheduler(**tiny.FLUX_SCHEDULERS["dev"]),
                        text_encoder=tiny.text_encoder(seed=3, width=tiny.CLIP_L), tokenizer=tiny.tokenizer(),
                        text_encoder_2=tiny.t5_encoder(), tokenizer_2=tiny.t5_tokenizer())


def controlnet_from(unet):
    """A ControlNet copied from `unet`, its zero-initialised outputs made random so it acts."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet)
    torch.manual_seed(11)
    outputs = ("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(outputs):
                p.normal_(0, 0.05)
    return net.eval()


def sd1_controlnet_pipes(folder: Path, size: int):
    """Saves a small SD1 and a ControlNet; returns diffusers' pipeline, ldm's model (with the unit)."""
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline, StableDiffusionPipeline
    from PIL import Image

    from generate_vs_diffusers import build_small_sd1

    build_small_sd1(folder / "sd1")
    base = StableDiffusionPipeline.from_pretrained(folder / "sd1", local_files_only=True, safety_checker=None,
                                                   requires_safety_checker=False)
    controlnet_from(base.unet).save_pretrained(folder / "cn")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (size, size, 3), dtype=np.uint8))
    image.save(folder / "control.png")
    net = ControlNetModel.from_pretrained(folder / "cn").eval()
    theirs = StableDiffusionControlNetPipeline(**base.components, controlnet=net)
    theirs.scheduler = DDIMScheduler.from_config(theirs.scheduler.config)
    ours = loading.load(str(folder / "sd1"))
    unit = control_units.ControlUnit(str(folder / "cn"), str(folder / "control.png"), 1.0, 0.0, 1.0)
    ours.controls = [(unit, controlnet_loading.load(unit.controlnet, ours))]
    return theirs, ours, image


def flux_controlnet_pipes(folder: Path, size: int):
    """The small FLUX.1-dev saved with a ControlNet of its first blocks; (diffusers' pipeline,
    ldm's model with the unit, the control image)."""
    from diffusers import FluxControlNetModel, FluxControlNetPipeline
    from PIL import Image

    base = flux_pipe()
    base.save_pretrained(folder / "flux-cn-base", safe_serialization=True)
    net = FluxControlNetModel.from_transformer(base.transformer, num_layers=1, num_single_layers=2,
                                               attention_head_dim=64, num_attention_heads=4)
    torch.manual_seed(12)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                p.normal_(0, 0.05)
    net.eval().save_pretrained(folder / "flux-cn")
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (size, size, 3), dtype=np.uint8))
    image.save(folder / "flux-control.png")
    theirs = FluxControlNetPipeline(**base.components, controlnet=FluxControlNetModel.from_pretrained(folder / "flux-cn"))
    ours = loading.load(str(folder / "flux-cn-base"))
    unit = control_units.ControlUnit(str(folder / "flux-cn"), str(folder / "flux-control.png"), 1.0, 0.0, 1.0)
    ours.controls = [(unit, controlnet_loading.load(unit.controlnet, ours))]
    return theirs, ours, image


def per_step(run) -> tuple[float, np.ndarray]:
    stamps: list[float] = []
    image = run(lambda: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1), np.asarray(image).astype(np.int16)


def diffusers_run(pipe, s: Settings, **kw):
    def go(stamp):
        def on_step(p, i, t, state):
            stamp()
            return state
        return pipe(prompt=s.prompt, num_inference_steps=s.steps, height=s.height, width=s.width,
                    generator=torch.Generator("cpu").manual_seed(s.seed), callback_on_step_end=on_step,
                    **kw).images[0]
    return go


def ldm_run(model, s: Settings):
    return lambda stamp: pipeline.text_to_image(model, [s], on_step=stamp)[0]


def cases(folder: Path, size: int, steps: int):
    """(name, ldm run, diffusers run) per model kind."""
    out = []
    for name, short, build, kw, theirs_kw in [
        ("SD3 (4 layers, width 256), cfg 6.5", "sd3", sd3_pipe, dict(cfg=6.5, negative="blurry"),
         dict(guidance_scale=6.5, negative_prompt="blurry")),
        ("FLUX.1-dev (2+4 blocks, width 256), guidance 3.5", "flux", flux_pipe, dict(cfg=1.0, guidance=3.5),
         dict(guidance_scale=3.5)),
    ]:
        theirs = build()
        theirs.save_pretrained(folder / short, safe_serialization=True)
        ours = loading.load(str(folder / short))
        s = Settings(prompt=PROMPT, steps=steps, seed=SEED, scheduler="euler", width=size, height=size,
                     **kw).resolve(ours.defaults, ours.native_size)
        theirs.set_progress_bar_config(disable=True)
        out.append((name, ldm_run(ours, s), diffusers_run(theirs, s, **theirs_kw)))
    # the 2025-26 families at the tests' toy sizes (tests/tiny_models.py), guidance off as their
    # few-step releases run (Z-Image Turbo, FLUX.2 klein distilled) and the others can
    for name, short, build, theirs_kw in [
        ("Z-Image (toy), cfg 1", "zimage", tiny.zimage_pipeline, dict(guidance_scale=0.0)),
        ("Chroma (toy), cfg 1", "chroma", tiny.chroma_pipeline, dict(guidance_scale=1.0)),
        ("FLUX.2 klein (toy), cfg 1", "flux2", lambda: tiny.flux2_klein_pipeline(distilled=True),
         dict(guidance_scale=1.0)),
        ("Qwen-Image (toy), cfg 1", "qwen-image", tiny.qwen_image_pipeline, dict(true_cfg_scale=1.0)),
        # its embedded guidance at the default 4 (a transformer input, no second pass)
        ("FLUX.2 dev (toy), cfg 1, guidance 4", "flux2-dev", tiny.flux2_dev_pipeline, dict(guidance_scale=4.0)),
    ]:
        theirs = build()
        theirs.save_pretrained(folder / short, safe_serialization=True)
        ours = loading.load(str(folder / short))
        s = Settings(prompt=PROMPT, steps=steps, seed=SEED, scheduler="euler", width=size, height=size, cfg=1.0,
                     max_sequence_length=64).resolve(ours.defaults, ours.native_size)
        theirs.set_progress_bar_config(disable=True)
        out.append((name, ldm_run(ours, s),
                    diffusers_run(theirs, s, max_sequence_length=s.max_sequence_length, **theirs_kw)))
    theirs, ours, image = sd1_controlnet_pipes(folder, size)
    theirs.set_progress_bar_config(disable=True)
    s = Settings(prompt=PROMPT, negative="blurry", steps=steps, cfg=7.5, seed=SEED, scheduler="ddim", width=size,
                 height=size).resolve({}, ours.native_size)
    out.append(("SD1 small + 1 ControlNet, cfg 7.5", ldm_run(ours, s),
                diffusers_run(theirs, s, guidance_scale=7.5, negative_prompt="blurry", image=image)))
    theirs, ours, image = flux_controlnet_pipes(folder, size)
    theirs.set_progress_bar_config(disable=True)
    s = Settings(prompt=PROMPT, steps=steps, seed=SEED, scheduler="euler", width=size, height=size,
                 guidance=3.5).resolve(ours.defaults, ours.native_size)
    out.append(("FLUX.1-dev small + 1 ControlNet (1+2 blocks)", ldm_run(ours, s),
                diffusers_run(theirs, s, guidance_scale=3.5, control_image=image)))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--only", default="", help="run the cases whose name contains this text")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, ours, theirs in cases(Path(tmp), args.size, args.steps):
            if args.only not in name:
                continue
            times = {"ldm": [], "diffusers": []}
            for run in (ours, theirs):  # warm-up: first-call allocations and caches
                per_step(run)
            for i in range(args.runs):
                order = [("ldm", ours), ("diffusers", theirs)][::1 if i % 2 == 0 else -1]  # no side always first
                images = {}
                for side, run in order:
                    t, images[side] = per_step(run)
                    times[side].append(t)
                mine, ref = images["ldm"], images["diffusers"]
                diff = int(np.abs(mine - ref).max())
                assert mine.std() > 1 and diff <= 2, f"{name}: images differ by {diff}/255"
            a, b = statistics.median(times["ldm"]), statistics.median(times["diffusers"])
            rows.append(f"| {name} | {1000 * a:.1f} | {1000 * b:.1f} | {a / b:.2f} |")
            print(rows[-1], flush=True, file=sys.stderr)
    print(f"{args.size}x{args.size}, {args.steps} steps, median of {args.runs} alternating runs after a warm-up, "
          f"torch threads {torch.get_num_threads()}")
    print("| model | ldm ms/step | diffusers ms/step | ratio |\n|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
