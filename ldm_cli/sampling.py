"""The one denoising loop, for every mode and family.

Classifier-free guidance runs the negative and positive halves in one denoiser call and mixes
them as eps = eps_neg + cfg * (eps_pos - eps_neg); at cfg 1 that is eps_pos, so the negative half
is skipped. The conditioning may change at given steps and hold several weighted positive parts
(A1111's prompt editing and AND): guidance.py says what each step asks of the denoiser. img2img enters with fewer timesteps and noised image latents; inpainting adds input
channels (dedicated 9-channel models) or blends the known region back after each step.
ControlNet units (control.py) add their residuals to each denoiser call's conditioning, their
control images indexed by the same rows as the latents, so both CFG halves see them. An edit's
references (Family.edit) are conditioning per image, indexed alike and added to each call's.

Noise-prediction and flow-matching models share it: what differs is the scheduler's. Flow-matching
schedulers start from unscaled noise, take the model's input unscaled (they have no
scale_model_input) and noise an image as (1 - sigma) x + sigma noise (`add_noise` here).
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch

from ldm_cli import ddim_cfgpp
from ldm_cli.control import Control
from ldm_cli.errors import LdmError
from ldm_cli.families.family import Cond
from ldm_cli.guidance import Call, Guidance, Parts, Schedule
from ldm_cli.ksampling import OWN_STEPS, KRun

# (latents after step i, i) -> latents; used by inpainting with an ordinary model
Blend = Callable[[torch.Tensor, int], torch.Tensor]


def init_noise_sigma(scheduler) -> float:
    """How much the starting noise is scaled: 1 for flow-matching schedulers, which have no such attribute."""
    return getattr(scheduler, "init_noise_sigma", 1.0)


def add_noise(scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """`latents` noised to timestep(s) `t`: flow-matching schedulers call this scale_noise."""
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(latents, t, noise)
    return scheduler.add_noise(latents, noise, t)


def denoise(model, scheduler, latents: torch.Tensor, positive: Cond | list[Parts],
            negative: Cond | list[Schedule] | None, cfg: float, generators: list[torch.Generator],
            timesteps: torch.Tensor, *, extra_input: torch.Tensor | None = None, blend: Blend | None = None,
            on_step: Callable[[], None] | None = None, control: Control | None = None,
            references: Cond | None = None, span: tuple[int, int] | None = None) -> torch.Tensor:
    """Run `timesteps` of `scheduler` from `latents`; returns the final latents. The conditioning
    is either batched (one cond per image, all steps) or per image: weighted AND parts and a
    negative, each a schedule over the steps (guidance.py). `span`: (the first timestep's step
    number, the run's step count) where the run is split between two models (refiner.py), so
    prompt schedules and ControlNet ranges count the whole run's steps."""
    first, total = span or (0, len(timesteps))
    cfg_pp = isinstance(scheduler, KRun) and scheduler.cfg_pp
    plan = Guidance(positive, negative, cfg / ddim_cfgpp.CFG_DIVISOR if cfg_pp else cfg, model.family.guided,
                    keep_negative=cfg_pp)
    rows = _row_index(plan.row_images(), len(latents))
    if extra_input is not None:
        extra_input = _rows(extra_input, rows)
    if control is not None:
        control = control.for_rows(lambda image: _rows(image, rows))
    if references is not None:
        references = {k: _rows(v, rows) for k, v in references.items()}
    if isinstance(scheduler, KRun):
        return _k_denoise(model, scheduler, latents, plan, rows, extra_input, control, generators, timesteps,
                          blend, on_step, references)
    step_kwargs = {"generator": generators} if "generator" in inspect.signature(scheduler.step).parameters else {}
    for i, t in enumerate(timesteps):
        with torch.inference_mode():  # the scheduler's arithmetic too: no autograd bookkeeping anywhere
            at = control.at(first + i, total) if control is not None else None
            latents = _step(model, scheduler, latents, t, plan, plan.calls(first + i), rows, extra_input, step_kwargs, at,
                            references)
        if blend is not None:
            latents = blend(latents, i)
        if on_step is not None:
            on_step()
    return latents


def _k_denoise(model, run: KRun, latents: torch.Tensor, plan: Guidance, rows: torch.Tensor | int,
               extra_input: torch.Tensor | None, control: Control | None, generators: list[torch.Generator],
               timesteps: torch.Tensor, blend: Blend | None, on_step: Callable[[], None] | None,
               references: Cond | None = None) -> torch.Tensor:
    """A k-diffusion sampler over the kept sigmas: it asks the denoiser for x's denoised image at
    the sigmas it chooses, several times a step for some; the conditioning schedule advances with
    each call (A1111's), ControlNet's with each step."""
    if blend is not None and run.sampler in OWN_STEPS:
        raise LdmError(f"{run.sampler} takes steps of its own, which inpainting an ordinary model cannot follow; "
                       "use another --scheduler or an inpainting model")
    sigmas = run.kept(len(timesteps))
    calls, steps = [0], [0]

    def denoiser(x: torch.Tensor, sigma: float) -> torch.Tensor:
        scale = run.c_in(sigma)
        x_in = _rows(x, rows) if scale == 1 else _rows(x, rows) * scale  # a flow model's is 1
        t = run.timestep(sigma, x.device)
        full = x_in if extra_input is None else torch.cat([x_in, extra_input], dim=1)
        at = control.at(steps[0], len(timesteps)) if control is not None else None
        out = _predict(model, full, t, plan.calls(calls[0]), x_in, at, references)
        calls[0] += 1
        if run.cfg_pp:
            return run.denoised(x, sigma, plan.combine(out)), run.denoised(x, sigma, plan.unguided(out))
        return run.denoised(x, sigma, plan.combine(out))

    def done(i: int, x: torch.Tensor) -> torch.Tensor:
        steps[0] = i + 1
        if blend is not None:
            x = blend(x, i)
        if on_step is not None:
            on_step()
        return x

    with torch.inference_mode():
        return run.sample(denoiser, latents, sigmas, generators, done)


def _row_index(images: list[int], count: int) -> torch.Tensor | int:
    """How the rows repeat the latents: 1 (as they are), 2 (negative and positive halves), or an index."""
    for times in (1, 2):
        if images == list(range(count)) * times:
            return times
    return torch.tensor(images)


def _rows(x: torch.Tensor, rows: torch.Tensor | int) -> torch.Tensor:
    if isinstance(rows, int):
        return x if rows == 1 else torch.cat([x] * rows)
    return x[rows.to(x.device)]


def _step(model, scheduler, latents: torch.Tensor, t: torch.Tensor, plan: Guidance, calls: list[Call],
          rows: torch.Tensor | int, extra_input: torch.Tensor | None, step_kwargs: dict,
          control: Control | None = None, references: Cond | None = None) -> torch.Tensor:
    """The denoiser on every row (one call per conditioning shape), guidance, one scheduler step."""
    x = _rows(latents, rows)
    if hasattr(scheduler, "scale_model_input"):
        x = scheduler.scale_model_input(x, t)
    latent_x = x  # a ControlNet reads the latents alone, without an inpainting model's extra channels
    if extra_input is not None:
        x = torch.cat([x, extra_input], dim=1)
    out = _predict(model, x, t, calls, latent_x, control, references)
    return scheduler.step(plan.combine(out), t, latents, **step_kwargs, return_dict=False)[0]


def _predict(model, x: torch.Tensor, t: torch.Tensor, calls: list[Call], latent_x: torch.Tensor,
             control: Control | None, references: Cond | None) -> torch.Tensor:
    def cond_of(call: Call, rows) -> Cond:
        cond = call.cond if references is None else {**call.cond, **{k: v[rows] for k, v in references.items()}}
        return cond if control is None else control.with_residuals(model, latent_x, t, cond, rows)

    if len(calls) == 1:
        return model.family.predict(model, x, t, cond_of(calls[0], slice(None)))
    parts = [(call.rows, model.family.predict(model, x[call.rows], t, cond_of(call, call.rows))) for call in calls]
    out = parts[0][1].new_empty((len(x), *parts[0][1].shape[1:]))
    for rows, part in parts:
        out[rows] = part
    return out
