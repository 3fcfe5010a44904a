"""The `ldm` command line: parse flags, call `commands`, print results. No torch at import time,
so `ldm --help` answers at once."""
from __future__ import annotations

import atexit
import functools
import gc
import inspect
import json
import os
import sys
import threading
from pathlib import Path
from typing import Annotated, Callable, NoReturn, Optional

import typer
from typer.core import TyperGroup

from ldm_cli import __version__, flag_values, stopping
from ldm_cli.errors import LdmError
from ldm_cli.notes import note

try:  # typer >= 0.29 carries its own copy of click
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover - older typer on top of click
    from click import exceptions as click_errors


class _Stopped(Exception):
    """A KeyboardInterrupt carried past typer, which would turn it into a bare status 130."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


class _OneLineErrors(TyperGroup):
    """Every user error, the CLI's own usage errors included, is one line on stderr and exit 2;
    a stop by Ctrl-C or SIGTERM is one line and exit 128 + the signal. Anything else is a bug
    and shows its own traceback."""

    def main(self, *args, standalone_mode: bool = True, **kwargs):
        try:
            with stopping.sigterm_stops(), flag_values.plain():
                result = super().main(*args, standalone_mode=False, **kwargs)
        except click_errors.NoArgsIsHelpError as e:
            print(e.format_message())
            sys.exit(0)
        except (LdmError, click_errors.ClickException) as e:
            message = e.format_message() if isinstance(e, click_errors.ClickException) else str(e)
            hint = ""
            if isinstance(e, click_errors.UsageError) and e.ctx is not None:
                hint = f" (see '{e.ctx.command_path} --help')"
            print(f"ldm: error: {message}{hint}", file=sys.stderr)
            sys.exit(2)
        except _Stopped as e:
            print(stopping.message(e.signum), file=sys.stderr)
            sys.exit(128 + e.signum)
        sys.exit(result if isinstance(result, int) else 0)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt as e:
            raise _Stopped(stopping.signal_of(e)) from None


app = typer.Typer(cls=_OneLineErrors, add_completion=False, no_args_is_help=True,
                  pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Local text-to-image latent diffusion, offline.")


def _print_version(asked: bool) -> None:
    if asked:
        print(f"ldm {__version__}")
        raise typer.Exit()


@app.callback()
def _options(version: Annotated[bool, typer.Option("--version", callback=_print_version, is_eager=True,
                                                   help="Print the version and exit.")] = False) -> None:
    """Options of `ldm` itself, before the command."""


# Options shared by every rendering command.
Negative = Annotated[Optional[str], typer.Option("--negative", help="What the image should not show.")]
Steps = Annotated[Optional[int], typer.Option(help="Denoising steps [default: the model's, else 30].")]
Cfg = Annotated[Optional[float], typer.Option(help="Classifier-free guidance scale [default: the model's, else 7.5].")]
Seed = Annotated[Optional[int], typer.Option(help="Seed of the first image; image i uses seed + i [default: random].")]
NumImages = Annotated[int, typer.Option("--num-images", "-n", help="How many images.")]
BatchSize = Annotated[int, typer.Option(help="Images denoised together.")]
Width = Annotated[Optional[int], typer.Option("--width", "-W", help="Width, a multiple of 8 (16 for SD3, FLUX, Chroma, Z-Image, FLUX.2 and Qwen-Image) [default: the model's native size].")]
Height = Annotated[Optional[int], typer.Option("--height", "-H", help="Height, a multiple of 8 (16 for SD3, FLUX, Chroma, Z-Image, FLUX.2 and Qwen-Image) [default: the model's native size].")]
Scheduler = Annotated[Optional[str], typer.Option(help="Sampler: a name from `ldm schedulers` or an A1111 label [default: dpmpp_2m].")]
Schedule = Annotated[Optional[str], typer.Option(help="Schedule type: default, or a name or A1111 label from `ldm schedulers` (karras, sgm_uniform, 'Align Your Steps' ...) [default: karras].")]
Shift = Annotated[Optional[float], typer.Option(help="Timestep shift of a flow-matching model (SD3, FLUX, Chroma, Z-Image, FLUX.2, Qwen-Image) [default: the model's: "
                                                     "3 for SD3 and Z-Image, 1 for FLUX schnell, from the image's size for FLUX dev, Chroma and Qwen-Image "
                                                     "(and the steps for FLUX.2)].")]
MaxSequenceLength = Annotated[Optional[int], typer.Option(help="T5 (SD3, FLUX, Chroma), Qwen3 (Z-Image, FLUX.2) or Qwen2.5-VL (Qwen-Image) tokens of the prompt; longer prompts are cut [default: 256 for SD3, 512 for FLUX, Chroma, Z-Image, FLUX.2 and Qwen-Image].")]
Guidance = Annotated[Optional[float], typer.Option(help="Distilled guidance of a guidance-distilled model (FLUX dev), an input of "
                                                        "the model rather than --cfg's second pass [default: 3.5].")]
ClipSkip = Annotated[Optional[int], typer.Option(help="SD1: use the text encoder's states N-1 layers before its last (A1111's Clip skip, 1-12) [default: 1].")]
Eta = Annotated[Optional[float], typer.Option(help="Ancestral and SDE samplers' noise per step (A1111's Eta; 0: none) [default: 1].")]
SChurn = Annotated[Optional[float], typer.Option(help="Euler, Heun, DPM2: noise added back each step (A1111's Sigma churn) [default: 0].")]
STmin = Annotated[Optional[float], typer.Option(help="Churn only at sigmas from this (A1111's Sigma tmin) [default: 0].")]
STmax = Annotated[Optional[float], typer.Option(help="Churn only at sigmas up to this, 0: no limit (A1111's Sigma tmax) [default: 0].")]
SNoise = Annotated[Optional[float], typer.Option(help="Scale of a sampler's added noise (A1111's Sigma noise) [default: 1].")]
Preset = Annotated[Optional[str], typer.Option(help="A few-step model's settings: lightning, hyper (8 steps, cfg 1, euler, sgm_uniform), lcm (6, 1.5, lcm), turbo (4, 1, euler_a, sgm_uniform); flags given override them.")]
Rng = Annotated[Optional[str], typer.Option(help="Starting noise: cpu (torch's CPU generator) or nv (CUDA's, as A1111 draws it by default) [default: cpu].")]
NoT5 = Annotated[Optional[bool], typer.Option("--no-t5", help="Run SD3 without its T5 text encoder (zeros in its place) [default: when the model has no T5].")]
ModelPath = Annotated[Optional[str], typer.Option("--model", "-m", help="A .safetensors checkpoint or a diffusers folder [default: the built-in model].")]
Variant = Annotated[Optional[str], typer.Option("--variant", metavar="NAME", help="The model's release where its tensors "
                                                "cannot tell, over its metadata and name: FLUX.2 klein distilled|base, "
                                                "Z-Image turbo|base, Qwen-Image plain|edit|edit-plus.")]
ModelsDir = Annotated[Optional[str], typer.Option(
    "--models-dir", metavar="DIR", help="A1111's or ComfyUI's models folder: --model NAME and <lora:NAME> are found in it, "
                                        "and --from-png's recorded model not at its recorded path, by name and hash "
                                        "[default: $LDM_MODELS_DIR].")]
Vae = Annotated[Optional[str], typer.Option(help="A VAE file or folder replacing the model's own.")]
TextEncoder = Annotated[Optional[list[str]], typer.Option(
    "--text-encoder", metavar="FILE",
    help="A text encoder file (clip_l, clip_g, t5xxl, qwen_3_4b, qwen_2.5_vl_7b...) for a model without its own; repeatable.")]
Config = Annotated[Optional[str], typer.Option(help="A diffusers-layout folder describing a non-standard checkpoint.")]
Prediction = Annotated[Optional[str], typer.Option(help="Force the prediction type: epsilon or v.")]
AllowPickle = Annotated[bool, typer.Option("--allow-pickle", help="Load pickle checkpoints (.ckpt) with torch.load(weights_only=True).")]
Out = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or mps.")]
Dtype = Annotated[str, typer.Option(help="auto, fp16, bf16 or fp32 [auto: fp16 on GPUs, fp32 on CPU].")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile the denoiser (CUDA graphs on GPUs): the first run of an "
                                       "image size compiles for a minute or more; later runs reuse the code cached in ~/.cache/ldm/compile.")]
Offload = Annotated[str, typer.Option(help="Keep weights in CPU memory: none; model (one component on the GPU at a time); "
                                          "sequential (the denoiser streamed layer by layer: least memory, slowest).")]
Weights = Annotated[Optional[str], typer.Option(help="fp8: keep the denoiser's and T5's weights in float8 on the GPU, "
                                                     "computed in bf16 (half the memory) [default: the model's dtype].")]
VaeTiling = Annotated[bool, typer.Option("--vae-tiling", help="Decode (and encode) in tiles, for large images "
                                                              "[default: on only when a decode would not fit].")]
AsJson = Annotated[bool, typer.Option("--json", help="One JSON object per image on stdout.")]
Quiet = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
FromPng = Annotated[Optional[Path], typer.Option("--from-png", help="Re-run an image's recorded settings; flags override them.")]
Lora = Annotated[Optional[list[str]], typer.Option(
    "--lora", metavar="FILE[:W]", help="A LoRA file applied at weight W (default 1), written into the prompt as "
                                       "<lora:NAME:W>; repeatable.")]
LoraDir = Annotated[Optional[list[str]], typer.Option(
    "--lora-dir", metavar="DIR", help="A folder searched (recursively, by file name) for the prompt's <lora:NAME:W>; "
                                      "repeatable [default: 'loras' beside the model, and $LDM_LORA_DIR].")]
EmbeddingsDir = Annotated[Optional[list[str]], typer.Option(
    "--embeddings-dir", metavar="DIR", help="A folder of textual-inversion embeddings, each used where its file "
                                            "name is a word of the prompt; repeatable [default: 'embeddings' beside "
                                            "the model, and $LDM_EMBEDDINGS_DIR].")]
ControlNet = Annotated[Optional[list[str]], typer.Option(
    "--controlnet", metavar="FILE_OR_DIR", help="A ControlNet (diffusers folder or .safetensors file) steering the image "
                                                "by the matching --control-image; repeatable (their effects add up).")]
ControlImage = Annotated[Optional[list[str]], typer.Option(
    "--control-image", metavar="IMAGE", help="The i-th --controlnet's control image, fitted to the render size by "
                                             "crop and resize. Depth and pose ControlNets take preprocessed maps.")]
ControlScale = Annotated[Optional[list[float]], typer.Option(
    "--control-scale", metavar="W", help="A ControlNet's weight; once for all, or once per --controlnet [default: 1].")]
ControlStart = Annotated[Optional[list[float]], typer.Option(
    "--control-start", metavar="FRACTION", help="Fraction of the steps at which a ControlNet starts acting [default: 0].")]
ControlEnd = Annotated[Optional[list[float]], typer.Option(
    "--control-end", metavar="FRACTION", help="Fraction of the steps after which a ControlNet stops acting [default: 1].")]
ControlPreprocess = Annotated[Optional[list[str]], typer.Option(
    "--control-preprocess", metavar="none|canny", help="none (the image is the control map) or canny (edges of a photo, thresholds "
                                 "100 and 200) [default: none].")]
ControlMode = Annotated[Optional[list[str]], typer.Option(
    "--control-mode", metavar="TYPE", help="A union ControlNet's control type: canny, tile, depth, blur, pose, gray, lq "
                                           "(InstantX's and Shakker's FLUX union order) or its number; once per "
                                           "--controlnet, or once for all.")]

# Options of the commands that start from an image.
InitImage = Annotated[Path, typer.Argument(help="The starting image, at least 8 pixels a side; transparent parts read as white.")]
ImagePrompt = Annotated[Optional[str], typer.Argument(help="What to draw.")]
Strength = Annotated[Optional[float], typer.Option(help="How much to change: 0 keeps the image, 1 paints afresh [default: 0.75 for img2img, 1 for inpaint and outpaint].")]
MaskBlur = Annotated[Optional[int], typer.Option(min=0, help="Blur of the mask's edge in pixels, blending new and kept [default: 4].")]
MaskedContent = Annotated[Optional[str], typer.Option(metavar="KIND", help=(
    "What the repainted part starts from (A1111's Masked content): original, fill (the colours around it), "
    "'latent noise' or 'latent nothing' (in its latents; with --strength below 1) [default: original]."))]
OnlyMasked = Annotated[bool, typer.Option("--only-masked", help="Render only the mask's surroundings, at the model's size, and paste them back.")]
Padding = Annotated[Optional[int], typer.Option(min=0, help="Pixels of context around the mask with --only-masked [default: 32].")]
Margin = Annotated[int, typer.Option(min=0, help="Pixels to add on this side.")]


def run_options(num_images: int, batch_size: int, out: Path, quiet: bool, model_flags: dict,
                network_flags: dict | None = None, models_dir: str | None = None):
    from ldm_cli.commands import RunOptions
    from ldm_cli.loading import LoadOptions
    from ldm_cli.networks.lookup import NetworkOptions

    flags = {k: v for k, v in model_flags.items() if k != "text_encoder"}
    given = {k: list(v or []) for k, v in (network_flags or {}).items()}
    networks = NetworkOptions(given.get("lora", []), given.get("lora_dir", []), given.get("embeddings_dir", []),
                              bool(model_flags.get("allow_pickle")), models_dir)
    return RunOptions(num_images=num_images, batch_size=batch_size, out=out, quiet=quiet,
                      load=LoadOptions(**flags, text_encoders=list(model_flags.get("text_encoder") or [])),
                      networks=networks)


def print_results(results, as_json: bool) -> None:
    for result in results:
        if as_json:
            print(json.dumps(result.to_dict(), ensure_ascii=False), flush=True)
        else:
            print(f"saved {result.path}  (seed {result.settings.seed})", flush=True)


# The options every rendering command takes after its own, declared once.
RENDER_OPTIONS = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind, default=default)
                  for name, kind, default in (
    ("negative", Negative, None), ("steps", Steps, None), ("cfg", Cfg, None), ("seed", Seed, None),
    ("num_images", NumImages, 1), ("batch_size", BatchSize, 1), ("width", Width, None), ("height", Height, None),
    ("scheduler", Scheduler, None), ("schedule", Schedule, None), ("shift", Shift, None),
    ("max_sequence_length", MaxSequenceLength, None), ("no_t5", NoT5, None), ("guidance", Guidance, None),
    ("clip_skip", ClipSkip, None), ("rng", Rng, None), ("eta", Eta, None), ("s_churn", SChurn, None),
    ("s_tmin", STmin, None), ("s_tmax", STmax, None), ("s_noise", SNoise, None), ("preset", Preset, None),
    ("model", ModelPath, None), ("variant", Variant, None), ("models_dir", ModelsDir, None),
    ("vae", Vae, None), ("text_encoder", TextEncoder, None), ("config", Config, None), ("prediction", Prediction, None),
    ("allow_pickle", AllowPickle, False), ("out", Out, Path("outputs")), ("device", Device, "auto"),
    ("dtype", Dtype, "auto"), ("compile", Compile, False), ("offload", Offload, "none"), ("weights", Weights, None),
    ("vae_tiling", VaeTiling, False), ("as_json", AsJson, False), ("quiet", Quiet, False),
    ("from_png", FromPng, None), ("lora", Lora, None), ("lora_dir", LoraDir, None),
    ("embeddings_dir", EmbeddingsDir, None), ("controlnet", ControlNet, None), ("control_image", ControlImage, None),
    ("control_scale", ControlScale, None), ("control_start", ControlStart, None), ("control_end", ControlEnd, None),
    ("control_preprocess", ControlPreprocess, None), ("control_mode", ControlMode, None))]
SETTINGS_FLAGS = ("negative", "steps", "cfg", "seed", "width", "height", "scheduler", "schedule", "shift",
                  "max_sequence_length", "no_t5", "guidance", "clip_skip", "rng", "eta", "s_churn", "s_tmin", "s_tmax",
                  "s_noise", "model", "variant")
LOAD_FLAGS = ("vae", "text_encoder", "config", "prediction", "allow_pickle", "device", "dtype", "compile", "offload",
              "weights", "vae_tiling")
NETWORK_FLAGS = ("lora", "lora_dir", "embeddings_dir")
CONTROL_FLAGS = ("controlnet", "control_image", "control_scale", "control_start", "control_end", "control_preprocess",
                 "control_mode")


class RenderFlags(dict):
    """The parsed RENDER_OPTIONS of one command."""

    def settings(self, refines: bool = False, **own):
        """The settings of --from-png, if given, with every flag given on top (its refiner only
        for a command that `refines`)."""
        from ldm_cli import commands
        from ldm_cli.settings import Settings

        flags = Settings(**{k: self[k] for k in SETTINGS_FLAGS}, **own, controlnet=controlnet_text(self))
        from ldm_cli import presets

        return commands.base_settings(presets.applied(flags, self["preset"]), self["from_png"], self["models_dir"],
                                      refines)

    def run_options(self):
        return run_options(self["num_images"], self["batch_size"], self["out"], self["quiet"],
                           {k: self[k] for k in LOAD_FLAGS}, {k: self[k] for k in NETWORK_FLAGS}, self["models_dir"])

    def print(self, results) -> None:
        print_results(results, self["as_json"])


def controlnet_text(flags: dict) -> str | None:
    """The ControlNet units given as flags, as Settings keep them (None: none given)."""
    from ldm_cli import control_units

    return control_units.to_text(control_units.units_from_flags(*(list(flags[k] or []) for k in CONTROL_FLAGS)))


def renders(command: Callable[..., None]) -> Callable[..., None]:
    """Add RENDER_OPTIONS to a command's own parameters; it gets them as `flags`."""
    own = [p for p in inspect.signature(command, eval_str=True).parameters.values() if p.name != "flags"]

    @functools.wraps(command)
    def with_flags(**kwargs) -> None:
        flags = RenderFlags({p.name: kwargs.pop(p.name) for p in RENDER_OPTIONS})
        command(**kwargs, flags=flags)

    with_flags.__signature__ = inspect.Signature(own + RENDER_OPTIONS)
    return with_flags


