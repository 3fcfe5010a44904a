"""Write a full-size SD1.5-architecture single file (original layout, fp16, random weights,
~2.1 GB) and a diffusers config folder for it, for bench/load_time.py.

The file carries the extra keys real SD1.5 files carry (schedule buffers, position_ids, the
EMA bookkeeping scalars), so both loaders see what they would see on a downloaded file.

    python bench/make_sd15_checkpoint.py            # -> bench/out/sd15-random.safetensors, bench/out/sd15-config/
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "bench" / "out"


def random_like(name: str, shape: torch.Size, generator: torch.Generator) -> torch.Tensor:
    """Small random weights; norms at one, so activations stay finite through the forward pass."""
    if "norm" in name and name.endswith("weight"):
        return torch.ones(shape, dtype=torch.float16)
    t = torch.empty(shape, dtype=torch.float32).normal_(0, 0.02, generator=generator)
    return t.to(torch.float16)


def components(family: str = "sd1"):
    """The SD1.5 UNet, VAE and text encoder, on the meta device, from ldm's shipped configs."""
    from ldm_cli.loading import convert, recipe

    folder = recipe.SHIPPED / family
    return [convert.empty(name, recipe.read_json(recipe.config_file(folder, name)))
            for name in ("unet", "vae", "text_encoder")]


def extras() -> dict[str, torch.Tensor]:
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    alphas = torch.cumprod(1 - betas, 0)
    out = {"betas": betas, "alphas_cumprod": alphas, "alphas_cumprod_prev": torch.cat([torch.ones(1), alphas[:-1]]),
           "sqrt_alphas_cumprod": alphas.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - alphas).sqrt(),
           "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(0, dtype=torch.int32),
           "cond_stage_model.transformer.text_model.embeddings.position_ids": torch.arange(77)[None]}
    return {k: v.float() if v.is_floating_point() else v for k, v in out.items()}


def main() -> None:
    from ldm_cli.loading import convert

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT / "sd15-random.safetensors")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    modules = components()
    for module in modules:
        filled = {k: random_like(k, t.shape, generator) for k, t in module.state_dict().items()}
        module.load_state_dict(filled, assign=True)
    state = {**convert.to_original("sd1", modules[0], modules[1], [modules[2]]), **extras()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    convert.save_single_file(state, args.out, {"format": "pt"})
    write_config_folder(args.out.parent / "sd15-config")
    print(f"wrote {args.out} ({args.out.stat().st_size / 1e9:.2f} GB, {len(state)} tensors) and {args.out.parent / 'sd15-config'}")


def write_config_folder(folder: Path) -> None:
    """ldm's shipped SD1 configs plus the tokenizer: what diffusers' from_single_file(config=) reads."""
    from ldm_cli.loading import recipe

    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(recipe.SHIPPED / "sd1", folder)
    shutil.copytree(recipe.TOKENIZER, folder / "tokenizer")


if __name__ == "__main__":
    main()
