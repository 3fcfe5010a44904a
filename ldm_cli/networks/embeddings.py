"""Textual inversion, as A1111 does it: an embedding's file stem, written in a prompt, stands for
the vectors the file holds, spliced into CLIP's token embeddings where the name's tokens are.
Nothing is added to the tokenizer's vocabulary.

Files: A1111's `.pt` (`string_to_param`, read only with --allow-pickle, by the weights-only
unpickler) or `.safetensors`, kohya's `emb_params`, diffusers' one-token files, and SDXL's pairs
(`clip_l` for the first text encoder, `clip_g` for the second).

A `Library` is the model's `embeddings` (families/clip_text.py's EmbeddingLookup): the prompt's
chunking asks `find` at each token position of each weighted fragment, and a hit gives the
vectors for that text encoder and how many of the fragment's tokens the name took; clip_text
puts placeholder tokens in the chunk and splices the vectors in while encoding.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ldm_cli.errors import LdmError
from ldm_cli.families.clip_text import CHUNK

SDXL_KEYS = ("clip_l", "clip_g")  # the vectors of text encoder 0 and 1


@dataclass(frozen=True)
class Embedding:
    name: str
    path: Path
    vectors: dict[str, torch.Tensor]  # "" (one text encoder), or clip_l and clip_g

    @property
    def count(self) -> int:
        """How many token positions it fills."""
        return next(iter(self.vectors.values())).shape[0]

    def describe(self) -> str:
        return " + ".join(f"{key or 'vectors'} {v.shape[-1]} wide" for key, v in self.vectors.items())


def read(path: Path, allow_pickle: bool) -> Embedding:
    """The embedding in `path`; LdmError for a file that holds no embedding."""
    data = _load(path, allow_pickle)
    params = data.get("string_to_param")
    if isinstance(params, dict):  # A1111's own .pt
        data = params
    elif all(isinstance(data.get(k), torch.Tensor) for k in SDXL_KEYS):
        return Embedding(path.stem, path, {k: _rows(data[k], path) for k in SDXL_KEYS})
    found = [v for v in data.values() if isinstance(v, torch.Tensor)]
    if len(found) != 1:
        raise LdmError(f"{path.name} is not a textual-inversion embedding (it should hold one tensor, "
                       f"or clip_l and clip_g; it holds {len(found)})")
    return Embedding(path.stem, path, {"": _rows(found[0], path)})


def _rows(t: torch.Tensor, path: Path) -> torch.Tensor:
    """The tensor as vectors x width: one vector when 1-D (diffusers' files)."""
    if t.ndim == 0 or t.shape[-1] == 0 or not t.is_floating_point():
        what = "a single number" if t.ndim == 0 else "vectors 0 wide" if t.shape[-1] == 0 else \
            f"{str(t.dtype).removeprefix('torch.')} values"
        raise LdmError(f"{path.name} is not a textual-inversion embedding: it holds {what}, not vectors")
    return t.detach().to(torch.float32).reshape(-1, t.shape[-1]).clone()


def _load(path: Path, allow_pickle: bool) -> dict:
    from ldm_cli import files
    from ldm_cli.loading import safety

    files.check_openable(path)
    kind = safety.sniff(path)
    if kind == "pickle":
        if not allow_pickle:
            raise safety.refusal(path)
        return safety.load_pickle(path, tensors_only=False)
    if kind != "safetensors":
        raise LdmError(f"{path.name} is neither a safetensors file nor a PyTorch file; it is not an embedding")
    from safetensors.torch import load_file

    return load_file(str(path))


class Library:
    """The embeddings of a model's folders (name -> file), each read when a prompt first names
    it. `widths`: the widths of the model's text encoders (two: SDXL's clip_l/clip_g pair)."""

    def __init__(self, files: dict[str, Path], tokenizer, widths: list[int], allow_pickle: bool = False):
        self.files, self.widths, self.allow_pickle = files, widths, allow_pickle
        self.tokenizer = tokenizer
        self._read: dict[str, Embedding] = {}
        self._by_first: dict[int, list[tuple[list[int], str]]] | None = None

    def find(self, tokens: list[int], position: int, encoder: int) -> tuple[torch.Tensor, int] | None:
        """The vectors text encoder number `encoder` gets for the embedding named at
        tokens[position], and how many tokens its name takes; None when none is named there."""
        hit = self.match(tokens, position)
        return (self.vectors(hit[0], encoder), hit[1]) if hit else None

    def match(self, tokens: list[int], position: int) -> tuple[Embedding, int] | None:
        """The embedding whose name's tokens start at `position` (the longest such name), and how
        many tokens the name takes; None when no name starts there."""
        for ids, name in self._names().get(tokens[position], []):
            if tokens[position:position + len(ids)] == ids:
                return self.get(name), len(ids)
        return None

    def used(self, texts: list[str]) -> list[Embedding]:
        """The embeddings named in `texts` (each tokenized alone), in order of first use."""
        found: dict[str, Embedding] = {}
        if not self._names():  # no embeddings: nothing to tokenize for (every line of a long file asks)
            return []
        for text in texts:
            tokens = self.tokenizer(text, add_special_tokens=False).input_ids
            position = 0
            while position < len(tokens):
                hit = self.match(tokens, position)
                if hit:
                    found.setdefault(hit[0].name, hit[0])
                position += hit[1] if hit else 1
        return list(found.values())

    def get(self, name: str) -> Embedding:
        if name not in self._read:
            embedding = read(self.files[name], self.allow_pickle)
            self._check(embedding)
            self._read[name] = embedding
        return self._read[name]

    def vectors(self, embedding: Embedding, encoder: int) -> torch.Tensor:
        """The vectors text encoder number `encoder` gets (count x its width)."""
        return embedding.vectors[SDXL_KEYS[encoder] if len(self.widths) > 1 else ""]

    def _check(self, embedding: Embedding) -> None:
        keys = list(SDXL_KEYS) if len(self.widths) > 1 else [""]
        fits = set(embedding.vectors) == set(keys) and \
            [embedding.vectors[k].shape[-1] for k in keys] == self.widths
        named = f"the embedding {embedding.name!r} ({embedding.path})"
        if not fits:
            need = " + ".join(f"{k or 'vectors'} {w} wide" for k, w in zip(keys, self.widths))
            raise LdmError(f"{named} holds {embedding.describe()}; this model takes {need}: it was made for another "
                           "model family")
        if len({v.shape[0] for v in embedding.vectors.values()}) > 1 or not 1 <= embedding.count <= CHUNK:
            counts = " and ".join(str(v.shape[0]) for v in embedding.vectors.values())
            raise LdmError(f"{named} holds {counts} vectors; an embedding fills 1 to {CHUNK} token positions "
                           f"(a prompt chunk), the same number for each text encoder")
        if not all(bool(torch.isfinite(v).all()) for v in embedding.vectors.values()):
            raise LdmError(f"{named} holds NaN or inf values; it would make every image black")

    def _names(self) -> dict[int, list[tuple[list[int], str]]]:
        """First token -> (the name's tokens, name), longest first, as A1111 matches them."""
        if self._by_first is None:
            self._by_first = {}
            for name in self.files:
                ids = self.tokenizer(name, add_special_tokens=False).input_ids
                if ids:
                    self._by_first.setdefault(ids[0], []).append((ids, name))
            for entries in self._by_first.values():
                entries.sort(key=lambda e: -len(e[0]))
        return self._by_first
