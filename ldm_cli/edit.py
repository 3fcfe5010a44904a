"""Instruction editing (`ldm edit`), in the order diffusers' edit pipelines run it: check inputs,
encode the prompt, set the timesteps, draw the noise, encode the input images, denoise, decode.

The loop starts from pure noise at the output size, as text-to-image does; what makes it an edit
is the input images (the edited one first, then references), which the family turns into
conditioning of each image's rows (Family.edit: Kontext's reference tokens). Each input goes to
the VAE at the size the model's pipeline gives it (Editing.input_size: klein's own size, Qwen's
1 MP), else at the output's pixel area at its own aspect, rounded to the model's size multiple.
With --mask the run is inpaint's, given the same conditioning (edit_masked).
"""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from ldm_cli import images, pipeline, sampling, vae
from ldm_cli.errors import LdmError
from ldm_cli.families.family import Editing
from ldm_cli.settings import Settings


def editing(model) -> Editing:
    """The loaded model's way of editing, or one line suggesting img2img."""
    variant = model.options.get("variant")
    return _hook(model.family, variant, model.family.label + (f" {variant}" if variant else ""))


def check_model(source: str | None, variant: str | None = None) -> Editing | None:
    """Refuse a model that cannot edit from its configs or header, before its weights load; its
    way of editing (None: unreadable here, and the load says why, or editing() refuses once loaded)."""
    from ldm_cli import families, loading

    found = loading.kind_of(source, variant)
    if found is None:
        return None
    name, variant = found
    family = families.get("sd1" if name == "sd" else name)  # neither SD1 nor SD2 edits
    label = "SD1/SD2" if name == "sd" else family.label + (f" {variant}" if variant else "")
    hook = _hook(family, variant, f"{loading.source_path(source).name!r} ({label})" if source else "the built-in model")
    if hook.prompt_images is not None and source and not loading.source_path(source).is_dir():
        raise LdmError(f"{hook.label} reads its input images with Qwen2.5-VL's vision tower, which ldm loads from a "
                       f"diffusers folder only (not yet from a text-encoder file); give the {hook.label} folder")
    return hook


def _hook(family, variant: str | None, kind: str) -> Editing:
    hook = family.edit.get(variant)
    if hook is None:
        raise LdmError(f"{kind} cannot edit by instruction; use `ldm img2img` to redraw an image after a prompt, "
                       "or an editing model (FLUX.1 Kontext dev, FLUX.2 klein, Qwen-Image-Edit)")
    return hook


def check_count(hook: Editing, count: int) -> None:
    if count > hook.max_images:
        allowed = "no --reference" if hook.max_images == 1 else f"at most {hook.max_images - 1} --reference images"
        raise LdmError(f"{hook.label} takes {allowed} (got {count - 1})")


