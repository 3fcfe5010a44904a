"""SDXL's refiner (`--refiner`, A1111's Refiner): the base denoises to the switch point, the
refiner finishes from the same latents on the same scheduler, with no new noise. The split is
diffusers' (denoising_end on the base, denoising_start on the refiner): the base runs the
timesteps at or above round(T - switch_at * T), T the training timesteps.

The refiner is a second Model (Model.refiner) of the base's family and its Family.refiner
variant; its prompts are encoded at the switch, by its own text encoder."""
from __future__ import annotations

from typing import Callable

import torch

from ldm_cli import conditioning, memory, sampling
from ldm_cli.control import Control
from ldm_cli.errors import LdmError
from ldm_cli.ksampling import KRun
from ldm_cli.settings import Settings


def switch_index(timesteps: torch.Tensor, switch_at: float, train_timesteps: int) -> int:
    """How many of `timesteps` the base runs (diffusers' discrete timestep cutoff)."""
    cutoff = int(round(train_timesteps - switch_at * train_timesteps))
    return int((timesteps >= cutoff).sum())


def denoise(model, scheduler, latents: torch.Tensor, encoded: tuple, group: list[Settings],
            generators: list[torch.Generator], timesteps: torch.Tensor, on_step: Callable[[], None] | None,
            control: Control | None) -> torch.Tensor:
    """The loop over `timesteps`: the base alone, or the base to the switch and the refiner after."""
    s, (positive, negative) = group[0], encoded
    refiner = model.refiner if s.refiner else None
    if refiner is not None and isinstance(scheduler, KRun):  # its split counts timesteps, a KRun walks sigmas
        raise LdmError(f"--refiner runs with diffusers' samplers, not yet with ldm's k-diffusion ones: "
                       f"{s.scheduler} with the {s.schedule or 'default'} schedule is one; pick e.g. "
                       "--scheduler euler --schedule default")
    k = len(timesteps) if refiner is None else switch_index(timesteps, s.refiner_switch_at, model.train_timesteps)
    span = (0, len(timesteps))
    latents = sampling.denoise(model, scheduler, latents, positive, negative, s.cfg, generators, timesteps[:k],
                               on_step=on_step, control=control, span=span)
    if refiner is None or k == len(timesteps):
        return latents
    memory.set_aside(model)  # off the GPU where offloaded: the refiner takes its place
    positive, negative = conditioning.encode(refiner, group)
    memory.release_text_encoders(refiner)
    latents = sampling.denoise(refiner, scheduler, latents.to(refiner.device, refiner.dtype), positive, negative,
                               s.cfg, generators, timesteps[k:], on_step=on_step, span=(k, len(timesteps)))
    memory.set_aside(refiner)
    return latents.to(model.device, model.dtype)


def check(model, refiner) -> None:
    """The refiner finishes this model's images: the refiner variant of the model's own family."""
    wanted = model.family.refiner
    if wanted is None or model.options.get("variant") == wanted:
        what = "an SDXL refiner" if wanted else f"a {model.family.label} model"
        raise LdmError(f"--refiner finishes an SDXL base model's images, but {model.name} is {what}; "
                       "pass an SDXL base model with --model")
    if refiner.family is not model.family or refiner.options.get("variant") != wanted:
        raise LdmError(f"--refiner {refiner.name} is not an SDXL refiner (it is a {refiner.family.label} model"
                       f"{'' if refiner.family is not model.family else ', a base'}); pass the refiner's folder "
                       "(its model_index.json says requires_aesthetics_score)")


def attach(model, path: str, options) -> None:
    """Load the refiner at `path` as the base's Model.refiner, checked against it. It takes the
    base's placement (device, dtype, offload, weights), not the files that replace the base's
    parts (--vae, --text-encoder, --config): the base's VAE decodes."""
    from dataclasses import replace

    from ldm_cli import loading

    refiner = loading.load(path, replace(options, vae=None, config=None, text_encoders=[]))
    check(model, refiner)
    model.refiner = refiner
