"""Everything that decides an image, in one object, and its three serial forms.

Flags, a prompts-file line and a PNG's metadata all become a `Settings`; what is not given stays
None until `resolve` fills it from the model's own defaults. A resolved Settings is what gets
written into the PNG (A1111 infotext), printed with --json and appended to a batch manifest.
"""
from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass, fields
from typing import Any

from ldm_cli import infotext, schedulers
from ldm_cli.errors import LdmError

FALLBACK_DEFAULTS = {"steps": 30, "cfg": 7.5, "scheduler": schedulers.DEFAULT_SCHEDULER,
                     "schedule": schedulers.DEFAULT_SCHEDULE}
MAX_SEED = 2**32 - 1


@dataclass
class Settings:
    prompt: str = ""
    negative: str = ""
    steps: int | None = None
    cfg: float | None = None
    seed: int | None = None
    width: int | None = None
    height: int | None = None
    scheduler: str | None = None
    schedule: str | None = None  # a sigma schedule, or "default" for the scheduler's own
    model: str | None = None  # path; None is the built-in model
    model_name: str | None = None
    model_hash: str | None = None
    # img2img / inpaint
    strength: float | None = None
    init_image_hash: str | None = None
    mask_blur: int | None = None
    only_masked: bool | None = None
    padding: int | None = None

    def merged(self, **overrides: Any) -> Settings:
        """A copy with every override that is not None applied."""
        return dataclasses.replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def validate(self) -> None:
        """Checks that need no model, so a bad flag fails before anything loads."""
        if self.steps is not None and self.steps < 1:
            raise LdmError(f"--steps must be at least 1 (got {self.steps})")
        if self.cfg is not None and self.cfg < 0:
            raise LdmError(f"--cfg must be 0 or more (got {self.cfg:g})")
        for side in ("width", "height"):
            value = getattr(self, side)
            if value is not None and (value < 8 or value % 8):
                raise LdmError(f"--{side} must be a positive multiple of 8 (got {value}); try {max(8, round(value / 8) * 8)}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise LdmError(f"--seed must be between 0 and {MAX_SEED} (got {self.seed})")
        if self.strength is not None and not 0 <= self.strength <= 1:
            raise LdmError(f"--strength must be between 0 and 1 (got {self.strength:g})")
        if self.scheduler is not None:
            self.scheduler, label_schedule = schedulers.resolve(self.scheduler, self.schedule)
            self.schedule = label_schedule
            if self.schedule is not None:
                schedulers.check_schedule(self.scheduler, self.schedule)

    def resolve(self, defaults: dict[str, Any], native_size: tuple[int, int]) -> Settings:
        """Fill what was not given: the model's recommended settings, its native size, a random seed."""
        filled = {k: v for k, v in {**FALLBACK_DEFAULTS, **defaults}.items() if getattr(self, k, None) is None}
        if self.scheduler is not None and self.schedule is None:
            filled["schedule"] = "default"  # a scheduler named alone runs its own schedule
        out = self.merged(**filled)
        out.width = out.width or native_size[0]
        out.height = out.height or native_size[1]
        if out.seed is None:
            out.seed = random.randint(0, MAX_SEED)
        out.validate()
        return out

    # -- serial forms ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_infotext(self, version: str) -> str:
        p: dict[str, str] = {"Steps": str(self.steps),
                             "Sampler": schedulers.label(self.scheduler)}
        if (schedule := schedulers.schedule_label(self.schedule)) is not None:
            p["Schedule type"] = schedule
        p["CFG scale"] = infotext.format_number(self.cfg)
        p["Seed"] = str(self.seed)
        p["Size"] = f"{self.width}x{self.height}"
        if self.model_hash:
            p["Model hash"] = self.model_hash
        if self.model_name:
            p["Model"] = self.model_name
        if self.strength is not None:
            p["Denoising strength"] = infotext.format_number(self.strength)
        if self.init_image_hash:
            p["Init image hash"] = self.init_image_hash
        if self.mask_blur is not None:
            p["Mask blur"] = str(self.mask_blur)
        if self.only_masked:
            p["Inpaint area"] = "Only masked"
            p["Masked area padding"] = str(self.padding)
        p["Version"] = f"ldm {version}"
        return infotext.format_infotext(self.prompt, self.negative, p)

    @classmethod
    def from_infotext(cls, text: str) -> Settings:
        prompt, negative, p = infotext.parse_infotext(text)
        s = cls(prompt=prompt, negative=negative)
        try:
            if "Steps" in p:
                s.steps = int(p["Steps"])
            if "CFG scale" in p:
                s.cfg = float(p["CFG scale"])
            if "Seed" in p:
                s.seed = int(p["Seed"])
            if "Size" in p:
                s.width, s.height = (int(v) for v in p["Size"].lower().split("x"))
            if "Denoising strength" in p:
                s.strength = float(p["Denoising strength"])
            if "Mask blur" in p:
                s.mask_blur = int(p["Mask blur"])
            if "Masked area padding" in p:
                s.padding = int(p["Masked area padding"])
        except ValueError as e:
            raise LdmError(f"unreadable generation parameters ({e})") from None
        if "Sampler" in p:
            s.scheduler, s.schedule = schedulers.resolve(p["Sampler"])
            if "Schedule type" in p:
                s.schedule = schedulers.schedule_from_label(p["Schedule type"]) or "default"
            elif s.schedule is None:
                s.schedule = "default"
        s.model_name, s.model_hash = p.get("Model"), p.get("Model hash")
        s.init_image_hash = p.get("Init image hash")
        s.only_masked = True if p.get("Inpaint area") == "Only masked" else None
        return s

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)
