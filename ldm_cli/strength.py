"""Denoising strength, shared by img2img and inpainting: which of the schedule's steps run, and
the image latents noised to the first of them."""
from __future__ import annotations

import torch
from PIL import Image

from ldm_cli import pipeline, sampling, schedulers, strength_steps
from ldm_cli.errors import LdmError
from ldm_cli.settings import Settings


def steps_run(s: Settings, family=None) -> int:
    """How many of the settings' steps strength keeps on a model of `family` (None: a
    noise-prediction one): A1111's count on the k-diffusion path (strength 0.75 of 40 runs 31, as
    Forge counts for flow models too), diffusers' on its schedulers (30). Strength 0 keeps none
    on either: the image comes back through the VAE."""
    if pipeline.k_path(s, family) and s.strength > 0:
        return strength_steps.a1111(s.steps, s.strength)[1]
    return strength_steps.diffusers(s.steps, s.strength, family is not None and family.flow)


def strength_timesteps(scheduler, s: Settings, family=None) -> torch.Tensor:
    """The last steps_run(s) steps of the schedule; the scheduler is told to start there."""
    return tail_timesteps(scheduler, s.steps, steps_run(s, family))


def tail_timesteps(scheduler, steps: int, kept: int) -> torch.Tensor:
    """The last `kept` of the `steps` steps set on the scheduler, which is told to start there
    (hires fix keeps its own count: A1111's N of int(N / strength))."""
    start = (steps - kept) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


def add_noise(model, group: list[Settings], scheduler, latents: torch.Tensor,
              generators: list[torch.Generator], timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents noised to the first kept timestep, the noise); unchanged latents when no step is kept."""
    noise = pipeline.initial_noise(model, group, generators)
    if len(timesteps):
        latents = sampling.add_noise(scheduler, latents, noise, timesteps[:1].repeat(len(latents)))
    return latents, noise


def check_sampler(s: Settings, what: str = "img2img and inpainting") -> None:
    """One line for a sampler that ldm runs from noise only: DDIM CFG++ (A1111's img2img with it
    noises the image to one timestep and starts at the next, not copied here)."""
    if schedulers.cfg_pp(s.scheduler):
        raise LdmError(f"{schedulers.label(s.scheduler)} runs text to image only; use another sampler for {what}")


def check_inputs(model, group: list[Settings], init_images: list[Image.Image]) -> None:
    pipeline.check_inputs(model, group)
    check_sampler(group[0])
    if group[0].strength is None or len(init_images) != len(group):
        raise ValueError("img2img needs a strength and one init image per settings")
