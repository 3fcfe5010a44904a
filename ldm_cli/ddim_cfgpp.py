"""A1111's "DDIM CFG++" (Chung et al., 2024, "CFG++: Manifold-Constrained Classifier Free Guidance
for Diffusion Models"), learned from A1111 1.10's timesteps sampler, as a k-path sampler.

A1111 runs it on whole training timesteps: every 1000 // steps from timestep 1 (the last clipped
to 999), from the highest down, the model called at each but the lowest, where the last step
lands (so it stops at timestep 1's noise, not at none). Each step's image estimate is guided at
cfg / 12.5 (CFG++'s scale: 12.5 is its 1), and the step goes on along the unguided (negative)
noise prediction where DDIM takes the guided one. eta is 0 (deterministic), as by default.

Here that is the same walk over those timesteps' sigmas, in k-diffusion's scaled latents (x / sqrt
alpha): x_next = guided + sigma_next * (x - unguided) / sigma, which is DDIM's arithmetic.
"""
from __future__ import annotations

from typing import Callable

import torch

from ldm_cli.ksamplers import Done, Noise
from ldm_cli.sigma_schedules import Table

CFG_DIVISOR = 12.5
# (x, sigma) -> (the guided denoised image, the unguided one)
Denoisers = Callable[[torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


def timesteps(steps: int, train_steps: int) -> list[int]:
    """A1111's DDIM timesteps, lowest first: every train_steps // steps from 1, clipped to the last."""
    return [min(t + 1, train_steps - 1) for t in range(0, train_steps, train_steps // steps)]


def sigmas(table: Table, steps: int) -> list[float]:
    """The sigmas of those timesteps, highest first; the last is timestep 1's (no 0 after it)."""
    return [table.sigmas[t] for t in reversed(timesteps(steps, len(table.sigmas)))]


def ddim_cfgpp(model: Denoisers, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done) -> torch.Tensor:
    """`model(x, sigma)` answers (the guided denoised image at cfg / 12.5, the unguided one). The
    result is unscaled from the last sigma's level, as A1111 hands its latents to the VAE there."""
    for i in range(len(sigmas) - 1):
        guided, unguided = model(x, sigmas[i])
        x = guided + (x - unguided) * (sigmas[i + 1] / sigmas[i])
        x = done(i, x)
    return x / (1 + sigmas[-1] ** 2) ** 0.5
