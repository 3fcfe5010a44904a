"""The built-in model's training recipe: VAE, latent cache, text encoder, denoiser, export.

    python -m ldm_cli.demo.train vae      --out runs/builtin
    python -m ldm_cli.demo.train latents  --out runs/builtin
    python -m ldm_cli.demo.train text     --out runs/builtin   # needs nothing before it
    python -m ldm_cli.demo.train denoiser --out runs/builtin
    python -m ldm_cli.demo.train export   --out runs/builtin --cfg 5

Every stage is seeded and resumable: it checkpoints every --every steps under --out and, run
again, goes on from the last checkpoint. Batch i of a stage is drawn from seed and i alone, so a
resumed run sees the same data it would have seen uninterrupted. Each stage's defaults (steps,
batch, learning rate) are the ones the shipped model was trained with; `make builtin` runs them
all. Training runs on CUDA when there is one, in bf16 autocast where that is faster.
"""
from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

import torch

from ldm_cli import vae as vae_io
from ldm_cli.demo import architecture, scenes
from ldm_cli.demo.resumable import EMA, Checkpoint, log, run_steps
from ldm_cli.demo.text_stage import Captions, captions_for, text_stage_encoder, train_text
from ldm_cli.device import pick_device
from ldm_cli.errors import LdmError

FOREGROUND_WEIGHT = 9.0  # how much more a shape's pixel counts than a background pixel in the VAE loss
EDGE_WEIGHT = 20.0  # and a pixel near its outline, on top: the outline is what tells shapes apart
LARGE_AREA = 0.12  # the share of the image a large shape covers


def scene_batch(seed: int, step: int, size: int) -> tuple[list[scenes.Scene], torch.Tensor]:
    """Training scenes (seen colour-shape pairs only) and their pixels in [-1, 1]."""
    rng = random.Random(seed * 1_000_003 + step)
    batch = [scenes.random_scene(rng) for _ in range(size)]
    return batch, vae_io.to_tensor([scenes.draw(s, rng) for s in batch])


def shape_weights(pixels: torch.Tensor) -> torch.Tensor:
    """Per-pixel loss weights: 1 on the background, FOREGROUND_WEIGHT more on the shape and
    EDGE_WEIGHT more within 2 px of its outline, both scaled up for small shapes so that every
    shape counts about as much as a large one. Unweighted, the VAE learns the background long
    before the shapes, and rounds small ones into blobs. The corner is always background
    (shapes stay a pixel inside the frame)."""
    import torch.nn.functional as F

    shape = ((pixels - pixels[:, :, :1, :1]).abs().sum(dim=1, keepdim=True) > 0.1).float()
    scale = (LARGE_AREA / shape.mean(dim=(1, 2, 3), keepdim=True).clamp(min=1e-4)).clamp(1, 6)
    outline = F.max_pool2d(shape, 5, 1, 2) + F.max_pool2d(-shape, 5, 1, 2)  # dilated minus eroded
    return 1 + scale * (FOREGROUND_WEIGHT * shape + EDGE_WEIGHT * outline)


def vae_loss(vae, pixels: torch.Tensor, kl_weight: float = 1e-6) -> tuple[torch.Tensor, float]:
    """Shape-weighted MSE + L1 (see shape_weights), plus a light KL term."""
    posterior = vae.encode(pixels).latent_dist
    error = vae.decode(posterior.sample()).sample - pixels
    weights = shape_weights(pixels)
    loss = (weights * (error.pow(2) + error.abs())).mean() + kl_weight * posterior.kl().mean()
    psnr = 10 * math.log10(4 / max(error.pow(2).mean().item(), 1e-12))  # pixels span 2, so peak^2 = 4
    return loss, psnr


def train_vae(args) -> None:
    torch.manual_seed(args.seed)
    vae = architecture.autoencoder().to(args.device)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.lr, weight_decay=0.0)
    checkpoint = Checkpoint(args.out / "vae_stage", {"vae": vae}, optimizer)

    def step_fn(step: int):
        torch.manual_seed(args.seed + step)
        return vae_loss(vae, scene_batch(args.seed, step, args.batch)[1].to(args.device))

    def after_step(step: int) -> None:
        if (step + 1) % args.report == 0:
            vae.eval()
            log(args.out, f"vae step {step + 1}: {reconstruction_report(vae, args.seed)}")
            vae.train()

    run_steps(args, checkpoint, step_fn, "vae", after_step)


