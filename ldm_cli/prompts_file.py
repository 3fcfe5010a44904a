"""Prompts files for `ldm batch`: plain prompt lines, A1111 "prompts from file" lines, and JSONL.

A line is a job: a plain line is the prompt; a line starting with `--` holds options in A1111's
syntax (split like a shell line, values typed as A1111 types them); a `.jsonl` file holds one
JSON object per line with the same keys. Empty lines and lines starting with `#` are skipped.

The whole file is read and checked before any model loads. Every bad line is reported with its
number and the reason. A line that does not parse is an error, never a prompt: A1111 falls back
to rendering the broken line as a prompt, which silently makes the wrong picture.
"""
from __future__ import annotations

import difflib
import hashlib
import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ldm_cli import files, untrusted_json
from ldm_cli.errors import LdmError
from ldm_cli.limits import MAX_IMAGES
from ldm_cli.settings import KIND_WORDS, MAX_SEED, BadSetting, Settings, check_seed_room, flag_name


@dataclass(frozen=True)
class Key:
    kind: type  # str, int, float or bool
    field: str | None  # the Settings field it sets; None for keys that describe the job itself


KEYS: dict[str, Key] = {
    # A1111's keys
    "prompt": Key(str, "prompt"), "negative_prompt": Key(str, "negative"), "steps": Key(int, "steps"),
    "cfg_scale": Key(float, "cfg"), "seed": Key(int, "seed"), "width": Key(int, "width"),
    "height": Key(int, "height"), "sampler_name": Key(str, "scheduler"),
    "batch_size": Key(int, None), "n_iter": Key(int, None),
    # ldm's own
    "scheduler": Key(str, "scheduler"), "schedule": Key(str, "schedule"), "model": Key(str, "model"),
    "variant": Key(str, "variant"),
    "init_image": Key(str, None), "strength": Key(float, "strength"), "mask": Key(str, None),
    "mask_blur": Key(int, "mask_blur"), "only_masked": Key(bool, "only_masked"), "padding": Key(int, "padding"),
    "masked_content": Key(str, "masked_content"),
    # `ldm edit` lines: the edited image is init_image; reference may repeat (JSONL: a list)
    "edit": Key(bool, None), "reference": Key(str, None),
    # flow-matching and T5 models (SD3)
    "shift": Key(float, "shift"), "max_sequence_length": Key(int, "max_sequence_length"), "no_t5": Key(bool, "no_t5"),
    # guidance-distilled models (FLUX dev): ours, and Forge's API name
    "guidance": Key(float, "guidance"), "distilled_cfg_scale": Key(float, "guidance"),
    # A1111's text encoding and noise source
    "clip_skip": Key(int, "clip_skip"), "rng": Key(str, "rng"),
    # hires fix, A1111's API names (and Forge's hr_cfg); hr_* need enable_hr, as in A1111
    "enable_hr": Key(bool, None), "hr_scale": Key(float, "hires_scale"), "hr_upscaler": Key(str, "hires_upscaler"),
    "hr_second_pass_steps": Key(int, "hires_steps"), "denoising_strength": Key(float, "strength"),
    "hr_resize_x": Key(int, "hires_width"), "hr_resize_y": Key(int, "hires_height"),
    "hr_sampler_name": Key(str, "hires_scheduler"), "hr_scheduler": Key(str, "hires_schedule"),
    "hr_prompt": Key(str, "hires_prompt"), "hr_negative_prompt": Key(str, "hires_negative"), "hr_cfg": Key(float, "hires_cfg"),
    # A1111's k-diffusion sampler options
    "eta": Key(float, "eta"), "s_churn": Key(float, "s_churn"), "s_tmin": Key(float, "s_tmin"),
    "s_tmax": Key(float, "s_tmax"), "s_noise": Key(float, "s_noise"),
    # one ControlNet unit (control_units.py), as the command's flags give it
    "controlnet": Key(str, None), "control_image": Key(str, None), "control_scale": Key(float, None),
    "control_start": Key(float, None), "control_end": Key(float, None), "control_preprocess": Key(str, None),
    "control_mode": Key(str, None),
    # SDXL's refiner, A1111's API names
    "refiner_checkpoint": Key(str, "refiner"), "refiner_switch_at": Key(float, "refiner_switch_at"),
}
CONTROL_KEYS = ("controlnet", "control_image", "control_scale", "control_start", "control_end", "control_preprocess",
                "control_mode")
