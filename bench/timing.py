"""Timing on a device whose work runs asynchronously (CUDA): synchronised clocks, step rates, and
how a figure prints. Shared by the GPU benchmarks (gpu_speed.py, flux_memory.py)."""
from __future__ import annotations

import sys
import time

import torch


def bench_device(name: str) -> torch.device:
    """The device a benchmark measures on; asked for CUDA where there is none, it stops and says
    how to dry-run instead."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("no CUDA device: run with --tiny --device cpu")
    return device


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


class StepClock:
    """Denoiser it/s from the step callbacks; the device is synchronised at the first and last only."""

    def __init__(self, device: torch.device, steps: int):
        self.device, self.steps, self.count, self.stamps = device, steps, 0, []

    def tick(self) -> None:
        self.count += 1
        if self.count in (1, self.steps):
            synchronize(self.device)
            self.stamps.append(time.perf_counter())

    def rate(self) -> float:
        return (self.steps - 1) / (self.stamps[-1] - self.stamps[0]) if len(self.stamps) == 2 else float("nan")


def timed(render, device: torch.device, steps: int):
    """(seconds, image, it/s) of one `render(on_step)` call."""
    clock = StepClock(device, steps)
    synchronize(device)
    start = time.perf_counter()
    image = render(clock.tick)
    synchronize(device)
    return time.perf_counter() - start, image, clock.rate()


def show(value, fmt: str, suffix: str = "") -> str:
    """A figure, or nothing for one not measured (None, NaN)."""
    return "" if value is None or value != value else format(value, fmt) + suffix
