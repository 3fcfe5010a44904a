"""Stable Diffusion 3 and 3.5: an MMDiT (SD3Transformer2DModel) trained with flow matching, three
text encoders, conditioning as diffusers' StableDiffusion3Pipeline builds it.

The context is CLIP-L's and OpenCLIP bigG's penultimate hidden states (77 tokens a chunk,
concatenated along the features and zero-padded to T5's width) followed by T5's states
(--max-sequence-length tokens, zeros without T5); the pooled embedding is the two CLIP
projections of the first chunk concatenated. Prompts are read as Forge reads them for SD3:
A1111's chunks and emphasis in the CLIPs (clip_text.py), emphasis in T5 (t5.py); a prompt of at
most 75 tokens without weights gives diffusers' conditioning exactly (it cuts CLIP at 77 tokens,
where A1111 and Forge go on in chunks). Text encoders: [CLIP-L, bigG, T5 or None].
"""
from __future__ import annotations

import torch

from ldm_cli import vae
from ldm_cli.families import clip_text, t5
from ldm_cli.families.family import Cond, Family
from ldm_cli.settings import Settings

MAX_SEQUENCE_LENGTH = 256  # diffusers' default for SD3
PENULTIMATE = clip_text.Layer(skip=2, normed=False)


def defaults(turbo: bool = False, shift: float = 3.0, t5_present: bool = True) -> dict:
    """What SD3 recommends: 28 steps at cfg 7 with flow Euler; the distilled turbo, 4 steps at cfg 1."""
    out = {"steps": 28, "cfg": 7.0, "scheduler": "euler", "schedule": "default", "shift": shift,
           "max_sequence_length": MAX_SEQUENCE_LENGTH, "no_t5": not t5_present}
    return {**out, "steps": 4, "cfg": 1.0} if turbo else out


def variant(config) -> str:
    """sd3, sd35-medium (MMDiT-X: dual attention layers) or sd35-large (q/k norms, no dual attention)."""
    if config.get("dual_attention_layers"):
        return "sd35-medium"
    return "sd35-large" if config.get("qk_norm") else "sd3"


def _clip(model, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(penultimate hidden states of both CLIPs concatenated, their pooled projections concatenated),
    prompts read as A1111 and Forge read them (clip_text.py): 77 tokens a chunk."""
    hidden, pooled = [], []
    for index, (tokenizer, encoder) in enumerate(zip(model.tokenizers[:2], model.text_encoders[:2])):
        states, projected = clip_text.encode(encoder, tokenizer, texts, PENULTIMATE, model.embeddings, index)
        hidden.append(states)
        pooled.append(projected)
    return torch.cat(hidden, dim=-1), torch.cat(pooled, dim=-1)


def encode(model, texts: list[str], s: Settings, negative: bool) -> Cond:
    clip, pooled = _clip(model, texts)
    encoder = None if s.no_t5 else model.text_encoders[2]
    length = s.max_sequence_length or MAX_SEQUENCE_LENGTH
    context = t5.encode(model.tokenizers[2], encoder, texts, length, model.denoiser.config.joint_attention_dim,
                        clip.dtype, clip.device)
    clip = torch.nn.functional.pad(clip, (0, context.shape[-1] - clip.shape[-1]))
    cond = {"encoder_hidden_states": torch.cat([clip, context.to(clip.device, clip.dtype)], dim=-2),
            "pooled_projections": pooled}
    return {k: v.to(model.dtype) for k, v in cond.items()}


def predict(model, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    return model.denoiser(hidden_states=latents, timestep=t.expand(latents.shape[0]),
                          encoder_hidden_states=cond["encoder_hidden_states"],
                          pooled_projections=cond["pooled_projections"],
                          block_controlnet_hidden_states=cond.get("block_controlnet_hidden_states"),
                          return_dict=False)[0]


def control_input(model, net, images: torch.Tensor, generators: list) -> torch.Tensor:
    """An SD3 ControlNet reads the control image's VAE latents: the distribution's mode (diffusers
    samples it from the global RNG, so its images do not follow the seed), not shifted for
    InstantX's nets (force_zeros_for_pooled_projection), shifted for Stability's, as diffusers."""
    return vae.encode(model, images * 2 - 1, None, shifted=not net.config.force_zeros_for_pooled_projection)


def control_residuals(model, net, x: torch.Tensor, t: torch.Tensor, cond: Cond, image: torch.Tensor,
                      scale: float, mode: int | None = None) -> dict:
    pooled = cond["pooled_projections"]
    samples = net(hidden_states=x, timestep=t.expand(x.shape[0]), controlnet_cond=image, conditioning_scale=scale,
                  pooled_projections=torch.zeros_like(pooled) if net.config.force_zeros_for_pooled_projection else pooled,
                  encoder_hidden_states=cond["encoder_hidden_states"] if net.config.joint_attention_dim else None,
                  return_dict=False)[0]
    return {"block_controlnet_hidden_states": samples}


# bf16: T5 v1.1 overflows in fp16
SD3 = Family("sd3", encode, predict, cuda_dtype="bf16", flow=True,
             control_input=control_input, control_residuals=control_residuals)
