"""Text-to-image, in the order every Stable Diffusion pipeline runs it:
check inputs, encode the prompt, set the timesteps, make the latents, denoise, decode.

A call renders a group of settings that share size, steps, cfg and scheduler in one batch;
the prompts and seeds may differ. Image i is the same as it would be rendered alone: its
starting noise (and any noise the scheduler draws) comes from its own CPU generator.
"""
from __future__ import annotations

from typing import Callable

import torch
from PIL import Image

from ldm_cli import conditioning, control, ksampling, memory, refiner, sampling, schedulers, vae
from ldm_cli.errors import LdmError
from ldm_cli.settings import Settings

BATCH_FIELDS = ("width", "height", "steps", "cfg", "scheduler", "schedule", "strength", "shift",
                "max_sequence_length", "no_t5", "guidance", "controlnet", "hires_scale", "hires_width",
                "hires_height", "hires_upscaler", "hires_steps", "hires_scheduler", "hires_schedule", "hires_cfg",
                "eta", "s_churn", "s_tmin", "s_tmax", "s_noise", "masked_content",
                "refiner", "refiner_switch_at")


def batch_key(s: Settings) -> tuple:
    """Settings with equal keys can be denoised together in one batch (strength sets the timesteps;
    the LoRAs a prompt, or a hires prompt, names are merged into the model for its whole pass)."""
    from ldm_cli.networks import session

    return (*(getattr(s, f) for f in BATCH_FIELDS), session.lora_key(s.prompt), session.lora_key(s.hires_prompt or ""))


def check_inputs(model, group: list[Settings]) -> None:
    if len({batch_key(s) for s in group}) != 1:
        raise ValueError("a batch must share size, steps, cfg, scheduler, strength and text options")
    factor = model.size_multiple
    for side in ("width", "height"):
        value = getattr(group[0], side)
        if value % factor:
            raise LdmError(f"--{side} must be a multiple of {factor} for this model (got {value}); "
                           f"try {max(factor, round(value / factor) * factor)}")
    schedulers.check_for_model(group[0].scheduler, group[0].schedule, model.family.flow, model.family)


def generators_for(group: list[Settings]) -> list[torch.Generator]:
    return [torch.Generator("cpu").manual_seed(s.seed) for s in group]


def encode_prompts(model, group: list[Settings]):
    """(positive, negative) conditioning, prompts read as A1111 reads them (conditioning.py); no
    negative pass where guidance needs none (cfg 1). The group's LoRAs are merged into the model
    first (its text encoders' layers too). A run's batches are encoded ahead (ahead.py)."""
    s = group[0]
    if model.networks is not None:
        model.networks.activate(s.prompt)
    if model.encoded is not None:  # a run planned ahead: its text encoders go once all is encoded
        return model.encoded.encode(group)
    encoded = conditioning.encode(model, group)
    memory.release_text_encoders(model)  # off the GPU where offloaded: the denoiser takes its place
    return encoded


def scheduler_run(model, s: Settings) -> schedulers.Run:
    tokens = (s.height // model.size_multiple) * (s.width // model.size_multiple)  # a size-dependent shift's input
    return schedulers.Run(s.scheduler, s.schedule, model.scheduler_config, model.family.flow, s.shift, tokens,
                          model.family.sigmas, model.family.mu)


def check_steps(model, s: Settings) -> None:
    """The sampler suits the model and can run s.steps with it: one line otherwise, before any image."""
    schedulers.check_for_model(s.scheduler, s.schedule, model.family.flow, model.family)
    if not k_path(s, model.family):  # k-diffusion's run any count
        schedulers.check_steps(scheduler_run(model, s), s.steps)


def k_path(s: Settings, family=None) -> bool:
    """Whether `s` runs on ldm's k-diffusion samplers (ksampling.py) rather than a diffusers
    scheduler, on a model of `family` (a families.family.Family; None: a noise-prediction one)."""
    flow = family is not None and family.flow
    return schedulers.uses_k(s.scheduler, s.schedule, bool(s.sampler_options()), flow,
                             flow and family.sigmas is not None)


def make_scheduler(model, group: list[Settings]):
    """A diffusers scheduler, or the run of one of A1111's k-diffusion samplers (ksampling.py)."""
    run = scheduler_run(model, group[0])
    if k_path(group[0], model.family):
        return ksampling.prepared(model, group, run)
    return schedulers.prepared(run, group[0].steps, model.device, [g.seed for g in group])


def initial_noise(model, group: list[Settings], generators: list[torch.Generator]) -> torch.Tensor:
    """Each image's starting noise from its seed: its CPU generator's (`--rng cpu`), or CUDA's
    Philox numbers as A1111 draws them (`--rng nv`), which leaves the generator untouched."""
    from diffusers.utils.torch_utils import randn_tensor

    from ldm_cli import philox

    s, f = group[0], model.vae_scale_factor
    shape = (len(group), model.latent_channels, s.height // f, s.width // f)
    if all(g.rng != "nv" for g in group):
        return randn_tensor(shape, generator=generators, device=model.device, dtype=model.dtype)
    return torch.cat([philox.randn(g.seed, shape[1:])[None].to(model.device, model.dtype) if g.rng == "nv"
                      else randn_tensor((1, *shape[1:]), generator=[gen], device=model.device, dtype=model.dtype)
                      for g, gen in zip(group, generators)])


def text_to_image(model, group: list[Settings], on_step: Callable[[], None] | None = None) -> list[Image.Image]:
    return vae.decode(model, text_to_latents(model, group, on_step))


def text_to_latents(model, group: list[Settings], on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """Every step of text-to-image but the decode (hires fix goes on from the latents)."""
    # 1. check inputs
    check_inputs(model, group)
    # 2. encode the prompts
    positive, negative = encode_prompts(model, group)
    # 3. timesteps
    scheduler = make_scheduler(model, group)
    # 4. latents
    generators = generators_for(group)
    units = control.for_batch(model, group[0].width, group[0].height, generators)  # before the noise, as diffusers
    latents = initial_noise(model, group, generators) * sampling.init_noise_sigma(scheduler)
    # 5. denoise (the refiner, when asked, finishing from the switch point)
    return refiner.denoise(model, scheduler, latents, (positive, negative), group, generators, scheduler.timesteps,
                           on_step, units)
