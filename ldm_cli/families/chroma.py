"""Chroma (Chroma1-HD, Chroma1-Base): FLUX.1 schnell's transformer with its per-block modulation
replaced by one small network (the "distilled guidance layer") fed the timestep alone, conditioned
on T5-XXL only, as diffusers' ChromaPipeline conditions it (ChromaTransformer2DModel).

Latents are FLUX's: packed into 2x2 patches inside predict with FLUX's position ids (flux.pack,
flux.image_ids), so the loop, the schedulers and inpainting keep (N, 16, h, w) latents.
Chroma was trained with T5's padding masked but one padding token left visible: T5 reads the
prompt with the tokenizer's mask, and the transformer is given ChromaPipeline's mask of the
prompt's tokens, one more, and every image token. The conditioning carries each text's mask;
predict appends the image tokens' ones, whose count it alone knows. The mask is in the model's
float dtype, exactly as diffusers 0.42 passes it, so the same images come out; note that SDPA
adds a float mask to the scores (1 kept, 0 "masked"), so padding is not actually masked there
(diffusers issues #12116, #13619; the reference code and ComfyUI mask with booleans).

No distilled guidance: real classifier-free guidance, --cfg (uncond + cfg x (cond - uncond)), on
by default. Text encoders: [T5].
"""
from __future__ import annotations

import torch

from ldm_cli.families import flux, t5
from ldm_cli.families.family import Cond, Family
from ldm_cli.settings import Settings

MAX_SEQUENCE_LENGTH = 512  # ChromaPipeline's default
STEPS, CFG = 35, 5.0  # ChromaPipeline.__call__'s defaults (num_inference_steps, guidance_scale)


def defaults(scheduler_config: dict) -> dict:
    """ChromaPipeline's steps and guidance with flow Euler; the shift is computed from the image
    size (None) where the schedule shifts dynamically, as Chroma1-HD's does."""
    dynamic = scheduler_config.get("use_dynamic_shifting", False)
    return {"steps": STEPS, "cfg": CFG, "scheduler": "euler", "schedule": "default",
            "shift": None if dynamic else scheduler_config.get("shift", 1.0),
            "max_sequence_length": MAX_SEQUENCE_LENGTH}


def encode(model, texts: list[str], s: Settings, negative: bool) -> Cond:
    [encoder], [tokenizer] = model.text_encoders, model.tokenizers
    length = s.max_sequence_length or MAX_SEQUENCE_LENGTH
    states, counts = t5.encode_masked(tokenizer, encoder, texts, length)
    # `<=`: the first padding token stays visible to the transformer (ChromaPipeline._get_t5_prompt_embeds)
    mask = torch.arange(length).unsqueeze(0) <= counts.unsqueeze(1)
    return {"encoder_hidden_states": states.to(model.device, model.dtype), "text_mask": mask.to(model.device, model.dtype)}


def predict(model, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    n, _, h, w = latents.shape
    context, text_mask = cond["encoder_hidden_states"], cond["text_mask"]
    tokens = (h // flux.PATCH) * (w // flux.PATCH)
    # ones (bool) after the text's mask: torch.cat promotes them to its dtype, as ChromaPipeline does
    mask = torch.cat([text_mask, torch.ones(n, tokens, dtype=torch.bool, device=text_mask.device)], dim=1)
    out = model.denoiser(hidden_states=flux.pack(latents), timestep=t.expand(n).to(latents.dtype) / 1000,
                         encoder_hidden_states=context,
                         txt_ids=torch.zeros(context.shape[1], 3, device=context.device, dtype=context.dtype),
                         img_ids=flux.image_ids(h, w, latents.device, latents.dtype), attention_mask=mask,
                         return_dict=False)[0]
    return flux.unpack(out, h, w)


# bf16: T5 v1.1 overflows in fp16, and Chroma ships in bf16
CHROMA = Family("chroma", encode, predict, cuda_dtype="bf16", flow=True, patch_size=flux.PATCH,
                sample_size=128, sigmas=flux.sigmas)  # ChromaPipeline's default_sample_size: 1024 pixels
