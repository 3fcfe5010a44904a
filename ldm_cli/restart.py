"""A1111's "Restart" sampler: Restart sampling (Xu et al., 2023, "Restart Sampling for Improving
Generative Processes"), with the plan A1111 picks from the step count.

Below 20 steps it is Heun's method over the schedule. From 20 on, the schedule becomes a Karras
one over the same range with fewer steps, and the steps saved are spent going back: on reaching
the sigma nearest 0.1, noise lifts the image to the sigma nearest 2 and it is denoised down again
along a short Karras schedule (9 steps, once; from 36 steps, a quarter of the steps, twice).
"""
from __future__ import annotations

import torch

from ldm_cli import sigma_schedules
from ldm_cli.ksamplers import Denoiser, Done, Noise, to_d

FROM_STEPS = 20  # fewer: no restarts
TWICE_FROM = 36
RESTART_AT, RESTART_TO = 0.1, 2.0


def restart(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
            s_noise: float = 1.0) -> torch.Tensor:
    last = None
    for i, (sigma, sigma_next) in enumerate(walk(sigmas)):
        if last is not None and last < sigma:  # going back up: fresh noise to the higher level
            x = x + noise(last, sigma) * s_noise * (sigma ** 2 - last ** 2) ** 0.5
        x = _heun(model, x, sigma, sigma_next)
        last = sigma_next
        x = done(i, x)
    return x


def _heun(model: Denoiser, x: torch.Tensor, sigma: float, sigma_next: float) -> torch.Tensor:
    d = to_d(x, sigma, model(x, sigma))
    dt = sigma_next - sigma
    if sigma_next == 0:
        return x + d * dt
    x_2 = x + d * dt
    return x + (d + to_d(x_2, sigma_next, model(x_2, sigma_next))) / 2 * dt


def walk(sigmas: list[float], at: float = RESTART_AT, to: float = RESTART_TO) -> list[tuple[float, float]]:
    """The (sigma, next sigma) pairs the sampler steps through, restarts included (from the
    sigma nearest `at` back up to the one nearest `to`)."""
    steps = len(sigmas) - 1
    if steps < FROM_STEPS:
        return list(zip(sigmas[:-1], sigmas[1:]))
    times, length = (2, steps // 4) if steps >= TWICE_FROM else (1, 9)
    sigmas = _karras(sigmas[-2], sigmas[0], steps - length * times)
    low, high = _nearest(sigmas, at), _nearest(sigmas, to)
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 == low and high < low:
            back = _karras(sigmas[low], sigmas[high], length + 1)[:-1]
            pairs += list(zip(back[:-1], back[1:])) * times
    return pairs


def _karras(sigma_min: float, sigma_max: float, n: int) -> list[float]:
    """A Karras schedule rounded to float32, as A1111's tensors hold it."""
    return sigma_schedules.float32(sigma_schedules.karras_between(sigma_min, sigma_max, n))


def _nearest(sigmas: list[float], value: float) -> int:
    return min(range(len(sigmas)), key=lambda i: abs(sigmas[i] - value))


# A flow model's x = (1 - sigma) x0 + sigma noise is x / (1 - sigma) = x0 + sigma / (1 - sigma) noise:
# A1111's restart levels as a flow model's sigmas of the same signal-to-noise ratio
FLOW_RESTART_AT, FLOW_RESTART_TO = RESTART_AT / (1 + RESTART_AT), RESTART_TO / (1 + RESTART_TO)


def restart_flow(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
                 s_noise: float = 1.0) -> torch.Tensor:
    """Restart on a flow-matching model: its restart levels at A1111's signal-to-noise ratios, and
    going back up rescales x by alpha_high / alpha_low before the noise that tops it up to sigma_high."""
    last = None
    for i, (sigma, sigma_next) in enumerate(walk(sigmas, FLOW_RESTART_AT, FLOW_RESTART_TO)):
        if last is not None and last < sigma:
            scale = (1 - sigma) / (1 - last)
            x = scale * x + noise(last, sigma) * s_noise * (sigma ** 2 - (scale * last) ** 2) ** 0.5
        x = _heun(model, x, sigma, sigma_next)
        last = sigma_next
        x = done(i, x)
    return x
