"""Pixels <-> latents through the model's VAE, scaled by the VAE's own config.

Latents are (z - shift_factor) * scaling_factor: 0.18215 for SD1/SD2, 0.13025 for SDXL, whatever
the config says for the built-in model. Nothing here hard-codes a number. A VAE whose config
gives each channel's latents_mean and latents_std (Qwen-Image's) is normalised per channel
instead, (z - mean) / std, the same arithmetic with a tensor for each factor. A video VAE (one
with a temperal_downsample, diffusers' spelling: Qwen-Image's AutoencoderKLQwenImage) takes and
gives a frame axis, (N, C, 1, h, w); it is added and taken off here, so latents everywhere else
are (N, C, h, w).

No image is made of values that are not finite (they would be saved as a black PNG): latents
that went NaN or inf while sampling are an error before any decoding, and so is a decode that
is still not finite after its fp32 retry.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from PIL import Image

from ldm_cli import memory
from ldm_cli.errors import LdmError

# what makes a denoiser's output NaN or inf, roughly most likely first
SAMPLING_CAUSES = ("a model file with broken (NaN) weights, a LoRA, an embedding, a prompt or LoRA weight "
                   "or --cfg far too high, or fp16 overflowing (try --dtype fp32 or bf16)")


def _factors(vae, like: torch.Tensor) -> tuple[float | torch.Tensor, float | torch.Tensor]:
    """(scale, shift), as numbers or per channel on `like`'s device and dtype."""
    config = vae.config
    if getattr(config, "latents_mean", None) is not None:
        view = (1, len(config.latents_mean), 1, 1)
        # 1 / std in float32 first, then cast: the arithmetic of diffusers' Qwen-Image pipelines
        scale = (1.0 / torch.tensor(config.latents_std).view(view)).to(like.device, like.dtype)
        return scale, torch.tensor(config.latents_mean).view(view).to(like.device, like.dtype)
    return config.scaling_factor, getattr(config, "shift_factor", None) or 0.0


def framed(vae) -> bool:
    """A video VAE: its input and output have a frame axis."""
    return getattr(vae.config, "temperal_downsample", None) is not None


def compute_dtype(vae) -> torch.dtype:
    """The dtype the VAE runs (and samples its latents) in: fp32 for fp16 VAEs that ask for it
    (or do not say: FLUX.2's and Qwen-Image's configs have no force_upcast)."""
    return torch.float32 if vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", True) else vae.dtype


@contextlib.contextmanager
def _running_in(vae, dtype: torch.dtype):
    """Temporarily cast the VAE (fp16 VAEs that overflow are run in fp32)."""
    original = vae.dtype
    if dtype != original:
        vae.to(dtype)
    try:
        yield
    finally:
        if dtype != original:
            vae.to(original)


def _decode_in(vae, z: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    with _running_in(vae, dtype), torch.inference_mode():
        if framed(vae):
            return vae.decode(z.to(dtype).unsqueeze(2), return_dict=False)[0][:, :, 0]
        return vae.decode(z.to(dtype), return_dict=False)[0]


def decode(model, latents: torch.Tensor) -> list[Image.Image]:
    """The batch's images; LdmError when sampling or decoding gave values that are not finite."""
    return to_pil(decode_pixels(model, latents))


def decode_pixels(model, latents: torch.Tensor) -> torch.Tensor:
    """The batch's [-1, 1] pixels, checked as `decode` says."""
    _check_finite(latents, f"sampling went to NaN or inf, so no image of this batch was decoded; likely causes: "
                           f"{SAMPLING_CAUSES}")
    vae = model.vae
    z = _unscaled(model, latents)
    dtype = compute_dtype(vae)
    memory.tile_if_needed(vae, z, model.vae_downscale, dtype)
    pixels = _decode_in(vae, z, dtype)
    if dtype != torch.float32 and not torch.isfinite(pixels).all():
        pixels = _decode_in(vae, z, torch.float32)  # a NaN would be saved as a black image
    _check_finite(pixels, "the VAE decoded NaN or inf even in fp32, so no image of this batch was saved; "
                          "its weights are likely broken (try another --vae)")
    return pixels


def _unscaled(model, latents: torch.Tensor) -> torch.Tensor:
    """The loop's latents as the VAE decodes them."""
    if model.family.from_latents is not None:
        return model.family.from_latents(model.vae, latents)
    scaling, shift = _factors(model.vae, latents)
    return latents / scaling + shift


def _check_finite(values: torch.Tensor, problem: str) -> None:
    if not torch.isfinite(values).all():
        bad = [i + 1 for i, row in enumerate(values) if not torch.isfinite(row).all()]
        which = "" if len(values) == 1 else f" (image{'s' * (len(bad) > 1)} {', '.join(map(str, bad))} of {len(values)})"
        raise LdmError(f"{problem}{which}; images already saved are kept")


def to_pil(pixels: torch.Tensor, rounded: bool = True) -> list[Image.Image]:
    """[-1, 1] NCHW -> 8-bit RGB images, rounding as diffusers' image processor does (or
    truncating, as A1111 makes the image its hires fix upscales)."""
    arr = (pixels / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float().numpy() * 255
    return [Image.fromarray(a) for a in (arr.round() if rounded else arr).astype(np.uint8)]


def to_tensor(images: list[Image.Image]) -> torch.Tensor:
    """8-bit RGB images -> [-1, 1] NCHW float32."""
    arr = np.stack([np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0 for im in images])
    return torch.from_numpy(arr).permute(0, 3, 1, 2) * 2 - 1


def encode(model, pixels: torch.Tensor, generators: list[torch.Generator] | None, shifted: bool = True) -> torch.Tensor:
    """Encode [-1, 1] pixels; samples the latent distribution with `generators` (None: its mode).
    `shifted`: less the VAE's shift factor before scaling (all but InstantX's SD3 ControlNets)."""
    vae = model.vae
    dtype = compute_dtype(vae)
    pixels = pixels.to(vae.device, dtype)
    with _running_in(vae, dtype), torch.inference_mode():
        dist = vae.encode(pixels.unsqueeze(2) if framed(vae) else pixels, return_dict=False)[0]
        if model.family.to_latents is not None:
            return model.family.to_latents(vae, dist, generators).to(model.dtype)
        # diffusers draws one sample per generator, image by image, as its pipelines do
        z = dist.mode() if generators is None else dist.sample(generators)
    z = z[:, :, 0] if framed(vae) else z
    scaling, shift = _factors(vae, z)
    shift = shift if shifted else 0.0
    return ((z - shift) * scaling).to(model.dtype)

