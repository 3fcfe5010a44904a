"""A1111's k-diffusion samplers, as ldm's own functions: a sampler is a function of the denoiser
(x, sigma) -> denoised x, the sigmas a schedule type made (sigma_schedules.py), and a noise
source (sigma, sigma_next) -> a draw from the images' seeds. Each follows the arithmetic of
k-diffusion's sampling.py (Katherine Crowson, MIT) step for step, so that an A1111 image replays;
tests/test_ksamplers.py holds each to k-diffusion's own function.

The sigmas are host floats, and so is every branch and coefficient computed from them: k-diffusion
keeps them as tensors, where each comparison or min() would wait for a GPU to finish its queued
work. Only the images (x, denoised, noise) are tensors.

`done(i, x)` follows each step i and returns x (inpainting blends the known region back in).
"""
from __future__ import annotations

from typing import Callable

import math

import torch

Denoiser = Callable[[torch.Tensor, float], torch.Tensor]
Noise = Callable[[float, float], torch.Tensor]
Done = Callable[[int, torch.Tensor], torch.Tensor]


def to_d(x: torch.Tensor, sigma: float, denoised: torch.Tensor) -> torch.Tensor:
    """The probability-flow ODE's derivative dx/dsigma."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float]:
    """(sigma_down, sigma_up): where a deterministic step lands and how much fresh noise follows."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2) ** 0.5)
    return (sigma_to ** 2 - sigma_up ** 2) ** 0.5, sigma_up


def _churned(model: Denoiser, x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise):
    """Karras et al.'s churn: x raised to sigma_hat by fresh noise; (x, sigma_hat, denoised, d)."""
    gamma = min(s_churn / (len(sigmas) - 1), 2 ** 0.5 - 1) if s_tmin <= sigmas[i] <= s_tmax else 0.0
    # k-diffusion draws at every step once churn is asked for, used or not: the same draws follow
    eps = noise(sigmas[i], sigmas[i + 1]) * s_noise if s_churn > 0 else None
    sigma_hat = sigmas[i] * (gamma + 1)
    if gamma > 0:
        x = x + eps * (sigma_hat ** 2 - sigmas[i] ** 2) ** 0.5
    denoised = model(x, sigma_hat)
    return x, sigma_hat, denoised, to_d(x, sigma_hat, denoised)


