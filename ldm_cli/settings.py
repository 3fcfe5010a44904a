"""Everything that decides an image, in one object, and its three serial forms.

Flags, a prompts-file line and a PNG's metadata all become a `Settings`; what is not given stays
None until `resolve` fills it from the model's own defaults. A resolved Settings is what gets
written into the PNG (A1111 infotext), printed with --json and appended to a batch manifest.
"""
from __future__ import annotations

import functools
import json
import random
import sys
from dataclasses import dataclass, fields
from typing import Any

from ldm_cli import (control_units, edit_inputs, hires_plan, infotext, limits, prompt_syntax, refiner_record,
                     schedulers)
from ldm_cli.errors import LdmError
from ldm_cli.limits import MAX_SEED

FALLBACK_DEFAULTS = {"steps": 30, "cfg": 7.5, "scheduler": schedulers.DEFAULT_SCHEDULER,
                     "schedule": schedulers.DEFAULT_SCHEDULE}
# --rng: where the starting noise comes from (None: cpu, so that records from before it match),
# and A1111's infotext label of each
RNG_LABELS = {"cpu": "CPU", "nv": "NV"}
# A1111's "Masked content": what the repainted part starts from (inpaint.py); its API's inpainting_fill 0-3
MASKED_CONTENT = ("fill", "original", "latent noise", "latent nothing")
KIND_WORDS = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}
# How A1111's infotext names each field; a PNG's bad value is named so ("size" is width and height).
LABELS = {"steps": "Steps", "cfg": "CFG scale", "seed": "Seed", "strength": "Denoising strength",
          "mask_blur": "Mask blur", "padding": "Masked area padding", "size": "Size", "width": "Size",
          "height": "Size", "scheduler": "Sampler", "schedule": "Schedule type", "shift": "Shift",
          "max_sequence_length": "Max sequence length", "guidance": "Distilled CFG Scale",
          "clip_skip": "Clip skip", "rng": "RNG", "prompt": "prompt", "negative": "negative prompt",
          "hires_scale": "Hires upscale", "hires_width": "Hires resize", "hires_height": "Hires resize",
          "hires_steps": "Hires steps", "hires_upscaler": "Hires upscaler", "hires_scheduler": "Hires sampler",
          "hires_schedule": "Hires schedule type", "hires_prompt": "Hires prompt",
          "hires_negative": "Hires negative prompt", "hires_cfg": "Hires CFG Scale", "refiner": "Refiner",
          "refiner_switch_at": "Refiner switch at",
          "eta": "Eta", "s_churn": "Sigma churn", "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax", "s_noise": "Sigma noise"}
# A1111's options of its k-diffusion samplers (schedulers.SchedulerSpec.takes says which takes which)
SAMPLER_OPTIONS = ("eta", "s_churn", "s_tmin", "s_tmax", "s_noise")
INFOTEXT_NUMBERS = ("steps", "cfg", "seed", "strength", "mask_blur", "padding", "shift", "max_sequence_length",
                    "guidance", "clip_skip", *SAMPLER_OPTIONS)
# Settings only some families take (SD3's and FLUX's flow shift and T5 options, FLUX dev's
# distilled guidance): a model that takes one names a default for it (None: computed, as FLUX
# dev's size-dependent shift), and for any other model the setting is dropped, never recorded.
FAMILY_FIELDS = ("shift", "max_sequence_length", "no_t5", "guidance")


def check_seed_room(seed: int, count: int) -> None:
    """Image i of a run uses seed + i: every one of them must be a valid seed."""
    if seed + count - 1 > MAX_SEED:
        raise LdmError(f"--seed {seed} leaves no room for {count} images (image i uses seed + i; "
                       f"the largest seed is {MAX_SEED})")


class BadSetting(LdmError):
    """An unusable value of one setting. It keeps the field ("size" for width and height together)
    so that each source names it as its user wrote it: a flag, a prompts-file key, a PNG's field.
    Its own message names the command-line flag."""

    def __init__(self, field: str, shown: str, rule: str, hint: str = ""):
        self.field, self.shown, self.rule, self.hint = field, shown, rule, hint
        super().__init__(self.named(flag_name(field), hint=hint))

    def named(self, name: str, shown: str | None = None, hint: str = "") -> str:
        return f"{name} {self.rule} (got {self.shown if shown is None else shown}){hint}"


