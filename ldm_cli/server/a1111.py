"""AUTOMATIC1111's API (1.10): its request bodies -> a render Request, its responses from ldm's
results. Field names and defaults are A1111's; keys ldm does not use are accepted and ignored
(clients send ~45 of them), never an error."""
from __future__ import annotations

import io
import json
import time
from typing import Any

from ldm_cli import __version__, control_units, limits, render, schedulers
from ldm_cli.commands import Upload
from ldm_cli.control_units import ControlUnit
from ldm_cli.errors import LdmError
from ldm_cli.server.renders import Config, Request, b64_png, decoded_b64
from ldm_cli.settings import MASKED_CONTENT, BadSetting, Settings

# A1111's txt2img fields and defaults (StableDiffusionProcessingTxt2Img as its API takes it);
# `parameters` in a response echoes these, never what else a body held (SillyTavern puts
# credentials in its bodies).
TXT2IMG = {
    "prompt": "", "negative_prompt": "", "styles": None, "seed": -1, "subseed": -1, "subseed_strength": 0,
    "seed_resize_from_h": -1, "seed_resize_from_w": -1, "sampler_name": None, "scheduler": None,
    "batch_size": 1, "n_iter": 1, "steps": 50, "cfg_scale": 7.0, "width": 512, "height": 512,
    "restore_faces": None, "tiling": None, "do_not_save_samples": False, "do_not_save_grid": False,
    "eta": None, "denoising_strength": None, "s_min_uncond": None, "s_churn": None, "s_tmax": None,
    "s_tmin": None, "s_noise": None, "override_settings": None, "override_settings_restore_afterwards": True,
    "refiner_checkpoint": None, "refiner_switch_at": None, "disable_extra_networks": False,
    "firstpass_image": None, "comments": None, "enable_hr": False, "firstphase_width": 0,
    "firstphase_height": 0, "hr_scale": 2.0, "hr_upscaler": None, "hr_second_pass_steps": 0,
    "hr_resize_x": 0, "hr_resize_y": 0, "hr_checkpoint_name": None, "hr_sampler_name": None,
    "hr_scheduler": None, "hr_prompt": "", "hr_negative_prompt": "", "force_task_id": None,
    "sampler_index": "Euler", "script_name": None, "script_args": [], "send_images": True,
    "save_images": False, "alwayson_scripts": {}, "infotext": None,
}
IMG2IMG = {
    **{k: v for k, v in TXT2IMG.items() if not k.startswith(("hr_", "firstphase", "enable_hr", "firstpass"))},
    "init_images": None, "resize_mode": 0, "image_cfg_scale": None, "mask": None, "mask_blur_x": 4,
    "mask_blur_y": 4, "mask_blur": None, "mask_round": True, "inpainting_fill": 0, "inpaint_full_res": True,
    "inpaint_full_res_padding": 0, "inpainting_mask_invert": 0, "initial_noise_multiplier": None,
    "latent_mask": None, "include_init_images": False, "denoising_strength": 0.75,
}
# A1111's schedule types (its `scheduler` field) are ldm's (schedulers.SCHEDULE_TYPES) and
# "automatic": the sampler's own choice (SchedulerSpec.k_schedule; uniform: its scheduler's own
# spacing). A sampler only diffusers runs (DDIM, PLMS, UniPC...) takes its own evenly spaced
# timesteps for A1111's evenly spaced types, as SillyTavern's DDIM with "normal" asks.
EVEN = ("uniform", "normal", "simple", "sgm_uniform", "ddim")
SCHEDULE_LABELS = {"automatic": "Automatic", **schedulers.SCHEDULE_TYPES}
# A1111's values of the k-diffusion sampler options that mean "the default" (clients such as
# webuiapi send them on every request): given as they are, they would record and run an option
SAMPLER_OPTION_DEFAULTS = {"eta": 1.0, "s_churn": 0.0, "s_tmin": 0.0, "s_tmax": 0.0, "s_noise": 1.0}
# How A1111's bodies name what a bad value's message names (settings.BadSetting's fields)
FIELD_NAMES = {"cfg": "cfg_scale", "size": "width x height", "negative": "negative_prompt",
               "strength": "denoising_strength", "padding": "inpaint_full_res_padding",
               "clip_skip": "CLIP_stop_at_last_layers", "scheduler": "sampler_name", "schedule": "scheduler"}