# Hires fix (generate only): A1111's second pass at a larger size.
HiresScale = Annotated[Optional[float], typer.Option(help="Hires fix: render, upscale by X, denoise again (A1111's Hires upscale).")]
HiresResize = Annotated[Optional[str], typer.Option(metavar="WxH", help="Hires fix to this size instead of a scale: cover it, crop the rest; "
                                                                        "0 for one side keeps the shape.")]
HiresUpscaler = Annotated[Optional[str], typer.Option(help="Latent, Latent (antialiased), Latent (bicubic), Latent (bicubic antialiased), "
                                                           "Latent (nearest), Latent (nearest-exact), Lanczos, Nearest, None, or an upscaler "
                                                           "model's file or name (ldm upscale --help) [default: Latent].")]
HiresSteps = Annotated[Optional[int], typer.Option(help="Steps the second pass runs [default: --steps].")]
HiresStrength = Annotated[Optional[float], typer.Option(help="The second pass's denoising strength (A1111's Denoising strength) [default: 0.7].")]
HiresScheduler = Annotated[Optional[str], typer.Option(help="The second pass's sampler [default: --scheduler's].")]
HiresSchedule = Annotated[Optional[str], typer.Option(help="The second pass's sigma schedule [default: --schedule's].")]
HiresPrompt = Annotated[Optional[str], typer.Option(help="The second pass's prompt [default: the prompt].")]
HiresNegative = Annotated[Optional[str], typer.Option(help="The second pass's negative prompt [default: --negative].")]
HiresCfg = Annotated[Optional[float], typer.Option(help="The second pass's CFG scale (Forge's Hires CFG Scale) [default: --cfg].")]
# SDXL's refiner (generate only): A1111's Refiner and Refiner switch at.
Refiner = Annotated[Optional[str], typer.Option(help="An SDXL refiner (its diffusers folder) that finishes each image's last steps.")]
RefinerSwitchAt = Annotated[Optional[float], typer.Option(help="The fraction of the steps the base runs before the refiner takes over [default: 0.8].")]


