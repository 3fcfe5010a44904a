"""FLUX.2 klein (4B and 9B, step-distilled or base): a rectified-flow transformer
(Flux2Transformer2DModel) conditioned on Qwen3's hidden states, as diffusers' Flux2KleinPipeline
conditions it.

The prompt is put in Qwen3's chat template as a user turn (thinking off: llm_text.py), padded to
--max-sequence-length tokens, and hidden layers 9, 18 and 27 read and laid side by side: each
token's three states are one feature vector 3x Qwen3's width. The padding is masked inside Qwen3
but its states are all given to the transformer, as the pipeline gives them.

FLUX.2's VAE has 32 latent channels; the transformer reads them packed into 2x2 patches (128
channels at a sixteenth of the image's side) and normalised by the VAE's BatchNorm statistics.
That packed form is the loop's latent (to_latents, from_latents below): the noise is drawn in
it, as the pipeline draws it, and each latent pixel is one token, its position id (0, row,
column, 0); the text tokens' ids are (0, 0, 0, index). The schedule is FLUX's spacing shifted by
the pipeline's empirical mu, which depends on the token count and the step count.

No distilled guidance (klein's transformer has no guidance embedding): real classifier-free
guidance, --cfg (uncond + cfg x (cond - uncond), the pipeline's own formula), on by default for
base (4) and off (1) for the distilled release, which diffusers runs without it whatever its
guidance_scale. The prompt is read as written: A1111's emphasis marks are not weighted.
Text encoders: [Qwen3].
"""
from __future__ import annotations

import torch

from ldm_cli.families import flux, llm_text
from ldm_cli.families.family import Cond, Family
from ldm_cli.settings import Settings

MAX_SEQUENCE_LENGTH = 512  # Flux2KleinPipeline's default
HIDDEN_LAYERS = (9, 18, 27)  # its text_encoder_out_layers
PATCH = 2  # VAE latent pixels per token side
DISTILLED = {"steps": 4, "cfg": 1.0}  # BFL's klein model card: 4 steps, no CFG
BASE = {"steps": 50, "cfg": 4.0}  # Flux2KleinPipeline.__call__'s num_inference_steps and guidance_scale


def defaults(name: str, scheduler_config: dict) -> dict:
    """The variant's (distilled or base, loading/flux2.py tells them) steps and CFG, with flow Euler
    shifted by the pipeline's mu (None) unless the schedule has a fixed shift."""
    dynamic = scheduler_config.get("use_dynamic_shifting", False)
    return {**(DISTILLED if name == "distilled" else BASE), "scheduler": "euler", "schedule": "default",
            "shift": None if dynamic else scheduler_config.get("shift", 1.0),
            "max_sequence_length": MAX_SEQUENCE_LENGTH}


def mu(image_tokens: int, steps: int) -> float:
    """diffusers' compute_empirical_mu for FLUX.2: a fit linear in the token count, and, below 4300
    tokens, in the step count between its 10- and 200-step lines; same arithmetic."""
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    if image_tokens > 4300:
        return float(a2 * image_tokens + b2)
    at_200, at_10 = a2 * image_tokens + b2, a1 * image_tokens + b1
    slope = (at_200 - at_10) / 190.0
    return float(slope * steps + (at_200 - 200.0 * slope))


def _statistics(vae, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE's BatchNorm mean and standard deviation over the packed channels, as (1, C, 1, 1)."""
    mean = vae.bn.running_mean.view(1, -1, 1, 1)
    std = torch.sqrt(vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps)
    return mean.to(like.device, like.dtype), std.to(like.device, like.dtype)


def to_latents(vae, dist, generators: list | None) -> torch.Tensor:
    """The posterior's mode (the pipelines encode images with sample_mode="argmax": no generator
    draws), packed into 2x2 patches in the pipeline's channel order (channel, row, column) and
    normalised."""
    z = dist.mode()
    n, c, h, w = z.shape
    z = z.view(n, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 1, 3, 5, 2, 4)
    z = z.reshape(n, c * PATCH * PATCH, h // PATCH, w // PATCH)
    mean, std = _statistics(vae, z)
    return (z - mean) / std


def from_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    """to_latents' inverse: the normalisation undone and the patches unpacked."""
    mean, std = _statistics(vae, latents)
    z = latents * std + mean
    n, c, h, w = z.shape
    z = z.reshape(n, c // (PATCH * PATCH), PATCH, PATCH, h, w).permute(0, 1, 4, 2, 5, 3)
    return z.reshape(n, c // (PATCH * PATCH), h * PATCH, w * PATCH)


def encode(model, texts: list[str], s: Settings, negative: bool) -> Cond:
    tokenizer, encoder = model.tokenizers[0], model.text_encoders[0]
    length = s.max_sequence_length or MAX_SEQUENCE_LENGTH
    layers, _ = llm_text.hidden_states(tokenizer, encoder, texts, length, HIDDEN_LAYERS, thinking=False)
    states = torch.cat(layers, dim=-1)  # (N, L, 3 x width): each token's layers side by side
    return {"encoder_hidden_states": states.to(model.device, model.dtype)}


def predict(model, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    n, c, h, w = latents.shape
    context = cond["encoder_hidden_states"]
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    zeros = torch.zeros_like(rows)
    image_ids = torch.stack([zeros, rows, cols, zeros], dim=-1).reshape(-1, 4).to(latents.device)
    positions = torch.arange(context.shape[1])
    text_ids = torch.stack([torch.zeros_like(positions)] * 3 + [positions], dim=-1).to(latents.device)
    tokens = latents.to(model.dtype).reshape(n, c, h * w).permute(0, 2, 1)  # each latent pixel one token
    out = model.denoiser(hidden_states=tokens, encoder_hidden_states=context,
                         timestep=t.expand(n).to(tokens.dtype) / 1000, img_ids=image_ids, txt_ids=text_ids,
                         guidance=None, return_dict=False)[0]
    return out.permute(0, 2, 1).reshape(n, c, h, w).to(latents.dtype)


# bf16: BFL ship FLUX.2 in bf16, and Qwen3 is trained in it. sample_size 64: 1024 pixels at the
# packed latents' sixteenth
FLUX2 = Family("flux2", encode, predict, cuda_dtype="bf16", flow=True, sample_size=64,
               sigmas=flux.sigmas, mu=mu, latent_patch=PATCH, to_latents=to_latents, from_latents=from_latents)