def _get(body: dict, key: str, defaults: dict, kind: type) -> Any:
    """body[key] (else A1111's default) as `kind`; a value of another type is one message."""
    value = body.get(key, defaults.get(key))
    if value is None:
        return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise LdmError(f"{key} must be {_kind_word(kind)} (got {json.dumps(value)[:40]})")
    return value


def _kind_word(kind: type) -> str:
    return {int: "a whole number", float: "a number", str: "text", bool: "true or false", dict: "an object",
            list: "a list"}[kind]


def sampler(body: dict, defaults: dict) -> tuple[str, str | None]:
    """(ldm scheduler, schedule) from sampler_name (else sampler_index) and scheduler."""
    label = _get(body, "sampler_name", defaults, str) or _get(body, "sampler_index", defaults, str) or "Euler"
    name, label_schedule = schedulers.resolve(label)
    spec = schedulers.SCHEDULERS[name]
    asked = (_get(body, "scheduler", defaults, str) or "automatic").lower().replace(" ", "_")
    if asked == "automatic":
        return name, label_schedule or (spec.k_schedule if spec.k and spec.k_schedule != "uniform" else None)
    if asked not in schedulers.SCHEDULE_TYPES:
        raise LdmError(f"scheduler {asked!r} is not one ldm runs; choose one of: {', '.join(SCHEDULE_LABELS)}")
    if not spec.any_schedule and asked in EVEN:
        return name, "default"
    return name, asked


def settings(body: dict, defaults: dict, options: dict, config: Config) -> tuple[Settings, str | None]:
    """The Settings a txt2img or img2img body asks for (options: the server's A1111 options with
    the body's override_settings on top), and the VAE file it names."""
    name, schedule = sampler(body, defaults)
    seed = _get(body, "seed", defaults, int)
    clip_skip = options.get("CLIP_stop_at_last_layers", 1)
    if not isinstance(clip_skip, int) or isinstance(clip_skip, bool):
        raise LdmError(f"CLIP_stop_at_last_layers must be a whole number (got {json.dumps(clip_skip)[:40]})")
    s = Settings(prompt=_get(body, "prompt", defaults, str) or "", negative=_get(body, "negative_prompt", defaults, str) or "",
                 steps=_get(body, "steps", defaults, int), cfg=_get(body, "cfg_scale", defaults, float),
                 seed=None if seed is None or seed < 0 else seed,  # -1: random, as A1111
                 width=_get(body, "width", defaults, int), height=_get(body, "height", defaults, int),
                 scheduler=name, schedule=schedule,
                 model=config.checkpoint(options["sd_model_checkpoint"]),
                 clip_skip=clip_skip if clip_skip != 1 else None,  # 1 is the last layer: as the CLI, unrecorded
                 **sampler_options(body, defaults))
    if "enable_hr" in defaults:  # txt2img
        s = s.merged(**hires(body, defaults, config))
    validated(s)
    return s, config.vae(options.get("sd_vae"))


def sampler_options(body: dict, defaults: dict) -> dict:
    """eta, s_churn...: those given and not A1111's defaults."""
    values = {key: _get(body, key, defaults, float) for key in SAMPLER_OPTION_DEFAULTS}
    return {k: v for k, v in values.items() if v is not None and v != SAMPLER_OPTION_DEFAULTS[k]}


def hires(body: dict, defaults: dict, config: Config) -> dict:
    """A txt2img body's hires fix (enable_hr, hr_*, denoising_strength) as Settings fields, read as
    a prompt-file line's A1111 keys are (prompts_file.hires_values); an upscaler model is a listed
    name (never a path a request gives)."""
    from ldm_cli import hires_plan, prompts_file

    if not _get(body, "enable_hr", defaults, bool):
        return {}
    values = {"enable_hr": True}
    for key in (*prompts_file.HIRES_KEYS, "denoising_strength"):
        kind = prompts_file.KEYS[key].kind
        if (value := _get(body, key, defaults, kind)) is not None:
            values[key] = value
    out = {prompts_file.KEYS[k].field: v for k, v in prompts_file.hires_values(values).items()}
    upscaler = out.get("hires_upscaler")
    if upscaler is not None and hires_plan.upscaler_name(upscaler) is None:
        listed = config.listing("upscalers")
        if upscaler not in listed:
            raise LdmError(f"unknown hr_upscaler {upscaler!r}; the server lists: "
                           f"{', '.join([*hires_plan.UPSCALERS, *listed])}")
        out["hires_upscaler"] = listed[upscaler]
    return out


