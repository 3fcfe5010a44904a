"""SDXL base: two text encoders (penultimate hidden states, concatenated), the second one's
pooled embedding, and size/crop conditioning ("time ids"). Prompts are read as A1111 reads
them (clip_text.py), each encoder chunking its own tokens; the pooled embedding is the first
chunk's, as A1111 takes it. --clip-skip does not apply, as in A1111."""
from __future__ import annotations

import torch

from ldm_cli.families import clip_text, sd, unet
from ldm_cli.families.family import Cond, Family
from ldm_cli.settings import Settings

PENULTIMATE = clip_text.Layer(skip=2, normed=False)


def encode(model, texts: list[str], s: Settings, negative: bool) -> Cond:
    sd.ignored_clip_skip(s, "SDXL")
    hidden, pooled = [], None
    for index, (tokenizer, encoder) in enumerate(zip(model.tokenizers, model.text_encoders)):
        states, projected = clip_text.encode(encoder, tokenizer, texts, PENULTIMATE, model.embeddings, index)
        hidden.append(states)
        pooled = projected if projected is not None else pooled
    cond = {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}
    if negative and model.options.get("force_zeros_for_empty_prompt", True) and all(t == "" for t in texts):
        # SDXL was trained with zeroed conditioning for an empty negative prompt.
        cond = {k: torch.zeros_like(v) for k, v in cond.items()}
    # (original size, crop top-left, target size), as (height, width) pairs: no crop, no resize.
    ids = torch.tensor([s.height, s.width, 0, 0, s.height, s.width], dtype=pooled.dtype, device=pooled.device)
    cond["time_ids"] = ids.repeat(len(texts), 1)
    return {k: v.to(model.dtype) for k, v in cond.items()}


SDXL = Family("sdxl", encode, unet.predict, control_input=unet.control_input,
              control_residuals=unet.control_residuals)
