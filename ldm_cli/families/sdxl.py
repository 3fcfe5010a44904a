"""SDXL base: two text encoders (penultimate hidden states, concatenated), the second one's
pooled embedding, and size/crop conditioning ("time ids"). Prompts are read as A1111 reads
them (clip_text.py), each encoder chunking its own tokens; the pooled embedding is the first
chunk's, as A1111 takes it. --clip-skip does not apply, as in A1111.

SDXL's refiner (variant "refiner") is the same family with OpenCLIP-G alone (its only text
encoder, read as the base reads its second) and an aesthetic score in place of the target size
in its time ids: 6.0 for the prompt, 2.5 for the negative, diffusers' defaults."""
from __future__ import annotations

import torch

from ldm_cli.families import clip_text, sd, unet
from ldm_cli.families.family import Cond, Family
from ldm_cli.settings import Settings

PENULTIMATE = clip_text.Layer(skip=2, normed=False)
REFINER = "refiner"
AESTHETIC_SCORE, NEGATIVE_AESTHETIC_SCORE = 6.0, 2.5


def encode(model, texts: list[str], s: Settings, negative: bool) -> Cond:
    sd.ignored_clip_skip(s, "SDXL")
    refiner = model.options.get("variant") == REFINER
    # the embeddings' slot of each encoder: a refiner's one encoder is the base's second (CLIP-G)
    slots = [1] if refiner else range(len(model.text_encoders))
    hidden, pooled = [], None
    for slot, tokenizer, encoder in zip(slots, model.tokenizers, model.text_encoders):
        states, projected = clip_text.encode(encoder, tokenizer, texts, PENULTIMATE, model.embeddings, slot)
        hidden.append(states)
        pooled = projected if projected is not None else pooled
    cond = {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}
    if negative and model.options.get("force_zeros_for_empty_prompt", True) and all(t == "" for t in texts):
        # SDXL was trained with zeroed conditioning for an empty negative prompt.
        cond = {k: torch.zeros_like(v) for k, v in cond.items()}
    cond["time_ids"] = time_ids(s, refiner, negative).to(pooled).repeat(len(texts), 1)
    return {k: v.to(model.dtype) for k, v in cond.items()}


def time_ids(s: Settings, refiner: bool, negative: bool) -> torch.Tensor:
    """(original size, crop top-left, then the target size or, for the refiner, the aesthetic
    score), sizes as (height, width): no crop, no resize."""
    last = [NEGATIVE_AESTHETIC_SCORE if negative else AESTHETIC_SCORE] if refiner else [s.height, s.width]
    return torch.tensor([s.height, s.width, 0, 0, *last], dtype=torch.float32)


SDXL = Family("sdxl", encode, unet.predict, control_input=unet.control_input,
              control_residuals=unet.control_residuals, refiner=REFINER)
