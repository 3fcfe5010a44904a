"""The weight change (delta) one layer of a LoRA file makes, and its scale, as A1111 computes
them (its Lora extension's network_lora/network_hada/network_lokr, written from their formulas).

- LoRA / LoCon: delta = up @ down (a convolution's kernel lives in `down`); with a Tucker
  `lora_mid` (a 3x3 LoCon): delta[o, i, k, l] = sum up[o, a] mid[a, b, k, l] down[b, i].
- LoHa: delta = (w1_a @ w1_b) * (w2_a @ w2_b), elementwise; with Tucker `hada_t1/t2` each
  product is t contracted with both factors.
- LoKr: delta = kron(w1, w2), each factor whole or a product of two (w2 also Tucker).
Scale: alpha / rank when the file gives alpha (rank: the down factor's rows; a LoKr's rank is its
w2_b's, else w1_b's, none when both factors are whole), else 1.

`shape` gives the delta's shape from the factors' shapes alone, so a file can be checked against
a model without computing anything.
"""
from __future__ import annotations

import math

import torch

Shapes = dict[str, tuple[int, ...]]


def shape(kind: str, s: Shapes) -> tuple[int, ...]:
    """The delta's shape before it is fitted to the weight (a linear layer's may read as a 1x1
    convolution's, and the other way round)."""
    if kind == "lora":
        if "lora_mid.weight" in s:
            return (s["lora_up.weight"][0], s["lora_down.weight"][1], *s["lora_mid.weight"][2:])
        return (s["lora_up.weight"][0], *s["lora_down.weight"][1:])
    if kind == "loha":
        if "hada_t1" in s:
            return (s["hada_w1_a"][1], s["hada_w1_b"][1], *s["hada_t1"][2:])
        return (s["hada_w1_a"][0], *s["hada_w1_b"][1:])
    w1, w2 = _lokr_shape(s, 1), _lokr_shape(s, 2)
    return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])


def checked_shape(kind: str, s: Shapes) -> tuple[int, ...] | None:
    """The shape `compute` gives the delta, found by running it on meta tensors (no memory, no
    arithmetic); None when the factors' shapes do not fit together, as in a broken or forged file,
    which `compute` would fail on half-way through a merge."""
    try:
        return tuple(compute(kind, {k: torch.empty(v, device="meta") for k, v in s.items()}).shape)
    except (RuntimeError, IndexError, ValueError):
        return None


def _lokr_shape(s: Shapes, i: int) -> tuple[int, ...]:
    if f"lokr_w{i}" in s:
        return s[f"lokr_w{i}"]
    a, b = s[f"lokr_w{i}_a"], s[f"lokr_w{i}_b"]
    if i == 2 and "lokr_t2" in s:
        return (a[1], b[1], *s["lokr_t2"][2:])
    return (a[0], *b[1:])


def rank(kind: str, s: Shapes) -> int | None:
    if kind == "lora":
        return s["lora_down.weight"][0]
    if kind == "loha":
        return s["hada_w1_b"][0]
    for key in ("lokr_w2_b", "lokr_w1_b"):
        if key in s:
            return s[key][0]
    return None


def scale(kind: str, s: Shapes, alpha: float | None) -> float:
    r = rank(kind, s)
    return alpha / r if alpha is not None and r else 1.0


def compute(kind: str, f: dict[str, torch.Tensor]) -> torch.Tensor:
    """The unscaled delta, in the factors' dtype (give them in fp32)."""
    if kind == "lora":
        up, down = _matrix(f["lora_up.weight"]), _matrix(f["lora_down.weight"])
        if "lora_mid.weight" in f:
            return torch.einsum("abkl,oa,bi->oikl", f["lora_mid.weight"], up, down)
        return (up @ down).reshape(shape(kind, _shapes(f)))
    if kind == "loha":
        return _hada(f, 1) * _hada(f, 2)
    w1, w2 = _lokr(f, 1), _lokr(f, 2)
    if w2.ndim == 4:
        w1 = w1[:, :, None, None]
    return torch.kron(w1, w2.contiguous())


def _hada(f: dict[str, torch.Tensor], i: int) -> torch.Tensor:
    a, b = f[f"hada_w{i}_a"], f[f"hada_w{i}_b"]
    if f"hada_t{i}" in f:
        return _tucker(f[f"hada_t{i}"], a, b)
    return (_matrix(a) @ _matrix(b)).reshape(a.shape[0], *b.shape[1:])


def _lokr(f: dict[str, torch.Tensor], i: int) -> torch.Tensor:
    if f"lokr_w{i}" in f:
        return f[f"lokr_w{i}"]
    a, b = f[f"lokr_w{i}_a"], f[f"lokr_w{i}_b"]
    if i == 2 and "lokr_t2" in f:
        return _tucker(f["lokr_t2"], a, b)
    return (_matrix(a) @ _matrix(b)).reshape(a.shape[0], *b.shape[1:])


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LyCORIS's CP/Tucker form: out[o, i, k, l] = sum t[p, q, k, l] a[p, o] b[q, i]."""
    return torch.einsum("pqkl,po,qi->oikl", t, _matrix(a), _matrix(b))


def _matrix(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def _shapes(f: dict[str, torch.Tensor]) -> Shapes:
    return {k: tuple(v.shape) for k, v in f.items()}


def fits(delta: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    """Whether a delta of this shape can be added to the weight (see `fitted`)."""
    return math.prod(delta) == math.prod(weight) or _inpaint_pad(delta, weight)


def fitted(delta: torch.Tensor, weight: tuple[int, ...]) -> torch.Tensor:
    """`delta` in the weight's shape: reshaped (a linear layer stored as a 1x1 convolution), or,
    for an inpainting model's first convolution (9 input channels), the 4 image channels of a
    LoRA made for the ordinary model, the rest zero, as A1111 does."""
    if _inpaint_pad(tuple(delta.shape), weight):
        return torch.nn.functional.pad(delta, (0, 0, 0, 0, 0, weight[1] - delta.shape[1]))
    return delta.reshape(weight)


def _inpaint_pad(delta: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    return len(delta) == len(weight) == 4 and delta[1] == 4 and weight[1] == 9 and delta[0] == weight[0] \
        and delta[2:] == weight[2:]