def flag_name(field: str) -> str:
    return ({"size": "the image size", "prompt": "the prompt", "hires_width": "--hires-resize",
             "hires_height": "--hires-resize"}.get(field) or "--" + field.replace("_", "-"))


def shown(value: Any) -> str:
    """A value as an error message shows it: 1e+30, nan, 'many'."""
    return format(value, "g") if isinstance(value, float) else repr(value) if isinstance(value, str) else str(value)


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
    modules: str | None = None  # parts given as separate files (--vae, --text-encoder), ", "-joined
    variant: str | None = None  # --variant: the model's release where its tensors cannot tell (loading/variants.py)
    # img2img / inpaint
    strength: float | None = None
    init_image_hash: str | None = None
    mask_blur: int | None = None
    masked_content: str | None = None  # MASKED_CONTENT; None: original
    only_masked: bool | None = None
    padding: int | None = None
    # flow-matching and T5 models (SD3)
    shift: float | None = None  # timestep shift, overriding the model's
    max_sequence_length: int | None = None  # T5 tokens
    no_t5: bool | None = None  # T5's part of the context is zeros
    guidance: float | None = None  # a guidance-distilled model's guidance input (FLUX dev), not CFG
    # A1111's text encoding and noise
    clip_skip: int | None = None  # SD1: the text encoder's states this many layers from the end (1: the last)
    rng: str | None = None  # the starting noise: "cpu" (torch's CPU generator) or "nv" (CUDA's, as A1111 draws it)
    # A1111's records of the LoRA and embedding files used ("name: 12 hex, ..."), for --from-png
    lora_hashes: str | None = None
    ti_hashes: str | None = None
    # ControlNet units (control_units.py: a JSON list, with their files' paths and hashes)
    controlnet: str | None = None
    # hires fix (hires_plan.py): on with a scale or a resize; `strength` is its denoising strength
    hires_scale: float | None = None
    hires_width: int | None = None  # A1111's hr_resize_x (0: from the height, keeping the shape)
    hires_height: int | None = None
    hires_upscaler: str | None = None
    hires_steps: int | None = None  # 0 or None: the first pass's steps
    hires_scheduler: str | None = None
    hires_schedule: str | None = None
    hires_prompt: str | None = None
    hires_negative: str | None = None
    hires_cfg: float | None = None
    # SDXL's refiner (refiner.py): its path, A1111's record of it, the fraction of the steps the base runs
    refiner: str | None = None
    refiner_name: str | None = None
    refiner_hash: str | None = None
    refiner_switch_at: float | None = None
    # `ldm edit`'s input images and --mask (edit_inputs.py: a JSON list of their paths and hashes)
    edit_images: str | None = None
    edit_mask: str | None = None
    # A1111's sampler options (ancestral and SDE samplers' eta and noise scale; Euler's, Heun's and
    # DPM2's churn between sigmas tmin and tmax, 0 being no limit); kept only where the sampler takes them
    eta: float | None = None
    s_churn: float | None = None
    s_tmin: float | None = None
    s_tmax: float | None = None
    s_noise: float | None = None

    def merged(self, **overrides: Any) -> Settings:
        """A copy with every override that is not None applied."""
        if unknown := overrides.keys() - field_kinds().keys():
            raise TypeError(f"Settings has no field {sorted(unknown)[0]!r}")
        out = object.__new__(Settings)  # dataclasses.replace re-runs __init__: seconds over a 100,000-line batch
        out.__dict__ = {**self.__dict__, **{k: v for k, v in overrides.items() if v is not None}}
        return out

    def validate(self, max_steps: int = limits.MAX_STEPS) -> None:
        """The one check of every setting, whichever way it came (flags, a prompts-file line, a PNG):
        needs no model, so a bad value fails before anything loads. `max_steps` is the model's
        training timesteps once it is loaded. A bad value raises BadSetting."""
        hint = f"; this model was trained on {max_steps} timesteps" if max_steps < limits.MAX_STEPS else ""
        _check_range("steps", self.steps, 1, max_steps, hint)
        for name, (low, high) in limits.RANGES.items():
            _check_range(name, getattr(self, name), low, high)
        self._check_size()
        for name in ("prompt", "negative", "hires_prompt", "hires_negative"):
            _check_prompt(name, getattr(self, name))
        self._check_prompts()
        self.scheduler, self.schedule = schedulers.validated(self.scheduler, self.schedule)
        self._check_hires(max_steps)
        self._check_refiner()
        if self.rng is not None and self.rng.lower() not in RNG_LABELS:
            raise BadSetting("rng", shown(self.rng), f"must be {' or '.join(RNG_LABELS)}")
        self.rng = self.rng and self.rng.lower()
        if self.masked_content is not None:
            wanted = self.masked_content.strip().lower().replace("-", " ").replace("_", " ")
            if wanted not in MASKED_CONTENT:
                raise BadSetting("masked_content", shown(self.masked_content), f"must be one of {', '.join(MASKED_CONTENT)}")
            self.masked_content = wanted
        control_units.from_text(self.controlnet)  # its units' fields typed (their files are checked at load)
        edit_inputs.from_text(self.edit_images)  # paths and hashes (the files are checked by `ldm edit`)
        edit_inputs.from_text(self.edit_mask, "the recorded edit_mask")

    def _check_size(self) -> None:
        for side in ("width", "height"):
            value = getattr(self, side)
            if value is not None and value > limits.MAX_SIDE:
                raise BadSetting(side, str(value), f"must be at most {limits.MAX_SIDE}")
            if value is not None and (value < 8 or value % 8):
                raise BadSetting(side, str(value), "must be a positive multiple of 8", f"; try {max(8, round(value / 8) * 8)}")
        if self.width and self.height and self.width * self.height > (most := limits.max_pixels()):
            raise BadSetting("size", f"{self.width}x{self.height}", f"must be at most {most:,} pixels",
                             f"; set {limits.MAX_PIXELS_ENV} to allow more")

    def _check_hires(self, max_steps: int) -> None:
        """Hires fix's names, its schedule's length, and the size it renders at (within the size
        limits too)."""
        hires_plan.check(self)
        for side in ("hires_width", "hires_height"):
            if (value := getattr(self, side)) and value % 8:
                raise BadSetting(side, str(value), "must be a multiple of 8", f"; try {max(8, round(value / 8) * 8)}")
        if hires_plan.enabled(self) and self.steps and self.strength and hires_plan.steps(self)[0] > max_steps:
            total, kept = hires_plan.steps(self)
            raise LdmError(f"hires fix's {kept} steps at strength {self.strength:g} take a {total}-step schedule; "
                           f"the most is {max_steps}: raise --hires-strength or lower --hires-steps")
        self.hires_scheduler, self.hires_schedule = schedulers.validated(self.hires_scheduler, self.hires_schedule)
        if self.hires_upscaler is not None:
            if not self.hires_upscaler.strip():
                raise BadSetting("hires_upscaler", shown(self.hires_upscaler),
                                 f"must be one of {', '.join(map(repr, hires_plan.UPSCALERS))} or an upscaler model")
            # any other name is a model (ESRGAN and the like), found before the model loads (commands.py)
            self.hires_upscaler = hires_plan.upscaler_name(self.hires_upscaler) or self.hires_upscaler.strip()
        if not (hires_plan.enabled(self) and self.width and self.height):
            return
        width, height = hires_plan.final_size(self)
        if width < 8 or height < 8:
            raise BadSetting("hires_scale", f"{width}x{height}", "must give a hires size of at least 8x8")
        hires = Settings(width=width, height=height)
        try:
            hires._check_size()
        except BadSetting as e:
            raise LdmError(f"the hires fix size {width}x{height} {e.rule}{e.hint}") from None

    def _check_refiner(self) -> None:
        low, high = limits.REFINER_SWITCH
        if self.refiner_switch_at is not None and not low < self.refiner_switch_at < high:
            raise BadSetting("refiner_switch_at", shown(self.refiner_switch_at),
                             f"must be between {low} and {high}, both excluded (the fraction of the steps the base runs)")
        if (self.refiner or self.refiner_name) and hires_plan.enabled(self):
            raise LdmError("--refiner does not combine with hires fix yet; leave one out")

    def _check_prompts(self) -> None:
        """Weights that overflow (inf, or 1.1**1000 from nested brackets) would render black."""
        steps = self.steps or limits.MAX_STEPS  # unresolved: every step a schedule can switch at
        for field, positive in (("prompt", True), ("negative", False)):
            if problem := prompt_syntax.weight_problem(getattr(self, field) or "", steps, positive):
                raise BadSetting(field, problem[1], problem[0])

    def resolve(self, defaults: dict[str, Any], native_size: tuple[int, int],
                max_steps: int = limits.MAX_STEPS) -> Settings:
        """Fill what was not given: the model's recommended settings, its native size, a random seed;
        `max_steps` is the model's training timesteps."""
        filled = {k: v for k, v in {**FALLBACK_DEFAULTS, **defaults}.items() if getattr(self, k, None) is None}
        if self.scheduler is not None and self.schedule is None:
            filled["schedule"] = "default"  # a scheduler named alone runs its own schedule
        out = self.merged(**filled)
        out.width = out.width or native_size[0]
        out.height = out.height or native_size[1]
        if out.seed is None:  # room for a whole run of seed + i, however many images it has
            out.seed = random.randint(0, MAX_SEED - limits.MAX_IMAGES + 1)
        for name in FAMILY_FIELDS:
            if name not in defaults:
                setattr(out, name, None)
        if defaults.get("no_t5"):
            out.no_t5 = True  # a model without T5 weights runs without T5, whatever was recorded
        if hires_plan.enabled(out):
            out = out.merged(strength=out.strength if out.strength is not None else hires_plan.DEFAULT_STRENGTH,
                             hires_upscaler=out.hires_upscaler or hires_plan.DEFAULT_UPSCALER)
        if out.refiner and out.refiner_switch_at is None:
            out.refiner_switch_at = limits.DEFAULT_REFINER_SWITCH
        out.validate(max_steps)
        for name in SAMPLER_OPTIONS:
            if name not in schedulers.SCHEDULERS[out.scheduler].takes:
                setattr(out, name, None)  # neither run nor recorded, as A1111 does
        return out

    # -- serial forms ---------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        # every field is a scalar or a string: asdict's deep copy cost a 100,000-line batch seconds
        return {k: v for k in field_kinds() if (v := getattr(self, k)) is not None}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Settings:
        """Settings from their JSON form; unknown keys are skipped, a value of the wrong type
        raises BadSetting (ranges are validate's)."""
        kinds = field_kinds()
        return cls(**{k: _typed(k, v, kinds[k]) for k, v in data.items() if k in kinds and v is not None})

    def to_infotext(self, version: str) -> str:
        # a resolved Settings has every one of these; `ldm info` also shows a PNG's partial record
        p: dict[str, str] = {} if self.steps is None else {"Steps": str(self.steps)}
        if self.scheduler is not None:
            p["Sampler"] = schedulers.label(self.scheduler)
        if (schedule := schedulers.schedule_label(self.schedule)) is not None:
            p["Schedule type"] = schedule
        elif self.shift is not None or self.max_sequence_length is not None:  # a flow model (SD3, FLUX)
            p["Schedule type"] = "Simple"  # Forge's label of its own spacing
        if self.cfg is not None:
            p["CFG scale"] = infotext.format_number(self.cfg)
        if self.guidance is not None:  # Forge's name and place for FLUX's
            p["Distilled CFG Scale"] = infotext.format_number(self.guidance)
        if self.seed is not None:
            p["Seed"] = str(self.seed)
        if self.width is not None and self.height is not None:
            p["Size"] = f"{self.width}x{self.height}"
        if self.model_hash:
            p["Model hash"] = self.model_hash
        if self.model_name:
            p["Model"] = self.model_name
        if self.variant:
            p["Model variant"] = self.variant
        for i, name in enumerate(self.modules.split(", ") if self.modules else [], start=1):
            p[f"Module {i}"] = name  # Forge's layout
        if self.strength is not None:
            p["Denoising strength"] = infotext.format_number(self.strength)
        if self.init_image_hash:
            p["Init image hash"] = self.init_image_hash
        if self.mask_blur is not None:
            p["Mask blur"] = str(self.mask_blur)
        if self.only_masked:
            p["Inpaint area"] = "Only masked"
            p["Masked area padding"] = str(self.padding)
        if self.clip_skip is not None and self.clip_skip > 1:  # A1111 leaves out its default, 1
            p["Clip skip"] = str(self.clip_skip)
        p.update({LABELS[k]: infotext.format_number(v) for k, v in self.sampler_options().items()})
        p.update(self._text_options())
        p["RNG"] = RNG_LABELS[self.rng or "cpu"]
        p.update(hires_plan.infotext_params(self))
        p.update(refiner_record.infotext_params(self))
        p.update(control_units.infotext_params(self.controlnet))  # sd-webui-controlnet's entries
        if self.lora_hashes:  # A1111's names and place, just before the version
            p["Lora hashes"] = self.lora_hashes
        if self.ti_hashes:
            p["TI hashes"] = self.ti_hashes
        p["Version"] = f"ldm {version}"
        return infotext.format_infotext(self.prompt, self.negative, p)

    def sampler_options(self) -> dict[str, float]:
        """The sampler options given: {"eta": 0.5, ...}."""
        return {k: v for k in SAMPLER_OPTIONS if (v := getattr(self, k)) is not None}

    def _text_options(self) -> dict[str, str]:
        """Forge's `Shift`, and ldm's own T5 options, for the models that take them."""
        p = {}
        if self.shift is not None:
            p["Shift"] = infotext.format_number(self.shift)
        if self.max_sequence_length is not None:
            p["Max sequence length"] = str(self.max_sequence_length)
        if self.no_t5:
            p["No T5"] = "True"
        return p

    def _read_hires(self, p: dict[str, str]) -> None:
        """A1111's rule: hires fix was on when a strength and its upscale, resize or upscaler are
        recorded (an upscaler alone: A1111's default scale, 2)."""
        if "Denoising strength" not in p or not {"Hires upscale", "Hires resize", "Hires upscaler"} & p.keys():
            return
        kinds = field_kinds()
        for name in ("hires_scale", "hires_steps", "hires_cfg"):
            if LABELS[name] in p:
                setattr(self, name, _parsed(name, p[LABELS[name]], kinds[name]))
        if "Hires resize" in p:
            self.hires_width, self.hires_height = parsed_size(p["Hires resize"], "hires_width")
        elif self.hires_scale is None:
            self.hires_scale = hires_plan.DEFAULT_SCALE
        self.hires_upscaler = p.get("Hires upscaler")
        self.hires_prompt, self.hires_negative = p.get("Hires prompt"), p.get("Hires negative prompt")
        if "Hires sampler" in p:
            self.hires_scheduler, self.hires_schedule = schedulers.resolve(p["Hires sampler"])
        if "Hires schedule type" in p:
            self.hires_schedule = schedulers.schedule_from_label(p["Hires schedule type"]) or "default"

    @classmethod
    def from_infotext(cls, text: str) -> Settings:
        prompt, negative, p = infotext.parse_infotext(text)
        s = cls(prompt=prompt, negative=negative)
        kinds = field_kinds()
        for name in INFOTEXT_NUMBERS:
            if LABELS[name] in p:
                setattr(s, name, _parsed(name, p[LABELS[name]], kinds[name]))
        if "Size" in p:
            s.width, s.height = parsed_size(p["Size"])
        if "Sampler" in p:
            s.scheduler, s.schedule = schedulers.resolve(p["Sampler"])
            if "Schedule type" in p:
                s.schedule = schedulers.schedule_from_label(p["Schedule type"]) or "default"
                if s.schedule == "simple" and ("Shift" in p or "Max sequence length" in p):
                    s.schedule = "default"  # a flow model's own spacing, as to_infotext labels it
            elif s.schedule is None:
                s.schedule = "default"
        s.model_name, s.model_hash = p.get("Model"), p.get("Model hash")
        s.variant = p.get("Model variant")
        s.modules = ", ".join(p[f"Module {i}"] for i in range(1, len(p)) if f"Module {i}" in p) or None
        s.init_image_hash = p.get("Init image hash")
        s.lora_hashes, s.ti_hashes = p.get("Lora hashes"), p.get("TI hashes")
        s.only_masked = True if p.get("Inpaint area") == "Only masked" else None
        s.no_t5 = True if p.get("No T5") == "True" else None
        s.rng = _recorded_rng(p)
        s._read_hires(p)
        s._read_refiner(p)
        return s

    def _read_refiner(self, p: dict[str, str]) -> None:
        if "Refiner" in p:
            self.refiner_name, self.refiner_hash = refiner_record.name_and_hash(p["Refiner"])
        if "Refiner switch at" in p:
            self.refiner_switch_at = _parsed("refiner_switch_at", p["Refiner switch at"], float)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)


