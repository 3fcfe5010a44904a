"""The one denoising loop, for every mode and family.

Classifier-free guidance runs the negative and positive halves in one denoiser call and mixes
them as eps = eps_neg + cfg * (eps_pos - eps_neg); at cfg 1 that is eps_pos, so the negative half
is skipped. img2img enters with fewer timesteps and noised image latents; inpainting adds input
channels (dedicated 9-channel models) or blends the known region back after each step.

Noise-prediction and flow-matching models share it: what differs is the scheduler's. Flow-matching
schedulers start from unscaled noise, take the model's input unscaled (they have no
scale_model_input) and noise an image as (1 - sigma) x + sigma noise (`add_noise` here).
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from ldm_cli.families import Cond

# (latents after step i, i) -> latents; used by inpainting with an ordinary model
Blend = Callable[[torch.Tensor, int], torch.Tensor]


def uses_negative(cfg: float) -> bool:
    return cfg != 1


def init_noise_sigma(scheduler) -> float:
    """How much the starting noise is scaled: 1 for flow-matching schedulers, which have no such attribute."""
    return getattr(scheduler, "init_noise_sigma", 1.0)


def add_noise(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`latents` noised to timestep(s) `t`: flow-matching schedulers call this scale_noise."""
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(latents, t, noise)
    return scheduler.add_noise(latents, noise, t)


def _stack(negative: Cond, positive: Cond) -> Cond:
    return {k: torch.cat([negative[k], positive[k]]) for k in positive}


def denoise(model, scheduler, latents: torch.Tensor, positive: Cond, negative: Cond | None,
            cfg: float, generators: list[torch.Generator], timesteps: torch.Tensor, *,
            extra_input: torch.Tensor | None = None, blend: Blend | None = None,
            on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Run `timesteps` of `scheduler` from `latents`; returns the final latents."""
    guided = uses_negative(cfg)
    cond = _stack(negative, positive) if guided else positive
    if extra_input is not None and guided:
        extra_input = torch.cat([extra_input] * 2)
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(timesteps):
        with torch.inference_mode():  # the scheduler's arithmetic too: no autograd bookkeeping anywhere
            latents = _step(model, scheduler, latents, t, cond, cfg, guided, extra_input, step_kwargs)
        if blend is not None:
            latents = blend(latents, i)
        if on_step is not None:
            on_step()
    return latents


def _step(model, scheduler, latents: torch.Tensor, t: torch.Tensor, cond: Cond, cfg: float, guided: bool,
          extra_input: torch.Tensor | None, step_kwargs: dict) -> torch.Tensor:
    """One denoiser call (both halves at once when guided) and one scheduler step."""
    x = torch.cat([latents] * 2) if guided else latents
    if hasattr(scheduler, "scale_model_input"):
        x = scheduler.scale_model_input(x, t)
    if extra_input is not None:
        x = torch.cat([x, extra_input], dim=1)
    out = model.family.predict(model, x, t, cond)
    if guided:
        out_neg, out_pos = out.chunk(2)
        out = out_neg + cfg * (out_pos - out_neg)
    return scheduler.step(out, t, latents, **step_kwargs, return_dict=False)[0]
