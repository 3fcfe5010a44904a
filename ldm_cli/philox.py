"""torch.randn as CUDA draws it, reproduced on the CPU: A1111's "NV" random number source, and
how A1111 (whose default draws on the GPU) gets its images' starting noise.

Element i of a draw is one Philox4x32-10 block (Salmon et al., "Parallel random numbers: as easy
as 1, 2, 3", 2011) keyed by the seed, with counter (offset, 0, i, 0); its first two words make
one normal number by the Box-Muller transform (the sine half), with curand's constants for
2^-32 and 2 pi. The arithmetic after the integers is done in float64 and rounded to float32,
as A1111's generator does it; CUDA's own float32 arithmetic differs from it by a few units in
the last place (A1111 documents seed 0's first values within 3e-7 of these).
"""
from __future__ import annotations

import math

import numpy as np
import torch

MULTIPLIERS = (0xD2511F53, 0xCD9E8D57)
KEY_STEPS = (0x9E3779B9, 0xBB67AE85)  # the golden ratio and sqrt(3) - 1, as 32-bit fractions
ROUNDS = 10
TWO_POW32_INV = float(np.float32(2.3283064e-10))  # curand's 2^-32
TWO_POW32_INV_2PI = float(np.float32(2.3283064e-10 * 6.2831855))  # and times 2 pi
_LOW = np.uint64(0xFFFFFFFF)


def _mulhilo(a: int, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    product = b.astype(np.uint64) * np.uint64(a)
    return (product >> np.uint64(32)).astype(np.uint32), (product & _LOW).astype(np.uint32)


def philox4x32(counter: list[np.ndarray], key: tuple[int, int]) -> list[np.ndarray]:
    """Ten Philox rounds over counters (four uint32 arrays), the key bumped between rounds."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for r in range(ROUNDS):
        if r:
            k0, k1 = (k0 + KEY_STEPS[0]) & 0xFFFFFFFF, (k1 + KEY_STEPS[1]) & 0xFFFFFFFF
        hi0, lo0 = _mulhilo(MULTIPLIERS[0], c0)
        hi1, lo1 = _mulhilo(MULTIPLIERS[1], c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint32(k0), lo1, hi0 ^ c3 ^ np.uint32(k1), lo0
    return [c0, c1, c2, c3]


def randn(seed: int, shape: tuple[int, ...], offset: int = 0) -> torch.Tensor:
    """Normal float32 numbers of `shape`, as torch.randn(shape, device="cuda") after
    torch.manual_seed(seed) (the `offset`-th draw of A1111's generator for that seed)."""
    n = math.prod(shape)
    zeros = np.zeros(n, dtype=np.uint32)
    counter = [zeros + np.uint32(offset), zeros, np.arange(n, dtype=np.uint32), zeros]
    words = philox4x32(counter, (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF))
    u = words[0] * TWO_POW32_INV + TWO_POW32_INV / 2
    v = words[1] * TWO_POW32_INV_2PI + TWO_POW32_INV_2PI / 2
    normal = np.sqrt(-2.0 * np.log(u)) * np.sin(v)
    return torch.from_numpy(normal.astype(np.float32)).reshape(shape)