# A1111 accepts these too; ldm has nothing to map them to, so the error names them as such.
A1111_ONLY = {"sd_model", "outpath_samples", "outpath_grids", "prompt_for_display", "styles", "subseed",
              "subseed_strength", "seed_resize_from_h", "seed_resize_from_w", "sampler_index",
              "restore_faces", "tiling", "do_not_save_samples", "do_not_save_grid"}
HIRES_KEYS = ("hr_scale", "hr_upscaler", "hr_second_pass_steps", "hr_resize_x", "hr_resize_y", "hr_sampler_name",
              "hr_scheduler", "hr_prompt", "hr_negative_prompt", "hr_cfg")
# A1111's values that mean "as the first pass" (an API payload carries them when hires is on)
HIRES_SAME = {"hr_sampler_name": "Use same sampler", "hr_scheduler": "Use same scheduler", "hr_prompt": "",
              "hr_negative_prompt": "", "hr_resize_x": 0, "hr_resize_y": 0, "hr_second_pass_steps": 0}
FREE_TEXT = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")  # A1111 joins the unquoted words that follow these
REPEATED = ("reference",)  # given once per value: a list
IMAGE_ONLY = ("strength", "mask", "mask_blur", "only_masked", "padding", "masked_content")
MASK_ONLY = ("mask_blur", "only_masked", "padding")
RANDOM_SEED = -1  # A1111's "random seed"
_MISPLACED_OPTION = re.compile(r"(?:^|\s)--[A-Za-z]")


@dataclass
class Job:
    """One line of the file: the settings of its first image and how many images it makes
    (image i uses seed + i). Paths are absolute; relative ones are read from the file's folder."""
    line: int
    settings: Settings
    count: int = 1
    init_image: Path | None = None
    mask: Path | None = None
    references: tuple[Path, ...] = ()  # an edit's input images after init_image
    edit: bool = False  # `ldm edit`'s run, not img2img's (a line with a reference, or edit true)

    @property
    def mode(self) -> str:
        return "edit" if self.edit else "inpaint" if self.mask else "img2img" if self.init_image else "txt2img"

    @property
    def inputs(self) -> list[Path]:
        """An edit's input images: the edited one, then its references."""
        return [self.init_image, *self.references]


def read(path: Path, defaults: Settings, count: int = 1,
         check: Callable[[Job], Settings] | None = None) -> list[Job]:
    """Every job of the file, with `defaults` under each line's own values; raises one LdmError
    naming every bad line when any line is bad. `check` completes and checks a line's settings
    further (its LoRAs), its errors reported with the line's number as the others."""
    values_of = json_values if path.suffix.lower() == ".jsonl" else line_values
    jobs, errors = [], []
    for number, line in enumerate(read_lines(path), start=1):
        if not line or line.startswith("#"):
            continue
        try:
            job = make_job(number, line, values_of(line), defaults, count, path.parent)
            if check is not None:
                job.settings = check(job)
            jobs.append(job)
        except LdmError as e:
            errors.append(f"{path}:{number}: {e}")
    if errors:
        raise LdmError(f"{len(errors)} bad line{'s' * (len(errors) > 1)} in {path}; nothing was rendered\n" + "\n".join(errors))
    if not jobs:
        raise LdmError(f"{str(path)!r} holds no prompts (every line is empty or a # comment)")
    return jobs