def validated(s: Settings) -> Settings:
    """Settings.validate's check, a bad value named as A1111's body names it."""
    try:
        s.validate()
    except BadSetting as e:
        raise LdmError(e.named(FIELD_NAMES.get(e.field, e.field), hint=e.hint)) from None
    return s


def counts(body: dict, defaults: dict) -> tuple[int, int]:
    """(images in all, images per batch): A1111's batch_size x n_iter."""
    batch, rounds = _get(body, "batch_size", defaults, int), _get(body, "n_iter", defaults, int)
    for key, value in (("batch_size", batch), ("n_iter", rounds)):
        if value < 1:
            raise LdmError(f"{key} must be at least 1 (got {value})")
    if batch > limits.MAX_REQUEST_BATCH:
        raise LdmError(f"batch_size must be at most {limits.MAX_REQUEST_BATCH} (got {batch}); n_iter makes more")
    return batch * rounds, batch


def overridden(body: dict, options: dict) -> dict:
    """The server's options with the body's override_settings on top, for this request only."""
    extra = _get(body, "override_settings", {}, dict) or {}
    return {**options, **extra}


def txt2img(body: dict, options: dict, config: Config) -> Request:
    s, vae = settings(body, TXT2IMG, overridden(body, options), config)
    count, batch = counts(body, TXT2IMG)
    return Request(s, count, batch, vae=vae, controls=controls(body, TXT2IMG, config))


UNIT_DEFAULTS = {"weight": 1.0, "guidance_start": 0.0, "guidance_end": 1.0}  # sd-webui-controlnet's


def controls(body: dict, defaults: dict, config: Config) -> list[tuple[ControlUnit, Upload]]:
    """sd-webui-controlnet's `alwayson_scripts.controlnet.args` as ldm's units: model (a listed
    ControlNet), image, module (none or canny), weight, guidance_start, guidance_end; its other
    fields (resize mode: ldm crops and resizes; control mode: balanced) are ignored."""
    scripts = _get(body, "alwayson_scripts", defaults, dict) or {}
    script = next((v for k, v in scripts.items() if k.lower() == "controlnet"), None)
    args = script.get("args") if isinstance(script, dict) else None
    if script is not None and not isinstance(args, list):
        raise LdmError("alwayson_scripts.controlnet.args must be a list of units")
    out = []
    for i, arg in enumerate(args or []):
        if not isinstance(arg, dict) or not arg.get("enabled", True):
            continue
        what = f"ControlNet unit {i}"
        module = str(arg.get("module") or "none").lower()
        if module not in control_units.PREPROCESSORS:
            raise LdmError(f"{what}: module {module!r} is not one ldm runs; send none (a preprocessed map) or canny")
        image = arg.get("image") or arg.get("input_image")
        image = image.get("image") if isinstance(image, dict) else image  # older versions: {"image", "mask"}
        numbers = {k: _get(arg, k, UNIT_DEFAULTS, float) for k in UNIT_DEFAULTS}
        numbers = {k: UNIT_DEFAULTS[k] if v is None else v for k, v in numbers.items()}
        unit = ControlUnit(config.controlnet(arg.get("model")), "", numbers["weight"], numbers["guidance_start"],
                           numbers["guidance_end"], module)
        out.append((unit, decoded_b64(image, f"{what}'s image")))
    return out


def img2img(body: dict, options: dict, config: Config) -> Request:
    """img2img, or inpainting when a mask comes: denoising strength, mask blur, only masked
    (inpaint_full_res) and its padding, the mask inverted if asked."""
    s, vae = settings(body, IMG2IMG, overridden(body, options), config)
    inits = _get(body, "init_images", IMG2IMG, list)
    if not inits:
        raise LdmError("init_images must hold one image (base64)")
    count, batch = counts(body, IMG2IMG)
    s = s.merged(strength=_get(body, "denoising_strength", IMG2IMG, float))
    # width and height: A1111 resizes the init image to them (resize_mode 0, "just resize")
    init = decoded_b64(inits[0], "init_images[0]")
    mask = body.get("mask")
    if mask is None:
        return Request(validated(s), count, batch, init=init, vae=vae, controls=controls(body, IMG2IMG, config))
    fill = _get(body, "inpainting_fill", IMG2IMG, int)
    if not 0 <= fill < len(MASKED_CONTENT):  # A1111's 0 fill, 1 original, 2 latent noise, 3 latent nothing
        raise LdmError(f"inpainting_fill must be 0 (fill), 1 (original), 2 (latent noise) or 3 (latent nothing); got {fill}")
    blur = _get(body, "mask_blur", IMG2IMG, int)
    s = s.merged(mask_blur=blur if blur is not None else _get(body, "mask_blur_x", IMG2IMG, int),
                 masked_content=MASKED_CONTENT[fill])
    if _get(body, "inpaint_full_res", IMG2IMG, bool):  # its padding means nothing without it (nor is recorded)
        s = s.merged(only_masked=True, padding=_get(body, "inpaint_full_res_padding", IMG2IMG, int))
    validated(s)
    upload = decoded_b64(mask, "mask")
    if _get(body, "inpainting_mask_invert", IMG2IMG, int):
        upload = _inverted(upload)
    return Request(s, count, batch, init=init, mask=upload, vae=vae, controls=controls(body, IMG2IMG, config))


