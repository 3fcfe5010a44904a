"""FLUX.1 dev and schnell: a rectified-flow transformer (FluxTransformer2DModel) conditioned on
CLIP-L's pooled embedding and T5's sequence, as diffusers' FluxPipeline conditions it.

The transformer reads latents as 2x2 patches: a (16, h, w) latent is h/2 * w/2 tokens of 64
features, each with the position id (0, row, column); the text tokens' ids are zeros. Packing
is a permutation, so it happens here, around the transformer call: the loop, the scheduler and
inpainting's blend keep working on (N, 16, h, w) latents, element for element the arithmetic
diffusers does on packed ones, and no other family needs to know.

dev is guidance-distilled: the guidance scale (--guidance) is an input of the transformer, and
real classifier-free guidance (--cfg) is off at its default 1. schnell has neither.
Prompts are read as Forge reads them for FLUX: CLIP-L's pooled embedding from the first 75-token
chunk of the prompt without its emphasis marks (clip_text.py), A1111's emphasis on T5's states
(t5.py); a prompt without weights gives FluxPipeline's conditioning exactly.
Text encoders: [CLIP-L, T5].
"""
from __future__ import annotations

import numpy as np
import torch

from ldm_cli import vae
from ldm_cli.families import clip_text, t5
from ldm_cli.families.family import Cond, Family
from ldm_cli.settings import Settings

MAX_SEQUENCE_LENGTH = 512  # diffusers' FluxPipeline default
DEV_GUIDANCE = 3.5
PATCH = 2  # latent pixels per token side


def variant(config) -> str:
    """dev carries a guidance embedding; schnell does not."""
    return "dev" if config.get("guidance_embeds") else "schnell"


def defaults(name: str, scheduler_config: dict) -> dict:
    """What BFL recommends: dev 28 steps at guidance 3.5, schnell 4; both without real CFG. The
    shift is dev's resolution-dependent one (None) unless the schedule has a fixed one. No
    `no_t5`: FLUX always runs with T5 (a model without it is refused), so --no-t5 is dropped."""
    dynamic = scheduler_config.get("use_dynamic_shifting", False)
    out = {"steps": 28, "cfg": 1.0, "scheduler": "euler", "schedule": "default",
           "shift": None if dynamic else scheduler_config.get("shift", 1.0),
           "max_sequence_length": MAX_SEQUENCE_LENGTH}
    return {**out, "guidance": DEV_GUIDANCE} if name == "dev" else {**out, "steps": 4}


def sigmas(steps: int) -> list[float]:
    """FluxPipeline's spacing before the shift: 1 down to 1/steps, evenly."""
    return list(np.linspace(1.0, 1 / steps, steps))


def encode(model, texts: list[str], s: Settings, negative: bool) -> Cond:
    clip, encoder = model.text_encoders
    _, pooled = clip_text.encode(clip, model.tokenizers[0], texts, clip_text.Layer(), model.embeddings)
    length = s.max_sequence_length or MAX_SEQUENCE_LENGTH
    context = t5.encode(model.tokenizers[1], encoder, texts, length, model.denoiser.config.joint_attention_dim,
                        pooled.dtype, pooled.device)
    cond = {"encoder_hidden_states": context, "pooled_projections": pooled}
    cond = {k: v.to(pooled.device, model.dtype) for k, v in cond.items()}
    if model.denoiser.config.guidance_embeds:  # float32, as diffusers passes it
        cond["guidance"] = torch.full((len(texts),), float(s.guidance), dtype=torch.float32, device=pooled.device)
    return cond


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(N, C, h, w) -> (N, h/2 * w/2, 4C), in FluxPipeline's order."""
    n, c, h, w = latents.shape
    patches = latents.view(n, c, h // PATCH, PATCH, w // PATCH, PATCH).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(n, (h // PATCH) * (w // PATCH), c * PATCH * PATCH)


def unpack(tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """pack's inverse: (N, h/2 * w/2, 4C) -> (N, C, h, w)."""
    n, _, features = tokens.shape
    c = features // (PATCH * PATCH)
    patches = tokens.view(n, h // PATCH, w // PATCH, c, PATCH, PATCH).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(n, c, h, w)


def image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Each token's position id (0, row, column), over the h/2 x w/2 grid of patches."""
    rows, cols = torch.meshgrid(torch.arange(h // PATCH), torch.arange(w // PATCH), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device, dtype)


def _inputs(latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> dict:
    """What the transformer and its ControlNets both read for these latents."""
    n, _, h, w = latents.shape
    context = cond["encoder_hidden_states"]
    return dict(hidden_states=pack(latents), timestep=t.expand(n).to(latents.dtype) / 1000,
                pooled_projections=cond["pooled_projections"], encoder_hidden_states=context,
                txt_ids=torch.zeros(context.shape[1], 3, device=context.device, dtype=context.dtype),
                img_ids=image_ids(h, w, latents.device, latents.dtype))


def predict(model, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    control = {k: cond[k] for k in CONTROL_KEYS if k in cond}
    out = model.denoiser(**_inputs(latents, t, cond), guidance=cond.get("guidance"), **control, return_dict=False)[0]
    return unpack(out, *latents.shape[-2:])


# ControlNet samples, put into the conditioning by the loop (control.py) when units act
CONTROL_KEYS = ("controlnet_block_samples", "controlnet_single_block_samples", "controlnet_blocks_repeat")


def control_input(model, net, images: torch.Tensor, generators: list) -> torch.Tensor:
    """A FLUX ControlNet reads the control image's VAE latents, sampled from the images'
    generators (InstantX's, Shakker's: FluxControlNetPipeline's order), or, with a hint encoder of
    its own (XLabs'), the pixels in [-1, 1]."""
    pixels = images * 2 - 1
    return pixels if net.input_hint_block is not None else vae.encode(model, pixels, generators)


def control_residuals(model, net, x: torch.Tensor, t: torch.Tensor, cond: Cond, image: torch.Tensor,
                      scale: float, mode: int | None = None) -> dict:
    hinted = net.input_hint_block is not None
    kind = None if mode is None else torch.full((x.shape[0], 1), mode, dtype=torch.long, device=x.device)
    blocks, singles = net(**_inputs(x, t, cond), controlnet_cond=image if hinted else pack(image),
                          controlnet_mode=kind, guidance=cond.get("guidance") if net.config.guidance_embeds else None,
                          conditioning_scale=scale, return_dict=False)
    return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": singles,
            "controlnet_blocks_repeat": hinted}


# bf16: T5 v1.1 overflows in fp16, and BFL ship FLUX in bf16
FLUX = Family("flux", encode, predict, cuda_dtype="bf16", flow=True, patch_size=PATCH, sample_size=128,
              sigmas=sigmas, control_input=control_input, control_residuals=control_residuals)
