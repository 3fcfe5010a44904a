"""Image-to-image, in the order diffusers' img2img pipelines run it: check inputs, encode the
prompt, keep the timesteps that strength selects, encode the image, add noise, denoise, decode.

Strength s runs the last int(steps * s) steps: the image latents are noised to the first kept
timestep and denoised from there. Each image draws its VAE latent sample, then its noise, from
its own CPU generator, as diffusers does. At strength 1 nothing of the image survives, so it is
text-to-image at the image's size (diffusers would still noise the image to the first timestep,
leaving a trace of it); at strength 0 no step runs and the image comes back through the VAE.
A dedicated inpainting model (9-channel) is inpainted with an all-white mask instead.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from PIL import Image

from ldm_cli import control, hires_plan, images, inpaint, pipeline, sampling, vae
from ldm_cli.strength import add_noise, check_inputs, strength_timesteps
from ldm_cli.settings import Settings

DEFAULT_STRENGTH = 0.75


def with_defaults(s: Settings) -> Settings:
    """The default strength, and no mask or hires settings (they may come from --from-png)."""
    s = dataclasses.replace(hires_plan.without(s), mask_blur=None, only_masked=None, padding=None)
    return s if s.strength is not None else s.merged(strength=DEFAULT_STRENGTH)


def encode_images(model, group: list[Settings], init_images: list[Image.Image],
                  generators: list[torch.Generator]) -> torch.Tensor:
    """Image latents at the group's size, sampled from the VAE's distribution with each image's generator."""
    s = group[0]
    pixels = vae.to_tensor([images.resized(im, s.width, s.height) for im in init_images])
    return vae.encode(model, pixels, generators)


def _repaint_all(model, group: list[Settings], init_images: list[Image.Image], on_step) -> list[Image.Image]:
    """A dedicated inpainting model (9-channel) takes a mask too: an all-white one repaints everything."""
    whole = [Image.new("L", im.size, 255) for im in init_images]
    return inpaint.inpaint(model, [g.merged(mask_blur=0, only_masked=False) for g in group],
                           init_images, whole, on_step)


def image_to_image(model, group: list[Settings], init_images: list[Image.Image],
                   on_step: Callable[[], None] | None = None) -> list[Image.Image]:
    # 1. check inputs
    check_inputs(model, group, init_images)
    s = group[0]
    if model.is_inpainting:
        return _repaint_all(model, group, init_images, on_step)
    if s.strength == 1:  # nothing of the image survives the noise: text-to-image at its size
        return pipeline.text_to_image(model, group, on_step)
    # 2. encode the prompts
    positive, negative = pipeline.encode_prompts(model, group)
    # 3. timesteps from strength
    scheduler = pipeline.make_scheduler(model, group)
    timesteps = strength_timesteps(scheduler, s, model.family)
    # 4. image latents
    generators = pipeline.generators_for(group)
    units = control.for_batch(model, s.width, s.height, generators)  # before the image's sample, as diffusers
    latents = encode_images(model, group, init_images, generators)
    # 5. noise
    latents, _ = add_noise(model, group, scheduler, latents, generators, timesteps)
    # 6. denoise
    latents = sampling.denoise(model, scheduler, latents, positive, negative, s.cfg, generators,
                               timesteps, on_step=on_step, control=units)
    # 7. decode
    return vae.decode(model, latents)