def read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LdmError(f"no such prompts file: {str(path)!r}") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[:e.start].count(b"\n") + 1
        raise LdmError(f"{path}:{line}: not UTF-8 text; save the file as UTF-8") from None
    except OSError as e:
        raise LdmError(f"cannot read {str(path)!r} ({e.strerror or e})") from None
    return [line.strip() for line in text.split("\n")]  # numbered as editors number them


# -- one line -> {key: typed value} ------------------------------------------------------------
def line_values(line: str) -> dict[str, Any]:
    """A plain prompt, or A1111 options: `--prompt "a fox" --steps 20 ...`."""
    if not line.startswith("--"):
        if _MISPLACED_OPTION.search(line):
            raise LdmError('options must start the line, as in --prompt "a fox" --steps 20 '
                           "(a line without options is taken whole as the prompt)")
        return {"prompt": line}
    try:
        words = shlex.split(line)
    except ValueError as e:
        raise LdmError(f"cannot split the line into options ({e}); check its quotes") from None
    values: dict[str, Any] = {}
    i = 0
    while i < len(words):
        name = option_name(words[i])
        n = _value_words(words, i + 1, name)
        value = from_text(name, " ".join(words[i + 1:i + 1 + n]))
        if name in REPEATED:
            values.setdefault(name, []).append(value)
        else:
            _put(values, name, value)
        i += 1 + n
    return values


def option_name(word: str) -> str:
    if not word.startswith("--"):
        raise LdmError(f"unexpected {word!r}: values with spaces need quotes, and every option starts with --")
    return known_key(word[2:], "--")


def _value_words(words: list[str], start: int, name: str) -> int:
    """How many words the value of `name` takes: one, or every word up to the next option for a prompt."""
    end = start
    while end < len(words) and not words[end].startswith("--") and (end == start or name in FREE_TEXT):
        end += 1
    if end == start:
        raise LdmError(f"--{name} needs a value")
    return end - start


def json_values(line: str) -> dict[str, Any]:
    data = untrusted_json.loads(line, "the line")
    if not isinstance(data, dict):
        raise LdmError('each line must be one JSON object, such as {"prompt": "a fox", "steps": 20}')
    values: dict[str, Any] = {}
    for name, value in data.items():
        name = known_key(name, "")
        if value is not None:  # null: not given
            values[name] = checked_json(name, value)
    return values


def known_key(name: str, prefix: str) -> str:
    if name in KEYS:
        return name
    if name in A1111_ONLY:
        raise LdmError(f"{prefix}{name} is an A1111 option ldm does not support; remove it")
    close = [k for k in KEYS if name and k.startswith(name)] or difflib.get_close_matches(name, KEYS, n=1)
    hint = f"; did you mean {prefix}{close[0]}?" if close else f"; known: {', '.join(prefix + k for k in KEYS)}"
    raise LdmError(f"unknown option {prefix}{name}{hint}")


def from_text(name: str, text: str) -> Any:
    kind = KEYS[name].kind
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise LdmError(f"--{name} takes true or false (got {text!r})")
        return text.lower() == "true"
    try:
        value = kind(text)
    except ValueError:
        raise LdmError(f"--{name} takes {KIND_WORDS[kind]} (got {text!r})") from None
    return value  # its range is Settings.validate's, as for every other source


def checked_json(name: str, value: Any) -> Any:
    if name in REPEATED:
        values = value if isinstance(value, list) else [value]
        if not values or not all(isinstance(v, str) for v in values):
            raise LdmError(f'"{name}" takes a path or a list of paths (got {json.dumps(value)[:60]})')
        return values
    kind = KEYS[name].kind
    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
    if kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        raise LdmError(f'"{name}" takes {KIND_WORDS[kind]} (got {json.dumps(value)})')
    return float(value) if kind is float else value


def _put(values: dict[str, Any], name: str, value: Any) -> None:
    if name in values:
        raise LdmError(f"--{name} is given twice")
    values[name] = value