def _inverted(upload: Upload) -> Upload:
    """The mask with kept and repainted swapped (inpainting_mask_invert: 1)."""
    from PIL import ImageOps

    from ldm_cli import images

    buffer = io.BytesIO()
    ImageOps.invert(images.decoded(upload.data, "L", upload.name)).save(buffer, format="PNG")
    return Upload(buffer.getvalue(), upload.name)


def response(results: list[render.Result], body: dict, defaults: dict, request: Request) -> dict:
    """A1111's answer: base64 PNGs (ldm's metadata in them, as saved), the known fields echoed,
    and `info`, a JSON *string* with the seeds and infotexts."""
    params = {k: body.get(k, v) for k, v in defaults.items()}
    params.pop("init_images", None)
    params.pop("mask", None)
    return {"images": [b64_png(r) for r in results], "parameters": params,
            "info": json.dumps(info(results, request))}


def info(results: list[render.Result], request: Request) -> dict:
    s = [r.settings for r in results]
    first = s[0] if s else request.settings
    texts = [render.metadata(x)["parameters"] for x in s]
    return {"prompt": first.prompt, "all_prompts": [x.prompt for x in s], "negative_prompt": first.negative,
            "all_negative_prompts": [x.negative for x in s], "seed": first.seed, "all_seeds": [x.seed for x in s],
            "subseed": first.seed, "all_subseeds": [x.seed for x in s], "subseed_strength": 0,
            "width": first.width, "height": first.height,
            "sampler_name": schedulers.label(first.scheduler) if first.scheduler else None,
            "cfg_scale": first.cfg, "steps": first.steps, "batch_size": request.batch_size,
            "restore_faces": False, "face_restoration_model": None, "sd_model_name": first.model_name,
            "sd_model_hash": first.model_hash, "sd_vae_name": None, "sd_vae_hash": None,
            "seed_resize_from_w": -1, "seed_resize_from_h": -1, "denoising_strength": first.strength,
            "extra_generation_params": {}, "index_of_first_image": 0, "infotexts": texts, "styles": [],
            "job_timestamp": time.strftime("%Y%m%d%H%M%S"), "clip_skip": first.clip_skip or 1,
            "is_using_inpainting_conditioning": False, "version": f"ldm {__version__}"}


def options(current: dict) -> dict:
    """GET options: the keys clients read, with every key posted kept and echoed."""
    return {"samples_format": "png", "sd_vae": "Automatic", "CLIP_stop_at_last_layers": 1, **current}


def posted_options(current: dict, posted: dict, config: Config) -> dict:
    """POST options (Open WebUI posts the whole dict back with one key changed): the checkpoint
    and VAE must be listed ones; unknown keys are kept and echoed, never used as paths."""
    out = {**current, **posted}
    config.checkpoint(out["sd_model_checkpoint"])
    config.vae(out.get("sd_vae"))
    return out


def png_info(body: dict) -> dict:
    """png-info: the image's `parameters` text and its other text chunks."""
    from ldm_cli import images, infotext

    upload = decoded_b64(body.get("image"), "image")
    chunks = images.decoded_text_chunks(upload.data, upload.name)
    text = chunks.get("parameters", "")
    parsed: dict[str, Any] = {}
    if text:
        prompt, negative, params = infotext.parse_infotext(text)
        parsed = {"Prompt": prompt, "Negative prompt": negative, **params}
    return {"info": text, "items": {k: v for k, v in chunks.items() if k != "parameters"}, "parameters": parsed}
