"""A1111's "DPM fast" and "DPM adaptive": DPM-Solver (Lu et al., 2022) in k-diffusion's form
(sampling.py's DPMSolver, Katherine Crowson, MIT), as ldm's own functions over the noise
prediction eps = (x - denoised) / sigma, in t = -log sigma. Times and step sizes are host floats (a GPU
never waits on them); DPM adaptive reads its error estimate back to size its next step, which
no arrangement avoids.

A1111 gives them only the ends of the schedule (its highest and lowest nonzero sigma) and, for
DPM fast, the steps as its number of denoiser calls; DPM adaptive picks its own steps. Their eta
is 1 unless given, as A1111 passes its ancestral eta (k-diffusion's own default is 0). `done`
follows each of their steps, with i counting them.
"""
from __future__ import annotations

import math

import torch

from ldm_cli.ksamplers import Denoiser, Done, Noise, ancestral_step, rf_ancestral_step
from ldm_cli.sigma_schedules import float32


def _sigma(t: float) -> float:
    return math.exp(-t)


def _t(sigma: float) -> float:
    return -math.log(sigma)


class _Solver:
    """The solver's steps of orders 1 to 3 from x at t to t_next, sharing the model calls made at
    t (a step's cache)."""

    def __init__(self, model: Denoiser):
        self.model = model

    def eps(self, cache: dict, key: str, x: torch.Tensor, t: float) -> torch.Tensor:
        if key not in cache:
            cache[key] = (x - self.model(x, _sigma(t))) / _sigma(t)
        return cache[key]

    def step_1(self, x, t, t_next, cache):
        h = t_next - t
        return x - _sigma(t_next) * math.expm1(h) * self.eps(cache, "eps", x, t)

    def step_2(self, x, t, t_next, cache, r1=1 / 2):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1 = t + r1 * h
        u1 = x - _sigma(s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        return x - _sigma(t_next) * math.expm1(h) * eps - _sigma(t_next) / (2 * r1) * math.expm1(h) * (eps_r1 - eps)

    def step_3(self, x, t, t_next, cache, r1=1 / 3, r2=2 / 3):
        h = t_next - t
        eps = self.eps(cache, "eps", x, t)
        s1, s2 = t + r1 * h, t + r2 * h
        u1 = x - _sigma(s1) * math.expm1(r1 * h) * eps
        eps_r1 = self.eps(cache, "eps_r1", u1, s1)
        u2 = (x - _sigma(s2) * math.expm1(r2 * h) * eps
              - _sigma(s2) * (r2 / r1) * (math.expm1(r2 * h) / (r2 * h) - 1) * (eps_r1 - eps))
        eps_r2 = self.eps(cache, "eps_r2", u2, s2)
        return x - _sigma(t_next) * math.expm1(h) * eps - _sigma(t_next) / r2 * (math.expm1(h) / h - 1) * (eps_r2 - eps)

    def ancestral(self, s, t, t_end, eta):
        """(where the deterministic step lands, the scale and the noise's size after it)."""
        if not eta:
            return t, 1.0, 0.0
        down, _ = ancestral_step(_sigma(s), _sigma(t), eta)
        t_ = min(t_end, _t(down))
        return t_, 1.0, (_sigma(t) ** 2 - _sigma(t_) ** 2) ** 0.5


class _FlowSolver(_Solver):
    """The same solver on a flow-matching model: its fresh noise in ksamplers.rf_ancestral_step's
    form, x = (1 - sigma) x0 + sigma noise kept, from t's sigma_down (clamped at t_end)."""

    def ancestral(self, s, t, t_end, eta):
        if not eta:
            return t, 1.0, 0.0
        down, _, _ = rf_ancestral_step(_sigma(s), _sigma(t), eta)
        t_ = min(t_end, _t(down))
        scale = (1 - _sigma(t)) / (1 - _sigma(t_))
        return t_, scale, max(_sigma(t) ** 2 - (_sigma(t_) * scale) ** 2, 0.0) ** 0.5


def _ends(sigmas: list[float]) -> tuple[float, float]:
    """(t of the highest sigma, t of the lowest nonzero one), in float32 as k-diffusion has them."""
    return tuple(float32([_t(max(sigmas)), _t(min(s for s in sigmas if s > 0))]))


def dpm_fast(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
             eta: float = 1.0, s_noise: float = 1.0, solver: type[_Solver] = _Solver) -> torch.Tensor:
    """Fixed steps of orders 3, 3, ..., spending len(sigmas) - 1 denoiser calls."""
    solver, calls = solver(model), len(sigmas) - 1
    t_start, t_end = _ends(sigmas)
    m = math.floor(calls / 3) + 1
    ts = float32([t_start + (t_end - t_start) * i / m for i in range(m)]) + [t_end]  # k-diffusion's linspace
    orders = [3] * (m - 2) + [2, 1] if calls % 3 == 0 else [3] * (m - 1) + [calls % 3]
    for i, order in enumerate(orders):
        t, t_next = ts[i], ts[i + 1]
        t_next_, scale, up = solver.ancestral(t, t_next, t_end, eta)
        step = {1: solver.step_1, 2: solver.step_2, 3: solver.step_3}[order]
        x = step(x, t, t_next_, {})
        x = (x if scale == 1 else scale * x) + up * s_noise * noise(_sigma(t), _sigma(t_next))
        x = done(i, x)
    return x


def dpm_adaptive(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
                 eta: float = 1.0, s_noise: float = 1.0, order: int = 3, rtol: float = 0.05, atol: float = 0.0078,
                 h_init: float = 0.05, accept_safety: float = 0.81, solver: type[_Solver] = _Solver) -> torch.Tensor:
    """Steps of orders 2 and 3 together, the difference between them sizing the next step (an
    integral controller, k-diffusion's defaults); a rejected step is tried again smaller."""
    solver = solver(model)
    s, t_end = _ends(sigmas)
    x_prev, steps = x, 0
    control = _StepSize(h_init, 1.5 if eta else order, accept_safety)
    while s < t_end - 1e-5:
        t = min(t_end, s + control.h)
        t_, scale, up = solver.ancestral(s, t, t_end, eta)
        cache: dict = {}
        if order == 2:
            x_low, x_high = solver.step_1(x, s, t_, cache), solver.step_2(x, s, t_, cache)
        else:
            x_low, x_high = solver.step_2(x, s, t_, cache, r1=1 / 3), solver.step_3(x, s, t_, cache)
        delta = (rtol * torch.maximum(x_low.abs(), x_prev.abs())).clamp(min=atol)
        error = torch.linalg.norm((x_low - x_high) / delta) / x.numel() ** 0.5
        if control.accepts(error):
            x_prev = x_low
            x = (x_high if scale == 1 else scale * x_high) + up * s_noise * noise(_sigma(s), _sigma(t))
            s = t
            x = done(steps, x)
            steps += 1
    return x


class _StepSize:
    """k-diffusion's PID step size controller with its defaults (integral only)."""

    def __init__(self, h: float, order: float, accept_safety: float, eps: float = 1e-8):
        self.h, self.b1, self.accept_safety, self.eps = h, 1 / order, accept_safety, eps
        self.errs: list[float] = []

    def accepts(self, error: torch.Tensor) -> bool:
        inv_error = 1 / (float(error) + self.eps)
        if not self.errs:
            self.errs = [inv_error] * 3
        self.errs[0] = inv_error
        factor = 1 + math.atan(self.errs[0] ** self.b1 - 1)  # b2 and b3 are 0 without p and d terms
        accept = factor >= self.accept_safety
        if accept:
            self.errs[1:] = self.errs[:2]
        self.h *= factor
        return accept


def dpm_fast_flow(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
                  eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """dpm_fast on a flow-matching model."""
    return dpm_fast(model, x, sigmas, noise, done, eta, s_noise, solver=_FlowSolver)


def dpm_adaptive_flow(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
                      eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """dpm_adaptive on a flow-matching model."""
    return dpm_adaptive(model, x, sigmas, noise, done, eta, s_noise, solver=_FlowSolver)
