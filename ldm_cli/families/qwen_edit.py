"""Qwen-Image-Edit and Edit Plus (2509, 2511): Qwen-Image's transformer editing by instruction, as
diffusers' QwenImageEditPipeline and QwenImageEditPlusPipeline run it.

The prompt is read by the whole Qwen2.5-VL, vision tower included: the edit template (its system
turn asks to describe the input and how the instruction changes it) holds one image placeholder
(Edit) or "Picture i: " and a placeholder per input (Plus), each placeholder expanded to the
image's merged patches, and the template's first 64 tokens are dropped from the last hidden
layer. The vision tower sees Edit's input at the VAE's size and Plus's inputs at the 384x384 area
it was trained on. The VAE reads each input at about 1 MP at its own aspect (sides multiples of
32); their packed latents follow the noise tokens, each with its own (frame, rows, columns) in
the transformer's img_shapes, and only the noise tokens' output is kept. The output is 1 MP at
the aspect of Edit's input (Plus: its last input's), unless a size is asked.
"""
from __future__ import annotations

import math

import torch
from PIL import Image

from ldm_cli import edit_inputs, images, vae
from ldm_cli.families import flux
from ldm_cli.families.family import Cond, Editing
from ldm_cli.settings import Settings

SYSTEM = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, "
          "background), then explain how the user's text instruction should alter or modify the image. Generate a "
          "new image that meets the user's requirements while maintaining consistency with the original input where "
          "appropriate.<|im_end|>\n<|im_start|>user\n")
PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
TEMPLATES = {"edit": SYSTEM + PLACEHOLDER + "{}<|im_end|>\n<|im_start|>assistant\n",
             "edit-plus": SYSTEM + "{}<|im_end|>\n<|im_start|>assistant\n"}
PICTURE = "Picture {}: " + PLACEHOLDER  # Plus: before the prompt, one per input
IMAGE_PAD = "<|image_pad|>"
DROP = 64  # the template's tokens before the user's text (prompt_template_encode_start_idx)
VAE_AREA = 1024 * 1024  # the pipelines' VAE_IMAGE_SIZE
VISION_AREA = 384 * 384  # Plus's CONDITION_IMAGE_SIZE
MAX_INPUTS = 3  # Qwen's model cards for Edit Plus (2509, 2511): one to three input images


def dimensions(area: int, size: tuple[int, int]) -> tuple[int, int]:
    """`area` pixels at the aspect of `size`, each side rounded to a multiple of 32 (the pipelines'
    calculate_dimensions)."""
    ratio = size[0] / size[1]
    width = math.sqrt(area * ratio)
    return round(width / 32) * 32, round(width / ratio / 32) * 32


def plus(model) -> bool:
    return model.options.get("variant") == "edit-plus"


def size(sizes: list[tuple[int, int]], multiple: int, last: bool = False) -> tuple[int, int]:
    width, height = dimensions(VAE_AREA, sizes[-1] if last else sizes[0])
    return width // multiple * multiple, height // multiple * multiple


def input_size(size: tuple[int, int], output: tuple[int, int], multiple: int) -> tuple[int, int]:
    return dimensions(VAE_AREA, size)


def prompt_images(model, inputs: list[Image.Image]) -> list[Image.Image]:
    """What the vision tower reads: Plus's inputs at the 384x384 area, Edit's at the VAE's size."""
    area = VISION_AREA if plus(model) else VAE_AREA
    return [images.resized(im, *dimensions(area, im.size)) for im in inputs]


def _prompt(model, text: str, grid: torch.Tensor, merge: int) -> str:
    """The templated prompt with each placeholder expanded to its image's merged patches."""
    prefix = "".join(PICTURE.format(i + 1) for i in range(len(grid))) if plus(model) else ""
    parts = TEMPLATES[model.options["variant"]].format(prefix + text).split(IMAGE_PAD)
    counts = [int(g.prod()) // merge**2 for g in grid]
    return parts[0] + "".join(IMAGE_PAD * n + part for n, part in zip(counts, parts[1:]))


def prompt_inputs(model, s: Settings) -> list[Image.Image] | None:
    """The images a prompt is read with: those edit.py holds for the run, else those the settings
    record (a prompts file's other lines, encoded ahead of their turn), found unchanged; None: the
    prompt alone (a model that is not an edit model, or no edit)."""
    held = model.edit_inputs or {}
    if s.edit_images in held:
        return held[s.edit_images]
    if s.edit_images is None or model.options.get("variant") not in TEMPLATES:
        return None
    return prompt_images(model, [images.load_image(p) for p in edit_inputs.found(edit_inputs.from_text(s.edit_images))])


def encode(model, texts: list[str], s: Settings, inputs: list[Image.Image]) -> Cond:
    """Each prompt read with its input images (prompt_inputs), one at a time as the pipelines
    read them; padded with a mask to a common length, as Qwen-Image's prompts travel."""
    tokenizer, processor = model.tokenizers
    encoder = model.text_encoders[0]
    vision = processor(images=inputs, return_tensors="pt")
    pixels, grid = vision["pixel_values"].to(encoder.device, encoder.dtype), vision["image_grid_thw"].to(encoder.device)
    rows = []
    for text in texts:
        ids = tokenizer(_prompt(model, text, grid, processor.merge_size), return_tensors="pt").input_ids.to(encoder.device)
        with torch.inference_mode():
            out = encoder(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                          image_grid_thw=grid, output_hidden_states=True)
        rows.append(out.hidden_states[-1][0, DROP:])
    # every prompt of a run to one length: its images' tokens plus --max-sequence-length of text
    length = max(max(len(r) for r in rows), int(grid.prod(-1).sum()) // processor.merge_size**2 + s.max_sequence_length)
    mask = torch.stack([torch.arange(length, device=rows[0].device) < len(r) for r in rows])
    states = torch.stack([torch.nn.functional.pad(r, (0, 0, 0, length - len(r))) for r in rows])
    return {"encoder_hidden_states": states.to(model.device, model.dtype), "mask": mask.to(model.device)}


def references(model, inputs: list[list[Image.Image]], s: Settings) -> Cond:
    """Each output image's inputs as tokens: their VAE latents' mode, packed, one after another,
    with each input's (frames, rows, columns) for the transformer's img_shapes."""
    tokens, shapes = [], None
    for each in inputs:
        latents = [vae.encode(model, vae.to_tensor([image]), None) for image in each]
        tokens.append(torch.cat([flux.pack(z) for z in latents], dim=1))
        shapes = torch.tensor([[1, z.shape[-2] // flux.PATCH, z.shape[-1] // flux.PATCH] for z in latents])
    return {"reference_tokens": torch.cat(tokens), "reference_shapes": shapes.expand(len(inputs), -1, -1)}


def masked_references(model, latents: torch.Tensor) -> Cond:
    """With --mask: the edited image's latents as inpainting drew them (a VAE sample) are its tokens,
    as QwenImageEditInpaintPipeline conditions on the latents it noises."""
    shape = torch.tensor([[1, latents.shape[-2] // flux.PATCH, latents.shape[-1] // flux.PATCH]])
    return {"reference_tokens": flux.pack(latents), "reference_shapes": shape.expand(len(latents), -1, -1)}


EDIT = Editing("Qwen-Image-Edit", 1, size, references, input_size=input_size, prompt_images=prompt_images,
               masks=True, masked_references=masked_references)
EDIT_PLUS = Editing("Qwen-Image-Edit Plus", MAX_INPUTS, lambda sizes, m: size(sizes, m, last=True), references,
                    input_size=input_size, prompt_images=prompt_images)
