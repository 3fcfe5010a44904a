"""A CLIP text encoder read as A1111 reads it ("Original" emphasis), for every family (SD1, SD2,
SDXL and SD3's context; FLUX's pooled embedding), as A1111 and Forge read them.

A prompt's weighted fragments (prompt_syntax.emphasis) are tokenized one by one and laid into
chunks of 75 tokens, each framed by the start and end tokens into 77. A chunk that fills up
while a comma lies within its last 20 tokens moves the words after that comma to the next chunk;
BREAK closes a chunk early; the rest of a chunk is end tokens (OpenCLIP's "!" after the first).
Every chunk is encoded on its own and the chunks' states are concatenated: 77, 154, 231 ...
tokens of context. Then each token's state is multiplied by its weight and the whole is scaled
back to its mean before weighting.

The texts of one call are one A1111 batch (the prompts of one prompt's schedule): shorter ones
get empty chunks up to the longest, and the mean is taken over the batch's chunk, as A1111
takes it. A prompt of at most 75 tokens without weights gives exactly the tokenizer's padded
77 tokens and the encoder's plain output, as diffusers computes it.

Textual inversion: an `EmbeddingLookup` (Model.embeddings) names embeddings at token
positions; their vectors take the place of the token embeddings there, as A1111 splices them.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence

import torch

from ldm_cli import limits
from ldm_cli.errors import LdmError
from ldm_cli.prompt_syntax import BREAK, BREAK_WEIGHT, emphasis

CHUNK = 75  # prompt tokens per chunk, between the start and end tokens
BACKTRACK = 20  # A1111's comma_padding_backtrack default
PLACEHOLDER = 0  # the token id an embedding's vectors replace, as A1111 writes it


class EmbeddingLookup(Protocol):
    """Textual-inversion embeddings as the tokenizer sees their names."""

    def find(self, tokens: Sequence[int], position: int, encoder: int) -> tuple[torch.Tensor, int] | None:
        """An embedding whose name's tokens start at tokens[position]: (its vectors for text
        encoder `encoder` (0: CLIP-L, 1: SDXL's OpenCLIP bigG), vectors x width; how many of
        `tokens` its name takes), or None."""


@dataclass
class Chunk:
    tokens: list[int]
    weights: list[float]
    fixes: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (offset after the start token, vectors)


class _Chunker:
    """Lays weighted tokens into chunks, as A1111's tokenize_line does."""

    def __init__(self, tokenizer):
        self.start, self.end = tokenizer.bos_token_id, tokenizer.eos_token_id
        comma = tokenizer.convert_tokens_to_ids(",</w>")
        self.comma = None if comma == tokenizer.unk_token_id else comma
        self.chunks: list[Chunk] = []
        self._open()

    def _open(self) -> None:
        self.tokens, self.weights, self.fixes = [], [], []
        self.last_comma = -1

    def close(self) -> None:
        pad = CHUNK - len(self.tokens)
        self.chunks.append(Chunk([self.start, *self.tokens, *[self.end] * pad, self.end],
                                 [1.0, *self.weights, *[1.0] * pad, 1.0], self.fixes))
        self._open()

    def before(self, token: int) -> None:
        """Bookkeeping before `token` is placed: commas, moving words after one, a full chunk."""
        if token == self.comma:
            self.last_comma = len(self.tokens)
        elif len(self.tokens) == CHUNK and self.last_comma != -1 and CHUNK - self.last_comma <= BACKTRACK:
            cut = self.last_comma + 1
            moved = self.tokens[cut:], self.weights[cut:]
            del self.tokens[cut:], self.weights[cut:]
            self.close()  # the moved words' embedding fixes stay behind, as in A1111
            self.tokens, self.weights = list(moved[0]), list(moved[1])
        if len(self.tokens) == CHUNK:
            self.close()

    def lay(self, tokens: list[int], weight: float, lookup: EmbeddingLookup | None, encoder: int) -> None:
        """One fragment's tokens, an embedding's name taking its vectors' places."""
        position = 0
        while position < len(tokens):
            self.before(tokens[position])
            found = lookup.find(tokens, position, encoder) if lookup is not None else None
            if found is None:
                self.tokens.append(tokens[position])
                self.weights.append(weight)
                position += 1
            else:
                self.add_embedding(found[0], weight)
                position += found[1]

    def add_embedding(self, vectors: torch.Tensor, weight: float) -> None:
        if len(self.tokens) + len(vectors) > CHUNK:
            self.close()
        self.fixes.append((len(self.tokens), vectors))
        self.tokens += [PLACEHOLDER] * len(vectors)
        self.weights += [weight] * len(vectors)


