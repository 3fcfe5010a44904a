"""Hires fix, as A1111 runs it: render at the first size, upscale, then denoise again at the new
size from the tail of a longer schedule (hires_plan.py holds its rules as data).

The upscale is of the latents (the `Latent` modes: torch's interpolate) or of the decoded image
(`Lanczos`, `Nearest`, `None`, or a model: upscaling.py), which is then encoded with the VAE's mean (A1111 samples the
posterior with an unseeded generator, which no one can replay). The second pass is img2img's
arithmetic: its noise comes from a fresh generator seeded with the image's seed at the new size
(CUDA's Philox numbers with `--rng nv`, as A1111 draws them), its ControlNets read their control
images at the new size, its prompts are encoded like any others (ahead.py plans them).
"""
from __future__ import annotations

from typing import Callable

import torch
from PIL import Image

from ldm_cli import control, hires_plan, pipeline, sampling, strength, upscaling, vae
from ldm_cli.errors import LdmError
from ldm_cli.settings import Settings


def text_to_image(model, group: list[Settings], on_step: Callable[[], None] | None = None) -> list[Image.Image]:
    """Text-to-image, with hires fix's second pass when the group's settings turn it on."""
    if not hires_plan.enabled(group[0]):
        return pipeline.text_to_image(model, group, on_step)
    latents = pipeline.text_to_latents(model, group, on_step)
    return vae.decode(model, second_pass(model, group, latents, on_step))


def second_pass(model, group: list[Settings], latents: torch.Tensor,
                on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """The first pass's latents upscaled, cropped, noised and denoised at the hires size."""
    s, multiple = group[0], model.size_multiple
    hires = [hires_plan.second_pass(g, multiple) for g in group]
    total, kept = hires_plan.steps(s)
    left, top, right, bottom = hires_plan.crop(s, model.vae_scale_factor, multiple)
    latents = upscaled(model, s, latents)
    latents = latents[:, :, top:latents.shape[2] - bottom, left:latents.shape[3] - right]
    positive, negative = pipeline.encode_prompts(model, hires)
    scheduler = pipeline.make_scheduler(model, [h.merged(steps=total) for h in hires])
    timesteps = strength.tail_timesteps(scheduler, total, kept)
    generators = pipeline.generators_for(hires)
    units = control.for_batch(model, hires[0].width, hires[0].height, generators)
    latents, _ = strength.add_noise(model, hires, scheduler, latents, generators, timesteps)
    return sampling.denoise(model, scheduler, latents, positive, negative, hires[0].cfg, generators,
                            timesteps, on_step=on_step, control=units)


def upscaled(model, s: Settings, latents: torch.Tensor) -> torch.Tensor:
    """The latents at the upscaled size (rounded down to the model's multiple), by a latent mode
    or through the image."""
    multiple, factor = model.size_multiple, model.vae_scale_factor
    width, height = (side // multiple * multiple for side in hires_plan.upscaled_size(s))
    if s.hires_upscaler in hires_plan.LATENT_MODES:
        mode, antialias = hires_plan.LATENT_MODES[s.hires_upscaler]
        return torch.nn.functional.interpolate(latents, size=(height // factor, width // factor), mode=mode,
                                               antialias=antialias)
    # A1111 truncates the decoded image to 8 bits before it upscales it
    pictures = vae.to_pil(vae.decode_pixels(model, latents), rounded=False)
    size = hires_plan.upscaled_size(s)
    pictures = [upscaling.upscale_to(p, s.hires_upscaler, size, models_dir=None, device=model.device)
                .crop((0, 0, width, height)) for p in pictures]
    return vae.encode(model, vae.to_tensor(pictures), None)


def steps(s: Settings) -> int:
    """The denoising steps an image of these settings takes, both passes counted."""
    return s.steps + (hires_plan.steps(s)[1] if hires_plan.enabled(s) else 0)


def planned(model, groups: list[list[Settings]]) -> list[list[Settings]]:
    """The batches whose prompts a run encodes (ahead.py): each batch, then its second pass's."""
    def second(group: list[Settings]) -> list[list[Settings]]:
        return [[hires_plan.second_pass(s, model.size_multiple) for s in group]] if hires_plan.enabled(group[0]) else []
    return [part for group in groups for part in [group, *second(group)]]


def check(model, s: Settings) -> None:
    """The second pass's size suits the model, and its sampler the model and its steps."""
    if not hires_plan.enabled(s):
        return
    hires = hires_plan.second_pass(s, model.size_multiple)
    strength.check_sampler(hires, "hires fix's second pass (--hires-scheduler)")
    if hires.width % model.size_multiple or hires.height % model.size_multiple:
        raise LdmError(f"--hires-resize must be a multiple of {model.size_multiple} a side for this model "
                       f"(got {hires.width}x{hires.height})")
    pipeline.check_steps(model, hires.merged(steps=hires_plan.steps(s)[0]))
