"""FLUX.2 klein (4B and 9B, step-distilled or base) and FLUX.2 dev: a rectified-flow transformer
(Flux2Transformer2DModel) conditioned on an LLM's hidden states, as diffusers' Flux2KleinPipeline
(Qwen3) and Flux2Pipeline (Mistral Small 3.x) condition it.

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

klein has no distilled guidance (no guidance embedding): real classifier-free guidance, --cfg
(uncond + cfg x (cond - uncond), the pipeline's own formula), on by default for base (4) and off
(1) for the distilled release, which diffusers runs without it whatever its guidance_scale.

dev is guidance-distilled like FLUX.1 dev: --guidance (default 4, the pipeline's guidance_scale)
is an input of the transformer, and --cfg stays off at 1. Its prompt follows BFL's system
message in Mistral's chat template (<s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]prompt[/INST],
no assistant turn, "[IMG]" removed from the prompt), and layers 10, 20 and 30 are read.
A1111's emphasis weighs the LLM's input embeddings (llm_text.py, Forge Neo's way).
Editing (`ldm edit`): klein takes input images natively, as Flux2KleinPipeline(image=[...]) does:
each image's packed latents follow the noise tokens, image i's ids (10 + 10 i, row, column, 0),
and only the noise tokens' output is kept.
Text encoders: [Qwen3] (klein) or [Mistral Small 3.x] (dev).
"""
from __future__ import annotations

import math

import torch

from ldm_cli import vae
from ldm_cli.families import flux, llm_text
from ldm_cli.families.family import Cond, Editing, Family
from ldm_cli.settings import Settings

MAX_SEQUENCE_LENGTH = 512  # Flux2KleinPipeline's default
HIDDEN_LAYERS = (9, 18, 27)  # its text_encoder_out_layers
PATCH = 2  # VAE latent pixels per token side
DEV_LAYERS = (10, 20, 30)  # Flux2Pipeline's text_encoder_out_layers
# Flux2Pipeline's SYSTEM_MESSAGE (BFL's flux2 repository, system_messages.py), written before every prompt
DEV_SYSTEM = ("You are an AI that reasons about image descriptions. You give structured responses focusing on "
              "object relationships, object\nattribution and actions without speculation.")
DISTILLED = {"steps": 4, "cfg": 1.0}  # BFL's klein model card: 4 steps, no CFG
BASE = {"steps": 50, "cfg": 4.0}  # Flux2KleinPipeline.__call__'s num_inference_steps and guidance_scale
DEV = {"steps": 50, "cfg": 1.0, "guidance": 4.0}  # Flux2Pipeline.__call__'s steps and embedded guidance_scale


def defaults(name: str, scheduler_config: dict) -> dict:
    """The variant's (distilled, base or dev, loading/flux2.py tells them) steps, CFG and guidance,
    with flow Euler shifted by the pipeline's mu (None) unless the schedule has a fixed shift."""
    dynamic = scheduler_config.get("use_dynamic_shifting", False)
    recommended = {"distilled": DISTILLED, "dev": DEV}.get(name, BASE)
    return {**recommended, "scheduler": "euler", "schedule": "default",
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
    if not model.denoiser.config.guidance_embeds:  # klein
        layers, _ = llm_text.hidden_states(tokenizer, encoder, texts, length, HIDDEN_LAYERS, thinking=False)
        return {"encoder_hidden_states": torch.cat(layers, dim=-1).to(model.device, model.dtype)}
    texts = [t.replace("[IMG]", "") for t in texts]  # as the pipeline's format_input
    layers, _ = llm_text.hidden_states(tokenizer, encoder, texts, length, DEV_LAYERS, thinking=False,
                                       system=DEV_SYSTEM)
    # each token's layers side by side, (N, L, 3 x width); the guidance in float32, as the pipeline passes it
    return {"encoder_hidden_states": torch.cat(layers, dim=-1).to(model.device, model.dtype),
            "guidance": torch.full((len(texts),), float(s.guidance), dtype=torch.float32, device=model.device)}


def _ids(h: int, w: int, time: int = 0) -> torch.Tensor:
    """Each latent pixel's position id (time, row, column, 0)."""
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros + time, rows, cols, zeros], dim=-1).reshape(-1, 4)


def _tokens(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h * w, C): each latent pixel one token."""
    n, c, h, w = latents.shape
    return latents.reshape(n, c, h * w).permute(0, 2, 1)


def predict(model, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    n, c, h, w = latents.shape
    context = cond["encoder_hidden_states"]
    image_ids = _ids(h, w).to(latents.device)
    positions = torch.arange(context.shape[1])
    text_ids = torch.stack([torch.zeros_like(positions)] * 3 + [positions], dim=-1).to(latents.device)
    tokens = _tokens(latents.to(model.dtype))
    if "reference_tokens" in cond:  # an edit's input images after the noise
        tokens = torch.cat([tokens, cond["reference_tokens"].to(model.dtype)], dim=1)
        image_ids = torch.cat([image_ids, cond["reference_ids"][0]])
    out = model.denoiser(hidden_states=tokens, encoder_hidden_states=context,
                         timestep=t.expand(n).to(tokens.dtype) / 1000, img_ids=image_ids, txt_ids=text_ids,
                         guidance=cond.get("guidance"), return_dict=False)[0]
    return out[:, :h * w].permute(0, 2, 1).reshape(n, c, h, w).to(latents.dtype)


REFERENCE_AREA = 1024 * 1024  # Flux2KleinPipeline shrinks larger inputs to this many pixels
TIME_STEP = 10  # its time offset between input images (the noise is at 0)
MAX_INPUTS = 4  # BFL's limit for klein (docs.bfl.ai: up to 4 input images)


def edit_size(sizes: list[tuple[int, int]], multiple: int) -> tuple[int, int]:
    """The first input's own size, shrunk to 1 MP if larger, rounded down (the pipeline's default)."""
    width, height = sizes[0]
    if width * height > REFERENCE_AREA:
        scale = math.sqrt(REFERENCE_AREA / (width * height))
        width, height = int(width * scale), int(height * scale)
    return max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)


def references(model, inputs: list[list], s: Settings) -> Cond:
    """Each output image's inputs as tokens: their packed latents (the mode, as the pipeline
    encodes them) one after the other, image i's ids at time 10 + 10 i."""
    rows, ids = [], None
    for images in inputs:
        latents = [vae.encode(model, vae.to_tensor([image]), None) for image in images]
        rows.append(torch.cat([_tokens(z) for z in latents], dim=1))
        ids = torch.cat([_ids(*z.shape[-2:], TIME_STEP * (i + 1)) for i, z in enumerate(latents)])
    return {"reference_tokens": torch.cat(rows), "reference_ids": ids.expand(len(inputs), -1, -1)}


# each input at its own size (shrunk to 1 MP if larger), as the pipeline reads it, whatever the output's
# --mask: no diffusers pipeline; inpaint.py's blend, as for families without an inpaint pipeline
KLEIN = Editing("FLUX.2 klein", MAX_INPUTS, edit_size, references,
                input_size=lambda size, output, multiple: edit_size([size], multiple), masks=True)


# bf16: BFL ship FLUX.2 in bf16, and Qwen3 is trained in it. sample_size 64: 1024 pixels at the
# packed latents' sixteenth
FLUX2 = Family("flux2", encode, predict, cuda_dtype="bf16", flow=True, sample_size=64,
               sigmas=flux.sigmas, mu=mu, latent_patch=PATCH, to_latents=to_latents, from_latents=from_latents,
               edit={"distilled": KLEIN, "base": KLEIN})