# -- {key: value} -> Job -----------------------------------------------------------------------
def make_job(number: int, line: str, values: dict[str, Any], defaults: Settings, count: int, folder: Path) -> Job:
    check_keys(values)
    values = hires_values(values)
    given = {KEYS[k].field: v for k, v in values.items() if KEYS[k].field}
    for name in ("model", "refiner"):
        if name in given:
            given[name] = str(existing(given[name], folder, "model" if name == "model" else "refiner_checkpoint"))
    settings = defaults.merged(**given, controlnet=line_controlnet(values, folder))
    if given.get("seed") == RANDOM_SEED:
        settings.seed = None
    try:
        settings.validate()
    except BadSetting as e:
        raise LdmError(e.named(line_key(e.field, values, line), hint=e.hint)) from None
    count = image_count(values, count)
    if settings.seed is None:
        settings.seed = derived_seed(number, line)
    else:
        check_seed_room(settings.seed, count)
    init = image_file(values["init_image"], folder, "init_image") if "init_image" in values else None
    mask = image_file(values["mask"], folder, "mask") if "mask" in values else None
    if mask:
        check_mask(mask, init)
    references = tuple(image_file(text, folder, "reference") for text in values.get("reference", ()))
    return Job(number, settings, count, init, mask, references, bool(references) or values.get("edit", False))


def hires_values(values: dict[str, Any]) -> dict[str, Any]:
    """A1111's hires keys as ldm reads them: none with enable_hr false (A1111 ignores them),
    its "same as the first pass" values left out, a nonzero resize before the scale (A1111's
    precedence), and its default scale, 2, when enable_hr names neither."""
    if "enable_hr" not in values:
        return values
    on = values["enable_hr"]
    out = {k: v for k, v in values.items() if k != "enable_hr" and (
        on or (k not in HIRES_KEYS and not (k == "denoising_strength" and "init_image" not in values)))}
    if not on:
        return out
    out = {k: v for k, v in out.items() if HIRES_SAME.get(k, object()) != v}
    if "hr_resize_x" in out or "hr_resize_y" in out:
        out.pop("hr_scale", None)
    elif "hr_scale" not in out:
        out["hr_scale"] = 2.0  # A1111's default
    return out


def line_controlnet(values: dict[str, Any], folder: Path) -> str | None:
    """The line's ControlNet unit as Settings keep it (None: the line names none); its files
    found as the line's other files are."""
    from ldm_cli import control_units

    if not any(k in values for k in CONTROL_KEYS):
        return None
    files = [[str(existing(values[k], folder, k))] if k in values else [] for k in CONTROL_KEYS[:2]]
    options = [[values[k]] if k in values else [] for k in CONTROL_KEYS[2:]]
    return control_units.to_text(control_units.units_from_flags(*files, *options))


