"""A T5 encoder's part of the conditioning: the tokens diffusers' SD3 and FLUX pipelines give it
(the prompt padded or cut to `length` tokens, the end token included, no attention mask; its
last hidden state), with A1111's emphasis as Forge applies it to T5: the prompt's weighted
fragments (prompt_syntax.emphasis) tokenized one by one, each token's state multiplied by its
weight and the whole scaled back to its former mean ("Original"). BREAK has no chunks to close
in T5's one sequence and is dropped. A prompt without weights gives diffusers' tokens and
states exactly. Without a T5 encoder the part is zeros of the same shape, what diffusers uses
when `text_encoder_3` is None, so the two stay equal. A family trained with T5's padding masked
(Chroma) reads it through `encode_masked`: the same tokens, the encoder told which are padding.
"""
from __future__ import annotations

import torch

from ldm_cli.families.clip_text import weighted
from ldm_cli.notes import note
from ldm_cli.prompt_syntax import BREAK, BREAK_WEIGHT, emphasis

MAX_LENGTH = 512  # T5's tokenizer limit; diffusers refuses more


def tokenize(tokenizer, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids, each token's weight): `length` per text, cut with a note where longer."""
    ids, weights, _ = _tokenized(tokenizer, texts, length)
    return ids, weights


def _tokenized(tokenizer, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """tokenize's ids and weights, and each text's count of tokens that are not padding."""
    rows = [_weighted_tokens(tokenizer, text) for text in texts]
    ids, weights, kept_counts = [], [], []
    for text, (tokens, token_weights) in zip(texts, rows):
        if len(tokens) + 1 > length:
            note(f"the prompt is {len(tokens) + 1} T5 tokens, more than --max-sequence-length {length}; "
                 f"cut off: {_short(tokenizer.decode(tokens[length - 1:]))!r}")
        kept = tokens[:length - 1] + [tokenizer.eos_token_id]
        ids.append(kept + [tokenizer.pad_token_id] * (length - len(kept)))
        weights.append(token_weights[:length - 1] + [1.0] * (length - len(kept) + 1))
        kept_counts.append(len(kept))
    return torch.tensor(ids), torch.tensor(weights), torch.tensor(kept_counts)


def _weighted_tokens(tokenizer, text: str) -> tuple[list[int], list[float]]:
    fragments = [(f, w) for f, w in emphasis(text) if (f, w) != (BREAK, BREAK_WEIGHT)] or [("", 1.0)]
    pieces = tokenizer([f for f, _ in fragments], add_special_tokens=False).input_ids
    return ([token for piece in pieces for token in piece],
            [w for piece, (_, w) in zip(pieces, fragments) for _ in piece])


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def encode(tokenizer, encoder, texts: list[str], length: int, width: int, zeros_dtype: torch.dtype,
           device: torch.device) -> torch.Tensor:
    """len(texts) x length x width: T5's last hidden state weighted, or zeros when `encoder` is None."""
    if encoder is None:
        return torch.zeros(len(texts), length, width, dtype=zeros_dtype, device=device)
    ids, weights = tokenize(tokenizer, texts, length)
    with torch.inference_mode():
        states = encoder(ids.to(encoder.device))[0]
        return weighted(states, weights.to(states.device))


def encode_masked(tokenizer, encoder, texts: list[str], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5's weighted last hidden state, each text's count of tokens that are not padding), the
    encoder reading with the tokenizer's attention mask (padding masked), as ChromaPipeline does."""
    ids, weights, counts = _tokenized(tokenizer, texts, length)
    mask = (torch.arange(length).unsqueeze(0) < counts.unsqueeze(1)).long()
    with torch.inference_mode():
        states = encoder(ids.to(encoder.device), attention_mask=mask.to(encoder.device))[0]
        return weighted(states, weights.to(states.device)), counts