@app.command()
@renders
def generate(prompt: Annotated[Optional[str], typer.Argument(help="What to draw.")] = None,
             hires_scale: HiresScale = None, hires_resize: HiresResize = None, hires_upscaler: HiresUpscaler = None,
             hires_steps: HiresSteps = None, hires_strength: HiresStrength = None, hires_scheduler: HiresScheduler = None,
             hires_schedule: HiresSchedule = None, hires_prompt: HiresPrompt = None, hires_negative: HiresNegative = None,
             hires_cfg: HiresCfg = None, refiner: Refiner = None, refiner_switch_at: RefinerSwitchAt = None, *,
             flags: RenderFlags) -> None:
    """Turn a prompt into PNGs."""
    from ldm_cli import commands, hires_plan
    from ldm_cli.settings import parsed_size

    width, height = parsed_size(hires_resize, "hires_width") if hires_resize is not None else (None, None)
    settings = flags.settings(True, prompt=prompt, hires_scale=hires_scale, hires_width=width, hires_height=height,
                              hires_upscaler=hires_upscaler, hires_steps=hires_steps, strength=hires_strength,
                              hires_scheduler=hires_scheduler, hires_schedule=hires_schedule,
                              hires_prompt=hires_prompt, hires_negative=hires_negative, hires_cfg=hires_cfg,
                              refiner=refiner, refiner_switch_at=refiner_switch_at)
    if hires_strength is not None and not hires_plan.enabled(settings):
        raise LdmError("--hires-strength applies to hires fix; add --hires-scale X or --hires-resize WxH")
    if settings.refiner_switch_at is not None and not settings.refiner:
        raise LdmError("--refiner-switch-at applies to a refiner; add --refiner PATH")
    flags.print(commands.generate(settings, flags.run_options()))