def euler(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
          s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        x, sigma_hat, _, d = _churned(model, x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        x = x + d * (sigmas[i + 1] - sigma_hat)
        x = done(i, x)
    return x


def euler_a(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
            eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
        x = done(i, x)
    return x


def heun(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
         s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        x, sigma_hat, _, d = _churned(model, x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1]))
            x = x + (d + d_2) / 2 * dt
        x = done(i, x)
    return x


def dpm2(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
         s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        x, sigma_hat, _, d = _churned(model, x, sigmas, i, noise, s_churn, s_tmin, s_tmax, s_noise)
        x = _dpm2_step(model, x, d, sigma_hat, sigmas[i + 1])
        x = done(i, x)
    return x


def _dpm2_step(model: Denoiser, x, d, sigma, sigma_to):
    """DPM-Solver-2: the derivative taken again at the log-midpoint; Euler into sigma 0."""
    if sigma_to == 0:
        return x + d * (sigma_to - sigma)
    sigma_mid = math.exp(math.log(sigma) + (math.log(sigma_to) - math.log(sigma)) * 0.5)
    x_2 = x + d * (sigma_mid - sigma)
    return x + to_d(x_2, sigma_mid, model(x_2, sigma_mid)) * (sigma_to - sigma)


def dpm2_a(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
           eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = _dpm2_step(model, x, to_d(x, sigmas[i], denoised), sigmas[i], down)
        if down != 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
        x = done(i, x)
    return x


def dpmpp_2s_a(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
               eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i])
        else:  # DPM-Solver++(2S): a half step in log sigma, then the whole from there
            t, t_next = -math.log(sigmas[i]), -math.log(down)
            h = t_next - t
            s = t + h / 2
            x_2 = (math.exp(-s) / math.exp(-t)) * x - math.expm1(-h / 2) * denoised
            x = (math.exp(-t_next) / math.exp(-t)) * x - math.expm1(-h) * model(x_2, math.exp(-s))
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * up
        x = done(i, x)
    return x


def dpmpp_sde(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
              eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5) -> torch.Tensor:
    sigma_of, t_of = (lambda t: math.exp(-t)), (lambda sigma: -math.log(sigma))
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = t_of(sigmas[i]), t_of(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            down, up = ancestral_step(sigma_of(t), sigma_of(s), eta)
            s_ = t_of(down)
            x_2 = (sigma_of(s_) / sigma_of(t)) * x - math.expm1(t - s_) * denoised
            x_2 = x_2 + noise(sigma_of(t), sigma_of(s)) * s_noise * up
            denoised_2 = model(x_2, sigma_of(s))
            down, up = ancestral_step(sigma_of(t), sigma_of(t_next), eta)
            t_next_ = t_of(down)
            mixed = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoised_2
            x = (sigma_of(t_next_) / sigma_of(t)) * x - math.expm1(t - t_next_) * mixed
            x = x + noise(sigma_of(t), sigma_of(t_next)) * s_noise * up
        x = done(i, x)
    return x


def dpmpp_2m(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done) -> torch.Tensor:
    old = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        t, t_next = -math.log(sigmas[i]), _neg_log(sigmas[i + 1])
        h = t_next - t
        mixed = denoised
        if old is not None and sigmas[i + 1] != 0:
            r = (t + math.log(sigmas[i - 1])) / h
            mixed = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old
        x = (math.exp(-t_next) / math.exp(-t)) * x - math.expm1(-h) * mixed
        old = denoised
        x = done(i, x)
    return x


def dpmpp_2m_sde(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
                 eta: float = 1.0, s_noise: float = 1.0, solver: str = "midpoint") -> torch.Tensor:
    return _dpmpp_2m_sde(model, x, sigmas, noise, done, eta, s_noise, solver, _neg_log, _unit)


def dpmpp_2m_sde_heun(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
                      eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    return dpmpp_2m_sde(model, x, sigmas, noise, done, eta, s_noise, solver="heun")


def dpmpp_3m_sde(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
                 eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    return _dpmpp_3m_sde(model, x, sigmas, noise, done, eta, s_noise, _neg_log, _unit)


def _unit(sigma: float) -> float:
    """A VE model's alpha: its image is never scaled down."""
    return 1.0


def _dpmpp_2m_sde(model: Denoiser, x, sigmas: list[float], noise: Noise, done: Done, eta: float, s_noise: float,
                  solver: str, lam: Callable[[float], float], alpha: Callable[[float], float]) -> torch.Tensor:
    """DPM++ 2M SDE in the half-log-SNR `lam` of the model's x = alpha x0 + sigma noise (a VE
    model's alpha is 1, its lambda -log sigma: k-diffusion's arithmetic): the image's terms
    scale by alpha_next."""
    old, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = lam(sigmas[i + 1]) - lam(sigmas[i])
            eta_h = h * eta if eta else 0.0  # a flow model's h is infinite from sigma 1
            scale = alpha(sigmas[i + 1])
            kept = -math.expm1(-h - eta_h)
            x = sigmas[i + 1] / sigmas[i] * math.exp(-eta_h) * x + scale * kept * denoised
            if old is not None:
                weight = (kept / (-h - eta_h) + 1) if solver == "heun" else 0.5 * kept
                x = x + scale * weight * (h / h_last) * (denoised - old)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
        old, h_last = denoised, h
        x = done(i, x)
    return x


def _dpmpp_3m_sde(model: Denoiser, x, sigmas: list[float], noise: Noise, done: Done, eta: float, s_noise: float,
                  lam: Callable[[float], float], alpha: Callable[[float], float]) -> torch.Tensor:
    """DPM++ 3M SDE in the half-log-SNR `lam`, as _dpmpp_2m_sde."""
    denoised_1, denoised_2, h_1, h_2 = None, None, None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        h = None
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = lam(sigmas[i + 1]) - lam(sigmas[i])
            eta_h = h * eta if eta else 0.0
            h_eta = h + eta_h
            scale = alpha(sigmas[i + 1])
            x = sigmas[i + 1] / sigmas[i] * math.exp(-eta_h) * x + scale * -math.expm1(-h_eta) * denoised
            x = x + scale * _3m_correction(denoised, denoised_1, denoised_2, h, h_1, h_2, h_eta)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * math.sqrt(-math.expm1(-2 * eta_h)) * s_noise
        denoised_1, denoised_2, h_1, h_2 = denoised, denoised_1, h, h_1
        x = done(i, x)
    return x


def _neg_log(sigma: float) -> float:
    """-log sigma, inf at sigma 0 (the last step lands there, as torch's log gives -inf)."""
    return -math.log(sigma) if sigma > 0 else math.inf


def _3m_correction(denoised, denoised_1, denoised_2, h, h_1, h_2, h_eta):
    """The second- and third-order terms from the last two denoised images (none at first)."""
    if h_1 is None:
        return 0
    phi_2 = math.expm1(-h_eta) / h_eta + 1
    if h_2 is None:
        return phi_2 * (denoised - denoised_1) / (h_1 / h)
    r0, r1 = h_1 / h, h_2 / h
    d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
    d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
    d2 = (d1_0 - d1_1) / (r0 + r1)
    return phi_2 * d1 - (phi_2 / h_eta - 0.5) * d2


def lms(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done, order: int = 4) -> torch.Tensor:
    from scipy import integrate

    def coefficient(order: int, t, i: int, j: int) -> float:
        def product(tau):
            out = 1.0
            for k in range(order):
                if k != j:
                    out *= (tau - t[i - k]) / (t[i - j] - t[i - k])
            return out
        return integrate.quad(product, t[i], t[i + 1], epsrel=1e-4)[0]

    ds: list[torch.Tensor] = []
    for i in range(len(sigmas) - 1):
        ds = [*ds, to_d(x, sigmas[i], model(x, sigmas[i]))][-order:]
        now = min(i + 1, order)
        x = x + sum(coefficient(now, sigmas, i, j) * d for j, d in enumerate(reversed(ds)))
        x = done(i, x)
    return x



# -- flow-matching models (x = (1 - sigma) x0 + sigma noise) ------------------------------------
# The probability-flow ODE has the same form, dx/dsigma = (x - denoised) / sigma, so the samplers
# above run unchanged; fresh noise differs. Where a VE sampler adds noise on top (its variance
# sigma^2 on the image), a flow model's image shrinks by alpha = 1 - sigma as noise grows: these
# variants keep x's mix at alpha x0 + sigma noise after every draw.

def rf_ancestral_step(sigma_from: float, sigma_to: float, eta: float = 1.0) -> tuple[float, float, float]:
    """(sigma_down, scale, renoise) of a rectified-flow ancestral step (Forge's, for FLUX): the
    deterministic step lands eta's share of the way from sigma_to towards sigma_to^2 / sigma_from
    (the VE step's sigma_down at eta 1); x there, scaled by alpha_to / alpha_down, takes fresh
    noise `renoise` so that its noise is sigma_to again."""
    down = sigma_to * (1 + (sigma_to / sigma_from - 1) * eta)
    scale = (1 - sigma_to) / (1 - down)
    return down, scale, max(sigma_to ** 2 - (down * scale) ** 2, 0.0) ** 0.5


def euler_a_flow(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
                 eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            down, scale, renoise = rf_ancestral_step(sigmas[i], sigmas[i + 1], eta)
            x = x + to_d(x, sigmas[i], denoised) * (down - sigmas[i])
            if eta:
                x = scale * x + noise(sigmas[i], sigmas[i + 1]) * s_noise * renoise
        x = done(i, x)
    return x


def dpm2_a_flow(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
                eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, scale, renoise = rf_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = _dpm2_step(model, x, to_d(x, sigmas[i], denoised), sigmas[i], down)
        if down != 0:
            x = scale * x + noise(sigmas[i], sigmas[i + 1]) * s_noise * renoise
        x = done(i, x)
    return x


def dpmpp_2s_a_flow(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
                    eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        down, scale, renoise = rf_ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if down == 0:
            x = denoised
        else:  # DPM-Solver++(2S) to sigma_down: a half step in log sigma, then the whole from there
            h = math.log(sigmas[i]) - math.log(down)
            mid = sigmas[i] * math.exp(-h / 2)
            x_2 = (mid / sigmas[i]) * x - math.expm1(-h / 2) * denoised
            x = (down / sigmas[i]) * x - math.expm1(-h) * model(x_2, mid)
        if sigmas[i + 1] > 0:
            x = scale * x + noise(sigmas[i], sigmas[i + 1]) * s_noise * renoise
        x = done(i, x)
    return x


def dpmpp_sde_flow(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
                   eta: float = 1.0, s_noise: float = 1.0, r: float = 0.5) -> torch.Tensor:
    """DPM++ SDE's two stages (to the point r of the step in log sigma, then to its end), each
    a first-order step to a rectified-flow ancestral step's sigma_down and its fresh noise."""
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i])
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            sigma_s = sigmas[i] ** (1 - r) * sigmas[i + 1] ** r
            x_2 = _rf_stage(x, sigmas[i], sigma_s, denoised, noise, eta, s_noise)
            denoised_2 = model(x_2, sigma_s)
            mixed = (1 - 1 / (2 * r)) * denoised + 1 / (2 * r) * denoised_2
            x = _rf_stage(x, sigmas[i], sigmas[i + 1], mixed, noise, eta, s_noise)
        x = done(i, x)
    return x


def _rf_stage(x, sigma: float, sigma_to: float, denoised, noise: Noise, eta: float, s_noise: float):
    down, scale, renoise = rf_ancestral_step(sigma, sigma_to, eta)
    x = (down / sigma) * x + (1 - down / sigma) * denoised
    return scale * x + noise(sigma, sigma_to) * s_noise * renoise


def half_log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma), alpha = 1 - sigma: -inf at sigma 1 (pure noise)."""
    return math.log1p(-sigma) - math.log(sigma) if sigma < 1 else -math.inf


def dpmpp_2m_sde_flow(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
                      eta: float = 1.0, s_noise: float = 1.0, solver: str = "midpoint") -> torch.Tensor:
    """DPM++ 2M SDE in the half-log-SNR lambda of alpha = 1 - sigma."""
    return _dpmpp_2m_sde(model, x, sigmas, noise, done, eta, s_noise, solver, half_log_snr, _flow_alpha)


def dpmpp_2m_sde_heun_flow(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
                           eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    return dpmpp_2m_sde_flow(model, x, sigmas, noise, done, eta, s_noise, solver="heun")


def dpmpp_3m_sde_flow(model: Denoiser, x: torch.Tensor, sigmas: list[float], noise: Noise, done: Done,
                      eta: float = 1.0, s_noise: float = 1.0) -> torch.Tensor:
    """DPM++ 3M SDE in the half-log-SNR lambda of alpha = 1 - sigma."""
    return _dpmpp_3m_sde(model, x, sigmas, noise, done, eta, s_noise, half_log_snr, _flow_alpha)


def _flow_alpha(sigma: float) -> float:
    return 1 - sigma