def with_defaults(s: Settings, hook: Editing, sizes: list[tuple[int, int]], multiple: int,
                  masked: bool = False) -> Settings:
    """The edit's own defaults under what is asked, and the output size the model picks when none
    is; no strength or mask settings unless masked (they may come from an img2img or inpainted
    --from-png)."""
    if not masked:
        s = dataclasses.replace(s, strength=None, mask_blur=None, only_masked=None, padding=None)
    s = s.merged(**{k: v for k, v in hook.defaults.items() if getattr(s, k) is None})
    if s.width is None and s.height is None:
        width, height = hook.size(sizes, multiple)
        return s.merged(width=width, height=height)
    if s.width is None or s.height is None:  # one side asked: the other follows the input's aspect
        first, given = sizes[0], s.width or s.height
        other = given * (first[1] / first[0] if s.width else first[0] / first[1])
        other = max(multiple, round(other) // multiple * multiple)
        return s.merged(width=s.width or other, height=s.height or other)
    return s


def line_settings(s: Settings, inputs: list[Path], mask: Path | None, hash_of: Callable[[Path], str]) -> Settings:
    """A prompts-file edit line's settings as `ldm edit` completes them, before any model loads:
    the model checked to edit and take this many images (and a mask), every input's path and
    hash recorded, the edit's defaults and the size the model picks (the same again for settings
    already completed)."""
    from ldm_cli import edit_inputs, inpaint, loading

    if s.controlnet:
        raise LdmError("a ControlNet does not work with an edit line; the input images steer the edit")
    hook = check_model(s.model, s.variant)
    if hook is None:
        raise LdmError(f"cannot read {s.model!r} to know how it edits")
    check_count(hook, len(inputs))
    if mask and not hook.masks:
        raise LdmError(f"--mask does not work with {hook.label} yet; edit the whole image, or make an inpaint line")
    s = s.merged(init_image_hash=hash_of(inputs[0]),
                 edit_images=edit_inputs.to_text([edit_inputs.Input(str(p), hash_of(p)) for p in inputs]),
                 edit_mask=mask and edit_inputs.to_text([edit_inputs.Input(str(mask), hash_of(mask))]))
    if mask:  # inpaint's strength and mask blur (the edit sees the whole image)
        s = inpaint.with_defaults(dataclasses.replace(s, only_masked=False, padding=None))
    s = with_defaults(s, hook, [images.image_size(p) for p in inputs], loading.size_multiple(s.model),
                      masked=mask is not None)
    s.validate()
    return s


def input_size(size: tuple[int, int], area: int, multiple: int) -> tuple[int, int]:
    """An input at `area` pixels at its own aspect, each side rounded down to `multiple`."""
    aspect = size[0] / size[1]
    width, height = round(math.sqrt(area * aspect)), round(math.sqrt(area / aspect))
    return max(multiple, width // multiple * multiple), max(multiple, height // multiple * multiple)


def sized_inputs(model, hook: Editing, s: Settings, inputs: list[Image.Image]) -> list[Image.Image]:
    """The inputs at the sizes the VAE reads them (the model's rule, else the output's area)."""
    output, multiple = (s.width, s.height), model.size_multiple
    if hook.input_size is not None:
        return [images.resized(im, *hook.input_size(im.size, output, multiple)) for im in inputs]
    return [images.resized(im, *input_size(im.size, s.width * s.height, multiple)) for im in inputs]


def run(model, group: list[Settings], inputs: list[list[Image.Image]], masks: list[Image.Image] | None,
        on_step: Callable[[], None] | None = None) -> list[Image.Image]:
    """edit, or edit_masked where there are masks."""
    if masks is not None:
        return edit_masked(model, group, inputs, masks, on_step)
    return edit(model, group, inputs, on_step)


def edit(model, group: list[Settings], inputs: list[list[Image.Image]],
         on_step: Callable[[], None] | None = None) -> list[Image.Image]:
    """Images of `group`, image i edited from inputs[i] (the edited image, then its references)."""
    return vae.decode(model, edited_latents(model, group, inputs, on_step))


def edit_masked(model, group: list[Settings], inputs: list[list[Image.Image]], masks: list[Image.Image],
                on_step: Callable[[], None] | None = None) -> list[Image.Image]:
    """An edit restricted to each mask's white, as inpaint restricts a redraw: the edited image,
    at the output size, is both what is noised and the first reference (FluxKontextInpaintPipeline,
    QwenImageEditInpaintPipeline), the other inputs at their VAE sizes."""
    from ldm_cli import inpaint

    hook, s = editing(model), group[0]
    if not hook.masks:
        raise LdmError(f"--mask does not work with {hook.label} yet; edit the whole image, or use `ldm inpaint`")
    for each in inputs:
        check_count(hook, len(each))
    firsts = [images.resized(each[0], s.width, s.height) for each in inputs]
    model.edit_inputs = None if hook.prompt_images is None else {s.edit_images: hook.prompt_images(model, [firsts[0]])}
    if hook.masked_references is not None:  # from the image's latents, as inpainting samples them
        def references(latents: torch.Tensor) -> dict:
            return _on_device(model, hook.masked_references(model, latents))
    else:
        held = _on_device(model, hook.references(
            model, [[first, *sized_inputs(model, hook, s, each[1:])] for first, each in zip(firsts, inputs)], s))

        def references(latents: torch.Tensor) -> dict:
            return held
    return inpaint.inpaint(model, group, [each[0] for each in inputs], masks, on_step, references=references,
                           sampled=hook.masked_references is not None)


def _on_device(model, cond: dict) -> dict:
    return {k: v.to(model.device) for k, v in cond.items()}


def edited_latents(model, group: list[Settings], inputs: list[list[Image.Image]],
                   on_step: Callable[[], None] | None = None) -> torch.Tensor:
    """edit's steps 1 to 6: the denoised latents, before the VAE decodes them."""
    # 1. check inputs
    hook, s = editing(model), group[0]
    pipeline.check_inputs(model, group)
    for each in inputs:
        check_count(hook, len(each))
    # 2. encode the prompts (with the images, for a text encoder that reads them; held by their
    # record, which the prompts of other lines encoded ahead of their turn load theirs from)
    model.edit_inputs = None if hook.prompt_images is None else {s.edit_images: hook.prompt_images(model, inputs[0])}
    positive, negative = pipeline.encode_prompts(model, group)
    # 3. timesteps
    scheduler = pipeline.make_scheduler(model, group)
    # 4. noise
    generators = pipeline.generators_for(group)
    latents = pipeline.initial_noise(model, group, generators) * sampling.init_noise_sigma(scheduler)
    # 5. the input images, as the family conditions on them
    references = _on_device(model, hook.references(model, [sized_inputs(model, hook, s, each) for each in inputs], s))
    # 6. denoise (7. decode: edit above)
    return sampling.denoise(model, scheduler, latents, positive, negative, s.cfg, generators,
                            scheduler.timesteps, on_step=on_step, references=references)
