"""How many of a schedule's steps denoising strength keeps, by the rule of the implementation a
path matches; no torch (hires_plan, which Settings reads, counts with it).

A1111 (sd_samplers_common.setup_img2img_steps, its `img2img_fix_steps` option off as by
default) runs int(min(strength, 0.999) x steps) + 1 steps from the tail of the `steps`-step
schedule; given the steps to run (hires fix's second pass: N), N from the tail of an
int(N / min(strength, 0.999))-step schedule. diffusers' pipelines keep int(steps x strength),
their flow-matching ones round the other way: they skip int(steps - steps x strength).
"""
from __future__ import annotations

MOST_STRENGTH = 0.999  # A1111 caps strength here: even strength 1 starts below the schedule's first sigma


def a1111(steps: int, strength: float, run: int | None = None) -> tuple[int, int]:
    """(the schedule's steps, the steps run from its tail); `run`: the steps asked for (hires fix)."""
    capped = min(strength, MOST_STRENGTH)
    if run is not None:
        return int(run / capped), run
    return steps, int(capped * steps) + 1


def diffusers(steps: int, strength: float, flow: bool = False) -> int:
    """The steps run from the tail of the `steps`-step schedule."""
    if flow:
        return steps - int(max(steps - steps * strength, 0))
    return min(int(steps * strength), steps)
