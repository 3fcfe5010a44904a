"""Stable Diffusion 1.x and 2.x: one CLIP text encoder, its last hidden state as context.

SD2's OpenCLIP encoder is stored with 23 layers (the 24th is unused), so its last hidden state
is the penultimate layer SD2 was trained on, and the same code serves both.
"""
from __future__ import annotations

import torch

from ldm_cli.families import Cond, Family, unet
from ldm_cli.settings import Settings


def encode(model, texts: list[str], s: Settings, negative: bool) -> Cond:
    encoder = model.text_encoders[0]
    ids = unet.tokenize(model.tokenizers[0], texts, encoder.device)
    mask = None
    if getattr(encoder.config, "use_attention_mask", False):
        mask = (ids != model.tokenizers[0].pad_token_id).long()
    with torch.inference_mode():
        hidden = encoder(ids, attention_mask=mask)[0]
    return {"encoder_hidden_states": hidden.to(model.dtype)}


SD1 = Family("sd1", "Stable Diffusion 1.x", encode, unet.predict)
SD2 = Family("sd2", "Stable Diffusion 2.x", encode, unet.predict)