@app.command()
def info(
    path: Annotated[Path, typer.Argument(help="A PNG made by ldm or A1111, or a checkpoint.")],
    as_json: AsJson = False, config: Config = None, allow_pickle: AllowPickle = False, variant: Variant = None,
) -> None:
    """Show how an image was made, or what a checkpoint holds."""
    from ldm_cli import commands

    if path.suffix.lower() == ".png":
        data = commands.png_info(path)
        print(json.dumps(data, ensure_ascii=False, indent=2) if as_json else data["parameters"])
        if "problem" in data:
            note(data["problem"])
        return
    data = commands.checkpoint_info(path, config, allow_pickle, variant)
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        width = max(map(len, data))
        for key, value in data.items():
            value = [f"{k} {v}" for k, v in value.items()] if isinstance(value, dict) else value  # storage
            shown = ", ".join(value) or "-" if isinstance(value, list) else value
            print(f"{key.replace('_', ' '):<{width}}  {shown}")


@app.command(name="schedulers")
def list_schedulers() -> None:
    """List every sampler (name, A1111 label), the schedule types each takes, and which models take which."""
    from ldm_cli import schedulers

    print("noise-prediction models (SD 1.x, SD 2.x, SDXL):")
    print(f"{'name':<19}{'A1111 label':<19}schedules")
    for spec in schedulers.SCHEDULERS.values():
        runs = ", ".join(["default", *spec.schedules])
        if spec.k is not None and spec.cls is not None:
            runs += " (diffusers'); the other types (k-diffusion's)"
        elif spec.cfg_pp:
            runs = "default (A1111's DDIM timesteps)"
        elif spec.k is not None:
            runs = f"every schedule type (k-diffusion's; default: {spec.k_schedule})"
        print(f"{spec.name:<19}{spec.label:<19}{runs}")
    print("\nschedule types: " + ", ".join(f"{name} ({label})" for name, label in schedulers.SCHEDULE_TYPES.items()))
    print("\nflow-matching models (SD3, FLUX, Chroma, Z-Image, FLUX.2, Qwen-Image) take:")
    for name in schedulers.flow_names():
        print(f"{name:<19}{schedulers.label(name):<19}{_flow_schedules(name)}")
    print("every schedule type but align_your_steps (its tables are SD 1.x's and SDXL's)")


