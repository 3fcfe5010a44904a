"""How large a job ldm accepts, in one place (the README's "Limits" lists them).

Every value that sizes the work (steps, pixels, images) is capped before anything loads, so a
typo or a forged PNG cannot tie up the machine for hours or exhaust its memory.
"""
from __future__ import annotations

import math
import os

from ldm_cli.errors import LdmError

MAX_SEED = 2**32 - 1  # A1111's seeds are 32-bit
MAX_STEPS = 1000  # SD's training timesteps; a model trained on fewer is checked again once loaded
MAX_CFG = 100  # A1111's slider stops at 30 and its API takes more; far beyond, guidance only burns out
MAX_SIDE = 16384  # pixels on either side
MAX_PIXELS_ENV = "LDM_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 4096 * 4096  # per image; people with the memory raise it with LDM_MAX_PIXELS
MAX_IMAGES = 10_000  # per run or prompts-file line: each image's settings are listed up front
# Prompts (and negatives): SD3 attends over every CLIP chunk jointly, so cost grows with their
# square; 64 chunks is 4,800 tokens, far past what A1111 users write, and a fraction of a second.
MAX_PROMPT_BYTES = 32 * 1024
MAX_PROMPT_CHUNKS = 64
MAX_JSON_CHARS = 2**20  # a PNG's ldm chunk, a prompts-file or manifest line: real ones are a few KB
MAX_JSON_DEPTH = 20  # ldm's own JSON nests 3 deep; a safetensors header, 3
MAX_TEKKEN_BYTES = 32 * 2**20  # the tekken.json a Mistral file carries (ComfyUI's): Mistral's is about 15 MB
# A1111 bounds none of these; past them an image is only noise, and far past them fp16 overflows
# into NaN (a black image). Either sign: A1111 takes negative weights.
MAX_PROMPT_WEIGHT = 100  # a word's emphasis (nested brackets multiplied) and an AND part's weight
MAX_PROMPT_NESTING = 100  # brackets open at once; (x) nested 49 deep already weighs 1.1**49 > 100
MAX_HIRES_SCALE = 8  # hires fix's upscale: A1111's slider stops at 4; the size limits apply after it
MAX_LORA_WEIGHT = 20  # a LoRA's multiplier: slider LoRAs are used up to about 10
# ldm serve: a request's body (base64 init images and masks: a 4096x4096 PNG is ~30 MB as base64),
# the jobs waiting for a worker (more are answered 503), and images denoised together by one
# request (A1111's batch_size; its slider stops at 8): a client's number never sizes memory unbounded
MAX_REQUEST_BYTES = 64 * 2**20
MAX_QUEUED_JOBS = 32
MAX_REQUEST_BATCH = 16

# Inclusive (lowest, highest) of the numeric settings; steps and size have their own checks.
RANGES = {"cfg": (0, MAX_CFG), "seed": (0, MAX_SEED), "strength": (0, 1),
          "mask_blur": (0, MAX_SIDE), "padding": (0, MAX_SIDE),
          "shift": (0.01, 100), "max_sequence_length": (1, 512),  # 512: T5's tokenizer limit
          "guidance": (0, MAX_CFG), "clip_skip": (1, 12),  # 12: CLIP-L's layers, A1111's slider
          "hires_scale": (1, MAX_HIRES_SCALE), "hires_width": (0, MAX_SIDE), "hires_height": (0, MAX_SIDE),
          "hires_steps": (0, MAX_STEPS), "hires_cfg": (0, MAX_CFG),
          # k-diffusion's sampler options: A1111's sliders, eta and the noise scale with room beyond
          "eta": (0, 10), "s_churn": (0, 100), "s_tmin": (0, 1000), "s_tmax": (0, 1000), "s_noise": (0, 10)}


# `ldm upscale`: its output may be larger than a render (a 4000 px photo at 2x); blending tiles
# holds 16 bytes per output pixel, about 1 GB at the default cap. LDM_MAX_PIXELS raises it too.
MAX_UPSCALE = 16  # --scale
MIN_TILE, MAX_TILE = 32, MAX_SIDE  # --tile, input pixels a side
MAX_UPSCALE_PIXELS = 8192 * 8192

IMAGE_PIXELS_FACTOR = 4  # an image read (init, mask, control, --from-png) may be this much larger: it is resized down


def max_image_pixels() -> int:
    """The most pixels an image ldm reads may have, checked from its header before it is decoded."""
    return IMAGE_PIXELS_FACTOR * max_pixels()


def max_pixels() -> int:
    """The most pixels one image may have: LDM_MAX_PIXELS (16777216 or 4096x4096), else 4096x4096."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_PIXELS
    try:
        value = math.prod(int(part) for part in text.lower().split("x"))
    except ValueError:
        value = 0
    if value < 64:
        raise LdmError(f"{MAX_PIXELS_ENV} must be a number of pixels such as 16777216 or 4096x4096 (got {text!r})")
    return value


def max_upscale_pixels() -> int:
    """The most pixels `ldm upscale` writes in one image: 8192x8192, or LDM_MAX_PIXELS if larger."""
    return max(MAX_UPSCALE_PIXELS, max_pixels())
