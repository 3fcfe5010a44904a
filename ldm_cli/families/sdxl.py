"""SDXL base: two text encoders (penultimate hidden states, concatenated), the second one's
pooled embedding, and size/crop conditioning ("time ids")."""
from __future__ import annotations

import torch

from ldm_cli.families import Cond, Family, unet
from ldm_cli.settings import Settings


def encode(model, texts: list[str], s: Settings, negative: bool) -> Cond:
    hidden, pooled = [], None
    with torch.inference_mode():
        for tokenizer, encoder in zip(model.tokenizers, model.text_encoders):
            out = encoder(unet.tokenize(tokenizer, texts, encoder.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
            if out[0].ndim == 2:  # the projection encoder's pooled text embedding
                pooled = out[0]
    cond = {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}
    if negative and model.options.get("force_zeros_for_empty_prompt", True):
        # SDXL was trained with zeroed conditioning for an empty negative prompt.
        empty = torch.tensor([t == "" for t in texts], device=pooled.device)
        cond = {k: torch.where(empty.view(-1, *[1] * (v.ndim - 1)), torch.zeros_like(v), v) for k, v in cond.items()}
    # (original size, crop top-left, target size), as (height, width) pairs: no crop, no resize.
    ids = torch.tensor([s.height, s.width, 0, 0, s.height, s.width], dtype=pooled.dtype, device=pooled.device)
    cond["time_ids"] = ids.repeat(len(texts), 1)
    return {k: v.to(model.dtype) for k, v in cond.items()}


SDXL = Family("sdxl", "Stable Diffusion XL", encode, unet.predict)