def _flow_schedules(name: str) -> str:
    """What `ldm schedulers` says a flow-matching model runs `name` with."""
    from ldm_cli import schedulers

    ours = schedulers.FLOW_SCHEDULERS.get(name)
    if ours is None:
        return "every schedule type (k-diffusion's; default: the model's own, Simple)"
    if ours.shift_only:
        return "default (Simple: diffusers', k-diffusion's on FLUX-spaced models); the other types (k-diffusion's)"
    runs = ", ".join(["default (Simple)", *ours.schedules]) + " (diffusers')"
    return runs + ("; the other types (k-diffusion's)" if schedulers.SCHEDULERS[name].k else "")


@app.command()
@renders
def img2img(image: InitImage, prompt: ImagePrompt = None, strength: Strength = None, *,
            flags: RenderFlags) -> None:
    """Redraw an image after a prompt [size: the image's own, rounded down to multiples of 8]."""
    from ldm_cli import commands

    settings = flags.settings(prompt=prompt, strength=strength)
    flags.print(commands.img2img(settings, image, flags.run_options()))


@app.command()
@renders
def inpaint(
    image: InitImage,
    mask: Annotated[Path, typer.Argument(help="White is repainted, black is kept; any size of the image's shape. A mask with transparency: opaque is repainted.")],
    prompt: ImagePrompt = None, strength: Strength = None, mask_blur: MaskBlur = None,
    only_masked: OnlyMasked = False, padding: Padding = None, masked_content: MaskedContent = None, *,
    flags: RenderFlags,
) -> None:
    """Repaint the masked part of an image; outside the mask its pixels are kept exactly."""
    from ldm_cli import commands

    settings = flags.settings(prompt=prompt, strength=strength, mask_blur=mask_blur,
                              only_masked=only_masked or None, padding=padding, masked_content=masked_content)
    flags.print(commands.inpaint(settings, image, mask, flags.run_options()))


