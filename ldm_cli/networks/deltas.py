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
a model without computing anything; `problem` says first whether the factors make a delta at
all (ranks that agree, none of them 0), so a crafted file is one error, not a crash.
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
        return _hada_shape(s, 1)
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


def problem(kind: str, s: Shapes) -> tuple[str, str] | None:
    """(a factor, what is wrong with its shape) when the factors cannot make a delta, else None."""
    for factor, dims in s.items():
        if factor != "alpha" and (len(dims) not in (2, 4) or 0 in dims):
            return factor, f"is {list(dims)}: a factor is a matrix or a convolution kernel, none of its sides 0"
    if kind == "lora":
        return _lora_problem(s)
    if kind == "loha":
        return _pair_problem(s, "hada_w1_a", "hada_w1_b", "hada_t1") \
            or _pair_problem(s, "hada_w2_a", "hada_w2_b", "hada_t2") \
            or _same(s, "hada_w2_a", _hada_shape(s, 1), _hada_shape(s, 2))
    w1 = _lokr_shape(s, 1)
    w1_name = "lokr_w1" if "lokr_w1" in s else "lokr_w1_b"
    return _pair_problem(s, "lokr_w1_a", "lokr_w1_b") or _pair_problem(s, "lokr_w2_a", "lokr_w2_b", "lokr_t2") \
        or (None if len(w1) == 2 else (w1_name, f"makes {list(w1)}: w1 is a matrix"))


def _lora_problem(s: Shapes) -> tuple[str, str] | None:
    up, down, mid = s["lora_up.weight"], s["lora_down.weight"], s.get("lora_mid.weight")
    if up[2:] not in ((), (1, 1)):
        return "lora_up.weight", f"is {list(up)}: up is a matrix or a 1x1 kernel"
    if mid is None:
        return _agree("lora_up.weight", up[1], "lora_down.weight", down[0])
    if down[2:] not in ((), (1, 1)):
        return "lora_down.weight", f"is {list(down)}: beside lora_mid, down is a matrix or a 1x1 kernel"
    return _agree("lora_up.weight", up[1], "lora_mid.weight", mid[0]) or \
        _agree("lora_down.weight", down[0], "lora_mid.weight", mid[1])


def _pair_problem(s: Shapes, a: str, b: str, t: str | None = None) -> tuple[str, str] | None:
    """a @ b, or a Tucker core t contracted with both: their inner sides agree."""
    if a not in s:
        return None
    if t in s:
        if len(s[a]) != 2 or len(s[b]) != 2:
            return a, f"is {list(s[a])} and {b} {list(s[b])}: beside a Tucker core both are matrices"
        return _agree(a, s[a][0], t, s[t][0]) or _agree(b, s[b][0], t, s[t][1])
    if len(s[a]) != 2:
        return a, f"is {list(s[a])}: a matrix"
    return _agree(a, s[a][1], b, s[b][0])


def _agree(first: str, n: int, second: str, m: int) -> tuple[str, str] | None:
    return None if n == m else (first, f"has rank {n} where {second} has {m}")


def _same(s: Shapes, factor: str, one: tuple[int, ...], two: tuple[int, ...]) -> tuple[str, str] | None:
    return None if one == two else (factor, f"makes a {list(two)} product where the first pair makes {list(one)}")


def _hada_shape(s: Shapes, i: int) -> tuple[int, ...]:
    a, b = s[f"hada_w{i}_a"], s[f"hada_w{i}_b"]
    return (a[1], b[1], *s[f"hada_t{i}"][2:]) if f"hada_t{i}" in s else (a[0], *b[1:])


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
