"""What A1111's hires fix runs, as data (no torch): the upscaler's kind, the size the first pass is
upscaled to and cropped to, the second pass's settings and step counts (hires.py runs it), and
the infotext fields that record it.

A1111 1.10's rules, learned from its txt2img processing:
- `Hires upscale X` upscales to int(W * X) x int(H * X). `Hires resize WxH` with one side 0 keeps
  the first pass's shape; with both, the image is scaled to cover WxH and the excess cropped
  evenly, in whole latent pixels, after the upscale (the left and top get the smaller half).
- The second pass runs exactly N steps (`Hires steps`, else the first pass's) from the tail of an
  int(N / min(D, 0.999))-step schedule, D being `Denoising strength` (strength_steps.py: img2img
  on the k-diffusion path counts by the same rule).
- Its prompt, negative, sampler and schedule are the first pass's unless given.
"""
from __future__ import annotations

import dataclasses

from ldm_cli import infotext, schedulers, strength_steps
from ldm_cli.errors import LdmError

# A1111's latent upscale modes: torch interpolate's (mode, antialias)
LATENT_MODES = {"Latent": ("bilinear", False), "Latent (antialiased)": ("bilinear", True),
                "Latent (bicubic)": ("bicubic", False), "Latent (bicubic antialiased)": ("bicubic", True),
                "Latent (nearest)": ("nearest", False), "Latent (nearest-exact)": ("nearest-exact", False)}
# upscalers of the decoded image (the pixels then encoded again); "None" is a plain Lanczos resize
IMAGE_UPSCALERS = ("Lanczos", "Nearest", "None")
UPSCALERS = (*LATENT_MODES, *IMAGE_UPSCALERS)
DEFAULT_UPSCALER = "Latent"  # A1111's latent_upscale_default_mode
DEFAULT_STRENGTH = 0.7  # A1111's txt2img slider
DEFAULT_SCALE = 2.0  # A1111's hr_scale, for a record or a prompts-file line that enables hires alone
# the Settings fields that only mean something with hires fix on
FIELDS = ("hires_upscaler", "hires_steps", "hires_scheduler", "hires_schedule", "hires_prompt",
          "hires_negative", "hires_cfg")


def without(s):
    """The settings with hires fix off (img2img and inpainting have none; a PNG may record it)."""
    return dataclasses.replace(s, hires_scale=None, hires_width=None, hires_height=None,
                               **{f: None for f in FIELDS})


def enabled(s) -> bool:
    return s.hires_scale is not None or bool(s.hires_width) or bool(s.hires_height)


def upscaler_name(text: str) -> str | None:
    """The upscaler's own spelling (case ignored); None for a name ldm does not have."""
    return next((name for name in UPSCALERS if name.lower() == text.strip().lower()), None)


def upscaled_size(s) -> tuple[int, int]:
    """The size A1111 upscales the first pass to (before any crop)."""
    w, h = s.width, s.height
    rx, ry = s.hires_width or 0, s.hires_height or 0
    if not rx and not ry:
        return int(w * s.hires_scale), int(h * s.hires_scale)
    if not ry:
        return rx, rx * h // w
    if not rx:
        return ry * w // h, ry
    if w / h < rx / ry:  # cover the target: the side that falls short sets the scale
        return rx, rx * h // w
    return ry * w // h, ry


def final_size(s, multiple: int = 8) -> tuple[int, int]:
    """The second pass's size: the upscaled size rounded down to the model's multiple (A1111's
    latents floor it to 8), or the resize target when both of its sides are given."""
    if s.hires_width and s.hires_height:
        return s.hires_width, s.hires_height
    w, h = upscaled_size(s)
    return w // multiple * multiple, h // multiple * multiple


def crop(s, factor: int, multiple: int = 8) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) latent pixels cut from the upscaled latents, `factor` pixels
    each, so that they are final_size: the excess split with the smaller half left and top."""
    up = [side // multiple * multiple // factor for side in upscaled_size(s)]
    excess = [u - f // factor for u, f in zip(up, final_size(s, multiple))]
    return excess[0] // 2, excess[1] // 2, (excess[0] + 1) // 2, (excess[1] + 1) // 2


def steps(s) -> tuple[int, int]:
    """(the schedule's steps, the steps run from its tail)."""
    return strength_steps.a1111(s.steps, s.strength, s.hires_steps or s.steps)


def second_pass(s, multiple: int = 8):
    """The settings the second pass encodes its prompts and draws its noise with: the hires
    prompt, sampler and CFG where given, the final size, the steps it runs."""
    width, height = final_size(s, multiple)
    return s.merged(prompt=s.hires_prompt or None, negative=s.hires_negative or None, cfg=s.hires_cfg,
                    scheduler=s.hires_scheduler, schedule=schedule(s), width=width, height=height,
                    steps=steps(s)[1])


def schedule(s) -> str | None:
    """The hires schedule: as given, else the first pass's (A1111's "same scheduler"; None) where
    the hires sampler has it, else that sampler's own (A1111's samplers all take every schedule)."""
    if s.hires_schedule is not None or s.hires_scheduler is None:
        return s.hires_schedule
    name = s.hires_scheduler
    if name in schedulers.SCHEDULERS and s.schedule and not schedulers.supports(name, s.schedule):
        return "default"
    return None


def check(s) -> None:
    """Hires settings agree with each other: the fields of the second pass need it on, and it
    needs a strength above 0 (A1111 divides by it)."""
    if not enabled(s):
        if given := [f for f in FIELDS if getattr(s, f) is not None]:
            flag = "--" + given[0].replace("_", "-")
            raise LdmError(f"{flag} applies to hires fix; add --hires-scale X or --hires-resize WxH")
        return
    if s.hires_scale is not None and (s.hires_width or s.hires_height):
        raise LdmError("give --hires-scale or --hires-resize, not both")
    if s.strength is not None and s.strength <= 0:
        raise LdmError(f"--hires-strength must be above 0 for hires fix (got {s.strength:g})")


def infotext_params(s) -> dict[str, str]:
    """A1111's hires fields in its order (the second pass's sampler, prompts and Forge's CFG
    where they differ, then the size, steps and upscaler; its schedule type is written last,
    as A1111 learns it while sampling)."""
    if not enabled(s):
        return {}
    p = {}
    if s.hires_scheduler is not None and s.hires_scheduler != s.scheduler:
        p["Hires sampler"] = schedulers.label(s.hires_scheduler)
    for label, value, first in (("Hires prompt", s.hires_prompt, s.prompt),
                                ("Hires negative prompt", s.hires_negative, s.negative)):
        if value and value != first:
            p[label] = value
    if s.hires_cfg is not None and s.hires_cfg != s.cfg:
        p["Hires CFG Scale"] = infotext.format_number(s.hires_cfg)
    if s.hires_scale is not None:
        p["Hires upscale"] = infotext.format_number(s.hires_scale)
    else:
        p["Hires resize"] = f"{s.hires_width or 0}x{s.hires_height or 0}"
    if s.hires_steps:
        p["Hires steps"] = str(s.hires_steps)
    if s.hires_upscaler is not None:
        p["Hires upscaler"] = s.hires_upscaler
    if (run := schedule(s)) is not None and run != s.schedule:
        p["Hires schedule type"] = schedulers.schedule_label(run) or "Automatic"  # A1111's name of the default
    return p