@app.command()
@renders
def outpaint(
    image: InitImage, prompt: ImagePrompt = None,
    left: Margin = 0, right: Margin = 0, top: Margin = 0, bottom: Margin = 0,
    strength: Strength = None, mask_blur: MaskBlur = None, only_masked: OnlyMasked = False,
    padding: Padding = None, masked_content: MaskedContent = None, *, flags: RenderFlags,
) -> None:
    """Extend an image's canvas by the margins and paint the new border.

    The picture is never cropped or stretched: the margins grow (with a note) until each side
    of the canvas is a multiple of 8, as the model needs, and --width or --height scales the
    whole canvas, the other side following its shape (a size of another shape is refused)."""
    from ldm_cli import commands

    settings = flags.settings(prompt=prompt, strength=strength, mask_blur=mask_blur,
                              only_masked=only_masked or None, padding=padding, masked_content=masked_content)
    flags.print(commands.outpaint(settings, image, (left, top, right, bottom), flags.run_options()))


# \b keeps click from rewrapping a paragraph: the commands stay as typed
EDIT_EXAMPLES = """\b
Examples, one per kind of model:
\b
  FLUX.1 Kontext dev (one image; guidance 2.5; its trained size nearest the image's aspect):
    ldm edit photo.png "make it night, keep the car" -m flux1-kontext-dev.safetensors \\
      --vae ae.safetensors --text-encoder clip_l.safetensors --text-encoder t5xxl_fp16.safetensors
\b
  FLUX.2 klein (up to 4 images; the first image's size):
    ldm edit room.png "put the chair from image 2 by the window" --reference chair.png -m flux-2-klein-4b
\b
  Qwen-Image-Edit Plus (2509, 2511: up to 3 images; 1 MP at the last image's aspect):
    ldm edit shop.png "the woman in picture 2 behind the counter" --reference woman.png -m Qwen-Image-Edit-2509
\b
  Models that cannot edit (SD1, SDXL, SD3, FLUX.1 schnell, Z-Image, Chroma, Qwen-Image): use img2img."""


@app.command(epilog=EDIT_EXAMPLES)
@renders
def edit(
    image: Annotated[Optional[Path], typer.Argument(
        help="The image to change, at least 8 pixels a side [default: with --from-png, the images it was made from].")] = None,
    prompt: Annotated[Optional[str], typer.Argument(help="What to change, said as an instruction.")] = None,
    reference: Annotated[Optional[list[Path]], typer.Option(
        "--reference", metavar="IMAGE", help="Another input image, for models that take several; repeatable.")] = None,
    mask: Annotated[Optional[Path], typer.Option(
        help="Edit only where this mask is white, as inpaint does (FLUX.1 Kontext, FLUX.2 klein, Qwen-Image-Edit).")] = None,
    strength: Strength = None, mask_blur: MaskBlur = None, *, flags: RenderFlags,
) -> None:
    """Change an image as a prompt says, with reference images for models that take them
    [size: the model's pick for the image's aspect, printed].

    The model decides how: a FLUX.1 dev-shaped model runs as FLUX.1 Kontext, FLUX.2 klein takes
    its images natively (their tokens beside the noise's), Qwen-Image-Edit also reads them with
    its vision-language encoder. The edit is drawn from fresh noise, steered by the images."""
    from ldm_cli import commands

    if mask is None and (strength is not None or mask_blur is not None):
        raise LdmError("--strength and --mask-blur go with --mask; an edit without one redraws the whole image")
    settings = flags.settings(prompt=prompt, strength=strength, mask_blur=mask_blur)
    flags.print(commands.edit(settings, image, list(reference or []), flags.run_options(), mask))