def _recorded_rng(p: dict[str, str]) -> str | None:
    """A1111 writes an RNG only when it is not its default, noise drawn on the GPU, which `nv`
    reproduces; ldm writes it always, and its images from before it did drew CPU noise."""
    label = p.get("RNG")
    if label is None:
        return None if p.get("Version", "").startswith("ldm") else "nv"
    if label not in ("CPU", "NV", "GPU"):
        raise BadSetting("rng", shown(label), "must be CPU, NV or GPU")
    return None if label == "CPU" else "nv"  # None is CPU noise, ldm's default


@functools.cache  # read for every line of a prompts file
def field_kinds() -> dict[str, type]:
    """Each field's type: str, int, float or bool (a shared table: do not change it)."""
    return {f.name: {"str": str, "int": int, "float": float, "bool": bool}[f.type.split(" ")[0]]
            for f in fields(Settings)}


def _typed(name: str, value: Any, kind: type) -> Any:
    """`value` as a field of type `kind` (a whole number for int, where JSON's true is not one)."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = {float: number, int: number and isinstance(value, int)}.get(kind, isinstance(value, kind))
    if not ok:
        raise BadSetting(name, shown(value), f"must be {KIND_WORDS[kind]}")
    if kind is float and abs(value) > sys.float_info.max:  # a whole number float() cannot take
        raise BadSetting(name, f"a number of {len(str(abs(value)))} digits", "must be a number a float can hold")
    return float(value) if kind is float else value


def _parsed(name: str, text: str, kind: type) -> Any:
    try:
        return kind(text)
    except ValueError:
        raise BadSetting(name, shown(text), f"must be {KIND_WORDS[kind]}") from None


def parsed_size(text: str, field: str = "size") -> tuple[int, int]:
    parts = text.lower().split("x")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        raise BadSetting(field, shown(text), "must be WIDTHxHEIGHT, such as 512x768")
    return int(parts[0]), int(parts[1])


def _check_prompt(name: str, text: str | None) -> None:
    """A prompt's size, in bytes and in 75-token chunks counted at the least (the tokenizer counts
    them exactly once the model is loaded)."""
    if text is None:
        return
    if (size := len(text.encode("utf-8", "surrogatepass"))) > limits.MAX_PROMPT_BYTES:
        raise BadSetting(name, f"{size:,} bytes", f"must be at most {limits.MAX_PROMPT_BYTES:,} bytes")
    if (chunks := prompt_syntax.least_chunks(text)) > limits.MAX_PROMPT_CHUNKS:
        raise BadSetting(name, f"at least {chunks} chunks", f"must fit in {limits.MAX_PROMPT_CHUNKS} chunks of 75 "
                         "tokens (BREAK starts a chunk)")


def _check_range(name: str, value: float | None, low: float, high: float, hint: str = "") -> None:
    if value is not None and not low <= value <= high:  # NaN fails too: it compares false
        raise BadSetting(name, shown(value), f"must be between {low} and {high}", hint)
