"""A T5 encoder's part of the conditioning, as diffusers' SD3 (and FLUX) pipelines compute it:
the prompt padded or cut to `length` tokens (the end token included), no attention mask, the
last hidden state. Without a T5 encoder the part is zeros of the same shape, exactly what
diffusers uses when `text_encoder_3` is None, so the two stay equal.
"""
from __future__ import annotations

import torch

from ldm_cli.notes import note

MAX_LENGTH = 512  # T5's tokenizer limit; diffusers refuses more


def tokenize(tokenizer, texts: list[str], length: int) -> torch.Tensor:
    """Token ids, `length` per text; says once per text what was cut off."""
    ids = tokenizer(texts, padding="max_length", max_length=length, truncation=True,
                    add_special_tokens=True, return_tensors="pt").input_ids
    for text, full in zip(texts, tokenizer(texts).input_ids):
        if len(full) > length:
            cut = tokenizer.decode(full[length - 1:-1])
            note(f"the prompt is {len(full)} T5 tokens, more than --max-sequence-length {length}; "
                 f"cut off: {_short(cut)!r}")
    return ids


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def encode(tokenizer, encoder, texts: list[str], length: int, width: int, zeros_dtype: torch.dtype,
           device: torch.device) -> torch.Tensor:
    """len(texts) x length x width: T5's last hidden state, or zeros when `encoder` is None."""
    if encoder is None:
        return torch.zeros(len(texts), length, width, dtype=zeros_dtype, device=device)
    ids = tokenize(tokenizer, texts, length).to(encoder.device)
    with torch.inference_mode():
        return encoder(ids)[0]