@app.command()
def batch(
    file: Annotated[Path, typer.Argument(help="Prompts: a prompt per line, or A1111 option lines (--prompt \"...\" --steps 20 ...), or .jsonl.")],
    negative: Negative = None, steps: Steps = None, cfg: Cfg = None,
    seed: Annotated[Optional[int], typer.Option(help="Seed of lines without --seed [default: one drawn from the line's number and text].")] = None,
    num_images: Annotated[int, typer.Option("--num-images", "-n", help="Images per line, for lines that give no --batch_size or --n_iter of their own.")] = 1,
    batch_size: Annotated[int, typer.Option(help="Images denoised together, from any lines. Not a line's "
                                                "--batch_size, which is A1111's: images per line.")] = 1,
    width: Width = None, height: Height = None,
    scheduler: Scheduler = None, schedule: Schedule = None, shift: Shift = None,
    max_sequence_length: MaxSequenceLength = None, no_t5: NoT5 = None, guidance: Guidance = None,
    clip_skip: ClipSkip = None, rng: Rng = None, preset: Preset = None, model: ModelPath = None,
    variant: Variant = None, vae: Vae = None, text_encoder: TextEncoder = None, config: Config = None, prediction: Prediction = None,
    allow_pickle: AllowPickle = False, lora: Lora = None, lora_dir: LoraDir = None, embeddings_dir: EmbeddingsDir = None,
    out: Annotated[Optional[Path], typer.Option("--out", "-o", help="Output folder, with the manifest [default: outputs/<FILE's name>].")] = None,
    device: Device = "auto", dtype: Dtype = "auto", compile: Compile = False, offload: Offload = "none",
    weights: Weights = None, vae_tiling: VaeTiling = False, controlnet: ControlNet = None,
    control_image: ControlImage = None, control_scale: ControlScale = None, control_start: ControlStart = None,
    control_end: ControlEnd = None, control_preprocess: ControlPreprocess = None, control_mode: ControlMode = None,
    grid: Annotated[bool, typer.Option("--grid", help="Also write a contact sheet per line of several images, in OUT/grids.")] = False,
    as_json: AsJson = False, quiet: Quiet = False,
) -> None:
    """Render a prompts file: each model loaded once, shared batches, resumable by rerunning;
    `accelerate launch -m ldm_cli batch ...` shares the work among processes. --controlnet units
    apply to the lines that name none of their own."""
    from ldm_cli import commands, presets
    from ldm_cli.settings import Settings

    defaults = Settings(negative=negative or "", steps=steps, cfg=cfg, seed=seed, width=width, height=height,
                        scheduler=scheduler, schedule=schedule, shift=shift, max_sequence_length=max_sequence_length,
                        no_t5=no_t5, guidance=guidance, clip_skip=clip_skip, rng=rng, model=model, variant=variant,
                        controlnet=controlnet_text(dict(
                            controlnet=controlnet, control_image=control_image, control_scale=control_scale,
                            control_start=control_start, control_end=control_end, control_preprocess=control_preprocess,
                            control_mode=control_mode)))
    defaults = presets.applied(defaults, preset)
    options = run_options(num_images, batch_size, out or Path("outputs") / file.stem, quiet, dict(
        vae=vae, text_encoder=text_encoder, config=config, prediction=prediction, allow_pickle=allow_pickle,
        device=device, dtype=dtype, compile=compile, offload=offload, weights=weights, vae_tiling=vae_tiling), dict(lora=lora, lora_dir=lora_dir, embeddings_dir=embeddings_dir))
    print_results(commands.batch(file, defaults, options, grid), as_json)