def check_keys(values: dict[str, Any]) -> None:
    if "prompt" not in values:
        raise LdmError("no --prompt on this line")
    if "sampler_name" in values and "scheduler" in values:
        raise LdmError("give --sampler_name or --scheduler, not both")
    if "strength" in values and "denoising_strength" in values:
        raise LdmError("give --strength or --denoising_strength, not both")
    if "init_image" not in values and (given := [k for k in IMAGE_ONLY if k in values]):
        raise LdmError(f"--{given[0]} applies to img2img and inpaint lines; add --init_image")
    if "enable_hr" not in values and (given := [k for k in HIRES_KEYS if k in values]):
        raise LdmError(f"--{given[0]} applies to hires fix; add --enable_hr true")
    if "init_image" not in values and "enable_hr" not in values and "denoising_strength" in values:
        raise LdmError("--denoising_strength applies to img2img and inpaint lines or with --enable_hr true")
    if "init_image" in values and values.get("enable_hr"):
        raise LdmError("--enable_hr applies to text-to-image lines, not to a line with --init_image")
    if "init_image" in values and "refiner_checkpoint" in values:
        raise LdmError("--refiner_checkpoint applies to text-to-image lines, not to a line with --init_image")
    if "refiner_switch_at" in values and "refiner_checkpoint" not in values:
        raise LdmError("--refiner_switch_at applies to a refiner; add --refiner_checkpoint")
    if "init_image" not in values and (given := [k for k in ("edit", "reference") if k in values]):
        raise LdmError(f"--{given[0]} makes an edit line; add --init_image, the image to edit")
    if values.get("edit") is False and "reference" in values:
        raise LdmError("--reference makes an edit line; remove --edit false")
    if values.get("edit") or "reference" in values:
        if given := [k for k in ("only_masked", "padding") if k in values]:
            raise LdmError(f"--{given[0]} does not apply to an edit line: the edit sees the whole image")
        if "mask" not in values and (given := [k for k in ("strength", "denoising_strength") if k in values]):
            raise LdmError(f"--{given[0]} applies to an edit line with --mask; an edit without one redraws "
                           "the whole image")
    if "mask" not in values and (given := [k for k in MASK_ONLY if k in values]):
        raise LdmError(f"--{given[0]} applies to inpaint lines; add --mask")
    for key in ("batch_size", "n_iter"):
        if values.get(key, 1) < 1:
            raise LdmError(f"--{key} must be at least 1 (got {values[key]})")
    if (count := values.get("batch_size", 1) * values.get("n_iter", 1)) > MAX_IMAGES:
        raise LdmError(f"--batch_size x --n_iter must be at most {MAX_IMAGES} images (got {count})")


def line_key(field: str, values: dict[str, Any], line: str) -> str:
    """How the line names a Settings field: its own key, else the command's flag (the value came from there)."""
    keys = [k for k in values if KEYS[k].field == field]
    if not keys:
        return flag_name(field)
    return f'"{keys[0]}"' if line.startswith("{") else f"--{keys[0]}"


def image_count(values: dict[str, Any], default: int) -> int:
    """A1111's batch_size x n_iter when the line gives either, else the command's --num-images."""
    if "batch_size" in values or "n_iter" in values:
        return values.get("batch_size", 1) * values.get("n_iter", 1)
    return default


def derived_seed(number: int, line: str) -> int:
    """The seed of a line that names none: drawn from its number and text, so it is the same in
    every run and in every process of a shared run (which is what resuming and sharding need),
    and differs between lines, repeated lines included. Not from the number of images: raising
    -n adds images to a line and keeps those it has. The largest seeds are moved down to leave
    room for MAX_IMAGES images; the rest are the seeds earlier versions drew for one image."""
    digest = hashlib.sha256(f"{number}\n{line}".encode()).digest()
    seed = int.from_bytes(digest[:8], "big") % (MAX_SEED + 1)
    return seed - MAX_IMAGES if seed + MAX_IMAGES - 1 > MAX_SEED else seed


def existing(text: str, folder: Path, name: str) -> Path:
    path = files.user_path(text)
    path = path if path.is_absolute() else folder.absolute() / path
    if not files.exists(path):
        raise LdmError(f"--{name}: no such file or folder {str(path)!r} (relative paths start at the prompts file's folder)")
    files.check_openable(path, folders=True)  # /dev/zero as a model: refused with the line, not once it loads
    return path


def image_file(text: str, folder: Path, name: str) -> Path:
    from ldm_cli import images

    path = existing(text, folder, name)
    try:
        size = images.image_size(path)  # the header only: enough to know it is an image, cheap for long files
    except (OSError, SyntaxError, ValueError) as e:
        raise LdmError(f"--{name}: {str(path)!r} is not a readable image ({e})") from None
    images.check_min_size(size, f"--{name} {str(path)!r}")
    return path


def check_mask(mask: Path, init: Path) -> None:
    """The inpaint command's own check (the image's shape, something white), done up front."""
    from ldm_cli import images, inpaint

    inpaint.check_mask(images.load_image(mask, "L"), images.image_size(init), f"--mask {str(mask)!r}")
