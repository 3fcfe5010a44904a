"""What the denoiser is asked at each step, and how its answers combine, as A1111 does it:
classifier-free guidance, prompt editing (the conditioning changes at given steps) and composable
diffusion (AND: several positive parts, each pulling by its weight).

Each image has a negative `Schedule` (when guided) and one or more weighted positive parts, each
a `Schedule`. At step i (counted from 0, one per denoiser call) every schedule gives its
conditioning; those are the denoiser's rows: the negatives of all images first, then the
images' first parts, then their second parts, ... Rows whose tensors have the same shapes run in
one denoiser call; rows of another length (a 154-token prompt beside a 77-token negative) run in
their own, as A1111 does unless told to pad. The output is
    negative + sum over parts of (part - negative) * weight * cfg
which for one part of weight 1 is ordinary classifier-free guidance.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ldm_cli.families.family import Cond

FOREVER = 2**62  # the end step of a conditioning that never changes


@dataclass
class Schedule:
    """One prompt's conditioning over the steps: conds[k] (a batch of one) serves up to step
    ends[k] (A1111's end_at_step)."""
    ends: list[int]
    conds: list[Cond]

    def at(self, step: int) -> Cond:
        """A1111's choice: the first cond whose end is at or after `step`, else the first (a
        sampler that calls the denoiser more often than it has steps starts over)."""
        for end, cond in zip(self.ends, self.conds):
            if step <= end:
                return cond
        return self.conds[0]

    @classmethod
    def fixed(cls, cond: Cond) -> Schedule:
        return cls([FOREVER], [cond])


Parts = list[tuple[float, Schedule]]  # an image's AND parts: (weight, schedule)


def rows_of(cond: Cond) -> list[Cond]:
    """A batched conditioning split into its images' (batches of one)."""
    count = next(iter(cond.values())).shape[0]
    return [{k: v[i:i + 1] for k, v in cond.items()} for i in range(count)]


def plain(cond: Cond) -> list[Parts]:
    """A batched conditioning as one part of weight 1 per image, the same at every step."""
    return [[(1.0, Schedule.fixed(row))] for row in rows_of(cond)]


def needs_negative(cfg: float, positive: list[Parts]) -> bool:
    """At cfg 1 a single part of weight 1 is the whole answer; anything else needs the negative."""
    return cfg != 1 or any(len(parts) != 1 or parts[0][0] != 1 for parts in positive)


def padded_parts(parts: Parts) -> Parts:
    """An image's parts with their token sequences at one length, the shorter ones repeating
    their last vector (A1111 stacks an image's AND parts so)."""
    longest = max(c["encoder_hidden_states"].shape[1] for _, s in parts for c in s.conds)
    return [(w, Schedule(s.ends, [_pad(c, longest) for c in s.conds])) for w, s in parts]


def _pad(cond: Cond, length: int) -> Cond:
    context = cond["encoder_hidden_states"]
    if context.shape[1] == length:
        return cond
    tail = context[:, -1:].expand(-1, length - context.shape[1], -1)
    return {**cond, "encoder_hidden_states": torch.cat([context, tail], dim=1)}


@dataclass
class Call:
    """One denoiser call: which rows, and their conditioning stacked."""
    rows: torch.Tensor | slice
    cond: Cond


class Guidance:
    """The rows of each step and the combination of their outputs, for one batch of images."""

    def __init__(self, positive: Cond | list[Parts], negative: Cond | list[Schedule] | None, cfg: float,
                 adjust: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                 keep_negative: bool = False):
        self.positive = plain(positive) if isinstance(positive, dict) else positive
        if isinstance(negative, dict):
            negative = [p[0][1] for p in plain(negative)]
        self.cfg = cfg
        self.adjust = adjust  # the family's own step after CFG (Family.guided)
        # keep_negative: the sampler reads the negative's own answer (CFG++), at any cfg
        self.negative = negative if negative is not None and (keep_negative or needs_negative(cfg, self.positive)) else None
        self.images = len(self.positive)
        self._cached: tuple[tuple, list[Call]] | None = None
        self._combine = self._combination()

    @property
    def guided(self) -> bool:
        return self.negative is not None

    def row_images(self) -> list[int]:
        """The image each row belongs to, in row order."""
        most = max(len(parts) for parts in self.positive)
        rows = list(range(self.images)) if self.guided else []
        return rows + [i for j in range(most) for i, parts in enumerate(self.positive) if len(parts) > j]

    def calls(self, step: int) -> list[Call]:
        """The denoiser calls of this step (the same objects while no schedule switches)."""
        chosen = [s.at(step) for s in self.negative or []]
        most = max(len(parts) for parts in self.positive)
        chosen += [parts[j][1].at(step) for j in range(most) for parts in self.positive if len(parts) > j]
        key = tuple(id(c) for c in chosen)
        if self._cached is None or self._cached[0] != key:
            self._cached = (key, _calls(chosen))
        return self._cached[1]

    def _combination(self) -> list[tuple[slice, torch.Tensor | slice, float | torch.Tensor]]:
        """Per part index: (its rows, their images, weight * cfg)."""
        out, start = [], self.images if self.guided else 0
        for j in range(max(len(parts) for parts in self.positive)):
            members = [(i, parts[j][0]) for i, parts in enumerate(self.positive) if len(parts) > j]
            images = [i for i, _ in members]
            scales = [w * self.cfg for _, w in members]
            scale = scales[0] if len(set(scales)) == 1 else torch.tensor(scales).view(-1, 1, 1, 1)
            index = slice(None) if images == list(range(self.images)) else torch.tensor(images)
            out.append((slice(start, start + len(members)), index, scale))
            start += len(members)
        return out

    def combine(self, out: torch.Tensor) -> torch.Tensor:
        """The denoiser's rows -> one output per image."""
        if not self.guided:
            return out  # one row of weight 1 per image
        uncond = out[:self.images]
        result = uncond.clone()
        for rows, images, scale in self._combine:
            if isinstance(scale, torch.Tensor):
                scale = scale.to(out.device, out.dtype)
            result[images] += (out[rows] - uncond[images]) * scale
        if self.adjust is not None:  # against each image's first part, its conditional output
            result = self.adjust(out[self._combine[0][0]], result)
        return result

    def unguided(self, out: torch.Tensor) -> torch.Tensor:
        """The negative's rows: each image's unguided output."""
        return out[:self.images]


def _calls(chosen: list[Cond]) -> list[Call]:
    """Rows grouped by the shapes of their tensors, each group stacked for one call."""
    groups: dict[tuple, list[int]] = {}
    for r, cond in enumerate(chosen):
        groups.setdefault(tuple((k, v.shape[1:]) for k, v in cond.items()), []).append(r)
    if len(groups) == 1:
        return [Call(slice(None), _stacked(chosen))]
    return [Call(torch.tensor(rows), _stacked([chosen[r] for r in rows])) for rows in groups.values()]


def _stacked(conds: list[Cond]) -> Cond:
    return {k: torch.cat([c[k] for c in conds]) for k in conds[0]}