@app.command()
def upscale(
    image: Annotated[list[Path], typer.Argument(help="Images to upscale (PNG, JPEG, WebP...); transparent parts read as white.")],
    upscaler: Annotated[str, typer.Option(
        "--upscaler", "-u", metavar="FILE|NAME", help="A model file (.safetensors, .pth, .pt: ESRGAN, RealESRGAN, SwinIR, "
        "DAT, HAT...), a model's name in the models folder's ESRGAN/ or upscale_models/, or Lanczos or Nearest.")],
    scale: Annotated[Optional[float], typer.Option(help="Times larger, 1 to 16; a model runs again while the image is "
                                                         "smaller, then Lanczos resizes to the size [default: the model's own].")] = None,
    resize: Annotated[Optional[str], typer.Option(metavar="WxH", help="Upscale to cover WxH, then crop its middle "
                                                                      "(A1111's 'Scale to' with 'Crop to fit').")] = None,
    tile: Annotated[int, typer.Option(help="Tile side in input pixels; halved on out-of-memory.")] = 512,
    tile_overlap: Annotated[int, typer.Option(help="Pixels neighbouring tiles share, blended (at most half a tile).")] = 32,
    out: Out = Path("outputs"),
    models_dir: Annotated[Optional[str], typer.Option(
        "--models-dir", metavar="DIR", help="Where --upscaler NAME is found (A1111's models/ESRGAN, ComfyUI's "
                                            "models/upscale_models) [default: $LDM_MODELS_DIR].")] = None,
    device: Device = "auto", as_json: AsJson = False, quiet: Quiet = False,
) -> None:
    """Upscale images with an upscaler model or a resize, in tiles; each PNG keeps its source's
    parameters and adds A1111's `Postprocess upscale by` and `Postprocess upscaler`."""
    from ldm_cli import commands

    options = commands.UpscaleOptions(upscaler, scale, resize, tile, tile_overlap, out, models_dir, device, quiet)
    for result in commands.upscale(image, options):
        print(json.dumps(result.to_dict(), ensure_ascii=False) if as_json else f"saved {result.path}", flush=True)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to listen on; another than loopback needs --api-key or --api-auth.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free one).")] = 7860,
    model: ModelPath = None,
    models_dir: Annotated[Optional[str], typer.Option(
        "--models-dir", metavar="DIR", help="A1111's models/ or ComfyUI's models folder: the checkpoints, VAEs, LoRAs "
                                            "and embeddings requests may name [default: $LDM_MODELS_DIR].")] = None,
    api_key: Annotated[Optional[str], typer.Option("--api-key", metavar="KEY", help="Require `Authorization: Bearer KEY` on every route.")] = None,
    api_auth: Annotated[Optional[str], typer.Option("--api-auth", metavar="USER:PASS", help="Require HTTP Basic USER:PASS on A1111's routes (Bearer --api-key works too).")] = None,
    cors: Annotated[Optional[list[str]], typer.Option("--cors", metavar="ORIGIN", help="Let pages of ORIGIN (https://host:port) call it from a browser; repeatable [default: none].")] = None,
    queue: Annotated[int, typer.Option(help="Jobs that may wait for a worker; more are answered 503 with Retry-After.")] = 32,
    vae: Vae = None, text_encoder: TextEncoder = None, config: Config = None, prediction: Prediction = None,
    allow_pickle: AllowPickle = False,
    device: Annotated[str, typer.Option(help="auto (every GPU, one worker and model copy each), cpu, cuda, mps, or a list: cuda:0,cuda:1.")] = "auto",
    dtype: Dtype = "auto", compile: Compile = False, offload: Offload = "none", weights: Weights = None,
    vae_tiling: VaeTiling = False,
) -> None:
    """Serve A1111's and OpenAI's image APIs over HTTP, the model kept loaded between requests."""
    from ldm_cli.loading import LoadOptions
    from ldm_cli.server import main, renders  # fastapi and uvicorn load here, for this command only

    load = LoadOptions(vae=vae, config=config, prediction=prediction, allow_pickle=allow_pickle, dtype=dtype,
                       text_encoders=list(text_encoder or []), compile=compile, offload=offload, weights=weights,
                       vae_tiling=vae_tiling)
    main.serve(renders.Config(model, models_dir, load),
               main.ServeOptions(host, port, api_key, api_auth, tuple(cors or ()), queue), device)


def main() -> NoReturn:
    """The `ldm` program: the command, then the end of the process, at once. Python's own teardown
    frees every object of every module torch, diffusers and transformers loaded, one at a time
    (0.8-0.9 s after a built-in render on this machine, longer than the render): by then every
    file is written and closed, so it is skipped; exit handlers and non-daemon threads still run.
    In-process callers (tests) call `app()`, which ends in SystemExit as before."""
    try:
        app()
    except SystemExit as done:
        code = done.code
    else:
        code = 0
    _end(code)  # outside the handler: the exception and the frames it holds are let go first


def _end(code: object) -> NoReturn:
    status = 0 if code is None else code if isinstance(code, int) else 1
    if status:  # a stop or an error may leave a generator suspended in a `with` (batch's claims): close it
        gc.collect()
    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # what sys.exit would run: logging's flush, weakref finalizers ...
    if status == 1 and not isinstance(code, int):  # SystemExit's own rule: a message goes to stderr
        print(code, file=sys.stderr)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a reader gone (`ldm schedulers | head -1`) or a stream closed
            pass
    os._exit(status)