def chunks(tokenizer, text: str, lookup: EmbeddingLookup | None = None, encoder: int = 0) -> list[Chunk]:
    """`text` as 77-token chunks (at least one)."""
    fragments = emphasis(text)
    ids = tokenizer([t for t, _ in fragments], truncation=False, add_special_tokens=False)["input_ids"]
    out = _Chunker(tokenizer)
    for tokens, (fragment, weight) in zip(ids, fragments):
        if fragment == BREAK and weight == BREAK_WEIGHT:
            out.close()
        else:
            out.lay(tokens, weight, lookup, encoder)
    if out.tokens or not out.chunks:
        out.close()
    if len(out.chunks) > limits.MAX_PROMPT_CHUNKS:  # Settings.validate counted them at the least
        raise LdmError(f"a prompt ({text[:40]!r}...) takes {len(out.chunks)} chunks of 75 tokens; at most "
                       f"{limits.MAX_PROMPT_CHUNKS} are encoded (cost grows with their square); shorten it")
    return out.chunks


def empty_chunk(tokenizer) -> Chunk:
    return Chunk([tokenizer.bos_token_id] + [tokenizer.eos_token_id] * (CHUNK + 1), [1.0] * (CHUNK + 2))


@dataclass(frozen=True)
class Layer:
    """Which hidden states: `skip` layers from the end (1: the last), through the final layer
    norm when `normed` (SD1's clip skip, SD2) or as they are (SDXL's penultimate states)."""
    skip: int = 1
    normed: bool = True


@torch.inference_mode()
def encode(encoder, tokenizer, texts: list[str], layer: Layer, lookup: EmbeddingLookup | None = None,
           index: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(states: len(texts) x 77k x width, the pooled embedding of each text's first chunk: the
    projection where the encoder has one, else the end token's final state); `index` names the
    encoder to `lookup`."""
    check_layer(encoder, layer)
    rows = [chunks(tokenizer, text, lookup, index) for text in texts]
    states, pooled = [], None
    for c in range(max(len(r) for r in rows)):
        batch = [r[c] if c < len(r) else empty_chunk(tokenizer) for r in rows]
        z, projected = _encode_chunk(encoder, tokenizer, batch, layer)
        states.append(weighted(z, torch.tensor([b.weights for b in batch], device=z.device)))
        pooled = projected if c == 0 else pooled
    return torch.cat(states, dim=1), pooled


def weighted(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Each token's state times its weight, then all of `z` scaled back to its former mean."""
    if bool((weights == 1).all()):
        return z
    mean = z.mean()
    z = z * weights.unsqueeze(-1).expand(z.shape)
    return z * (mean / z.mean())


def check_layer(encoder, layer: Layer) -> None:
    layers = encoder.config.num_hidden_layers
    if layer.skip > layers:
        raise LdmError(f"--clip-skip {layer.skip} is more than this text encoder's {layers} layers")


def _encode_chunk(encoder, tokenizer, batch: list[Chunk], layer: Layer) -> tuple[torch.Tensor, torch.Tensor | None]:
    ids = _ids(batch, tokenizer, encoder.device)
    mask = (ids != tokenizer.pad_token_id).long() if getattr(encoder.config, "use_attention_mask", False) else None
    last = layer.skip == 1 and layer.normed
    with _spliced(encoder, [b.fixes for b in batch]):
        out = encoder(ids, attention_mask=mask, output_hidden_states=not last)
    pooled = out[0] if out[0].ndim == 2 else out.pooler_output  # a projection model's text embedding, or the end token's state
    if last:
        return out.last_hidden_state, pooled
    states = out.hidden_states[-layer.skip]
    return (_final_norm(encoder)(states) if layer.normed else states), pooled


def _ids(batch: list[Chunk], tokenizer, device: torch.device) -> torch.Tensor:
    ids = torch.tensor([b.tokens for b in batch], device=device)
    if tokenizer.pad_token_id != tokenizer.eos_token_id:  # OpenCLIP pads with "!" after the first end token
        first_end = (ids == tokenizer.eos_token_id).int().argmax(dim=1, keepdim=True)
        ids = ids.masked_fill(torch.arange(ids.shape[1], device=device) > first_end, tokenizer.pad_token_id)
    return ids


def _final_norm(encoder) -> torch.nn.Module:
    # transformers 5's CLIPTextModel holds the layer norm itself; the projection model one level down
    return getattr(encoder, "text_model", encoder).final_layer_norm


@contextmanager
def _spliced(encoder, fixes: list[list[tuple[int, torch.Tensor]]]) -> Iterator[None]:
    """While encoding, embedding vectors replace the token embeddings at their rows' offsets."""
    if not any(fixes):
        yield
        return

    def splice(module, args, embedded: torch.Tensor) -> torch.Tensor:
        embedded = embedded.clone()
        for row, row_fixes in enumerate(fixes):
            for offset, vectors in row_fixes:
                n = min(embedded.shape[1] - offset - 1, len(vectors))
                embedded[row, offset + 1:offset + 1 + n] = vectors[:n].to(embedded.device, embedded.dtype)
        return embedded

    handle = encoder.get_input_embeddings().register_forward_hook(splice)
    try:
        yield
    finally:
        handle.remove()