def load_vae(out: Path):
    from diffusers import AutoencoderKL

    return AutoencoderKL.from_pretrained(out / "vae_stage" / "vae").eval().requires_grad_(False)


def training_set(seed: int, count: int) -> tuple[list[scenes.Scene], torch.Tensor]:
    rng = random.Random(seed)
    items = [scenes.random_scene(rng) for _ in range(count)]
    return items, vae_io.to_tensor([scenes.draw(s, rng) for s in items])


@torch.inference_mode()
def encode_all(vae, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Latent means, on the CPU, encoded on the VAE's device."""
    return torch.cat([vae.encode(pixels[i:i + batch].to(vae.device)).latent_dist.mode().float().cpu()
                      for i in range(0, len(pixels), batch)])


@torch.inference_mode()
def reconstruction_report(vae, seed: int, count: int = 256) -> str:
    """PSNR and evaluator accuracy of the VAE's reconstructions of unseen scenes."""
    from ldm_cli.demo import evaluate

    items, pixels = training_set(seed + 1, count)
    decoded = vae.decode(encode_all(vae, pixels).to(vae.device)).sample.float().cpu().clamp(-1, 1)
    psnr = 10 * math.log10(4 / (decoded - pixels).pow(2).mean().item())
    images = vae_io.to_pil(decoded)
    right = {a: sum(evaluate.read(im).get(a) == getattr(s, a) for s, im in zip(items, images)) / count
             for a in scenes.ATTRIBUTES}
    return f"reconstruction PSNR {psnr:.2f} dB; evaluator " + ", ".join(f"{a} {v:.1%}" for a, v in right.items())


def cache_latents(args) -> None:
    """Encode the denoiser's training images once; set the VAE's scaling factor from their spread."""
    vae = load_vae(args.out).to(args.device)
    log(args.out, reconstruction_report(vae, args.seed))
    items, pixels = training_set(args.seed, args.images)
    latents = encode_all(vae, pixels)
    vae.register_to_config(scaling_factor=1.0 / latents.std().item())
    vae.save_pretrained(args.out / "vae")
    table = [[getattr(s, a) for a in scenes.ATTRIBUTES] for s in items]
    torch.save({"latents": latents * vae.config.scaling_factor, "scenes": table}, args.out / "latents.pt")
    log(args.out, f"cached {len(items)} latents; scaling_factor {vae.config.scaling_factor:.5f}")


def min_snr_weights(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, gamma: float = 5.0) -> torch.Tensor:
    """Min-SNR-gamma loss weights for epsilon prediction: the easy, low-noise steps count less."""
    snr = alphas_cumprod[timesteps] / (1 - alphas_cumprod[timesteps])
    return snr.clamp(max=gamma) / snr


def train_denoiser(args) -> None:
    """The U-Net on the cached latents, the text stage's encoder frozen (as SD's CLIP is), with an
    EMA of the U-Net's weights."""
    from diffusers import DDPMScheduler

    torch.manual_seed(args.seed)
    data = torch.load(args.out / "latents.pt", weights_only=True)
    unet = architecture.denoiser().to(args.device)
    encoder = text_stage_encoder(args.out).to(args.device)
    average = EMA(unet, args.ema)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.01)
    checkpoint = Checkpoint(args.out / "denoiser_stage", {"unet": unet, "unet_ema": average.average}, optimizer)
    noise_schedule = DDPMScheduler.from_config(architecture.scheduler_config())
    alphas_cumprod = noise_schedule.alphas_cumprod.to(args.device)
    captions = Captions()
    latents, table = data["latents"].to(args.device), data["scenes"]

    def step_fn(step: int):
        rng = random.Random(args.seed * 1_000_003 + step)
        torch.manual_seed(args.seed + step)
        indices = [rng.randrange(len(table)) for _ in range(args.batch)]
        noise = torch.randn(args.batch, *latents.shape[1:]).to(args.device)
        t = torch.randint(0, noise_schedule.config.num_train_timesteps, (args.batch,)).to(args.device)
        clean = latents[torch.tensor(indices, device=args.device)]
        with torch.no_grad():
            context = encoder(captions.ids(captions_for(table, indices, rng)).to(args.device))[0]
        predicted = unet(noise_schedule.add_noise(clean, noise, t), t, context).sample
        per_item = (predicted.float() - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (per_item * min_snr_weights(alphas_cumprod, t)).mean()
        return loss, per_item.mean().item()

    run_steps(args, checkpoint, step_fn, "denoiser", average.update)


def trained(out: Path):
    """(unet, vae, text_encoder) from a run folder's last checkpoints: the U-Net's EMA weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    return (UNet2DConditionModel.from_pretrained(out / "denoiser_stage" / "unet_ema"),
            AutoencoderKL.from_pretrained(out / "vae"), text_stage_encoder(out))


def metadata(unet, vae, encoder, cfg: float) -> dict[str, str]:
    """The configs and recommended settings the single file carries (see loading/configs.py)."""
    public = lambda c: {k: v for k, v in dict(c).items() if not k.startswith("_")}  # noqa: E731 (no paths, versions)
    config = {"family": "sd1", "unet": public(unet.config), "vae": public(vae.config),
              "text_encoder": public(encoder.config.to_dict()), "scheduler": architecture.scheduler_config()}
    defaults = {"steps": 20, "cfg": cfg, "scheduler": "dpmpp_2m", "schedule": "karras"}
    return {"ldm.config": json.dumps(config), "ldm.defaults": json.dumps(defaults)}


def export(args) -> None:
    """One fp16 single file in the original (A1111/ComfyUI) layout, configs in its metadata."""
    from ldm_cli.loading import BUILTIN, convert

    unet, vae, encoder = trained(args.out)
    weights = convert.to_original("sd1", unet, vae, [encoder])
    weights = {k: v.half() if v.is_floating_point() else v for k, v in weights.items()}
    dest = args.dest or BUILTIN
    dest.parent.mkdir(parents=True, exist_ok=True)
    convert.save_single_file(weights, dest, metadata(unet, vae, encoder, args.cfg))
    log(args.out, f"exported {dest} ({dest.stat().st_size / 1e6:.1f} MB, cfg {args.cfg})")



STAGES = {"vae": train_vae, "latents": cache_latents, "text": train_text,
          "denoiser": train_denoiser, "export": export}


# Each stage's defaults: what the shipped model was trained with.
STAGE_DEFAULTS = {
    "vae": {"steps": 16000, "batch": 8, "lr": 3e-4},
    "text": {"steps": 1000, "batch": 256, "lr": 1e-3},
    "denoiser": {"steps": 20000, "batch": 64, "lr": 1e-3},
}


def arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m ldm_cli.demo.train", description=__doc__.split("\n")[0])
    parser.add_argument("stage", choices=list(STAGES))
    parser.add_argument("--out", type=Path, default=Path("runs/builtin"), help="run folder (checkpoints, log)")
    parser.add_argument("--steps", type=int, help="training steps [default: the stage's]")
    parser.add_argument("--batch", type=int, help="batch size [default: the stage's]")
    parser.add_argument("--lr", type=float, help="peak learning rate [default: the stage's]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--every", type=int, default=500, help="checkpoint every N steps")
    parser.add_argument("--report", type=int, default=2000, help="vae, text: log how well the stage does every N steps")
    parser.add_argument("--ema", type=float, default=0.999, help="denoiser: EMA decay of the exported weights")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA if there is one")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--images", type=int, default=60000, help="latents: how many training images")
    parser.add_argument("--cfg", type=float, default=5.0, help="export: the default guidance scale")
    parser.add_argument("--dest", type=Path, default=None, help="export: the .safetensors to write")
    args = parser.parse_args(argv)
    for key, value in STAGE_DEFAULTS.get(args.stage, {}).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.stage == "text" and args.batch < 4:
        parser.error("text: --batch must be at least 4 (the stage compares two wordings each of two or more captions)")
    try:
        args.device = pick_device(args.device, allow_mps=False)  # the recipe's autocast is untested on MPS
    except LdmError as error:
        parser.error(str(error))
    return args


def main(argv: list[str] | None = None) -> None:
    args = arguments(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    STAGES[args.stage](args)


if __name__ == "__main__":
    main()
