"""Single-file checkpoints in the original layout (.safetensors; a pickle only with
--allow-pickle): the family from the header, each component built empty from its config, the
converted weights read straight in, the prediction type settled. Nothing touches the network.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from typing import TYPE_CHECKING

import torch

from ldm_cli.errors import LdmError
from ldm_cli.loading import convert, detect, keymap, prediction, recipe, tensors
from ldm_cli.loading.recipe import Recipe
from ldm_cli.loading.folder import load_tokenizer, read_json, to_device
from ldm_cli.loading.prefetch import Prefetch, in_background

if TYPE_CHECKING:
    from ldm_cli.loading import LoadOptions
    from ldm_cli.model import Model

DEFAULTS_KEY = "ldm.defaults"
VAE_PREFIXES = ("", keymap.VAE.prefix, "vae.")  # a bare VAE file, or one cut out of a checkpoint


def load_single_file(path: Path, device: torch.device, options: LoadOptions) -> Model:
    from ldm_cli import device as devices
    from ldm_cli import families, hashing
    from ldm_cli.model import Model

    checkpoint = tensors.open_checkpoint(path, options.allow_pickle)
    found = detect.detect(checkpoint)
    r = recipe.resolve(found, checkpoint.metadata, options.config)
    digest = in_background(hashing.short_hash, path)  # a new file's first hash overlaps the load
    family = families.get(found.family)
    dtype = devices.pick_dtype(options.dtype, device, family.cuda_dtype)
    parts = build(r, checkpoint, [n for n in weight_names(r) if not (n == "vae" and options.vae)], dtype, device)
    settle_prediction(options.prediction, r, found, path, parts["unet"])
    vae = load_vae(Path(options.vae), dtype, r.configs["vae"], options.allow_pickle) if options.vae else parts["vae"]
    model = Model(family=family, denoiser=parts["unet"], vae=vae, text_encoders=[parts[n] for n in r.text_encoders],
                  tokenizers=tokenizers(r), scheduler_config=r.configs["scheduler"], name=path.stem,
                  hash=digest(), path=str(path), defaults=defaults(checkpoint), options=r.options)
    return to_device(model, device)


def weight_names(r: Recipe) -> list[str]:
    """The components read from the file: unet, vae, text_encoder[, text_encoder_2]."""
    return [s.name for s in keymap.LAYOUTS[r.family]]


def build(r: Recipe, checkpoint: tensors.Checkpoint, names: list[str], dtype: torch.dtype,
          device: torch.device) -> dict[str, torch.nn.Module]:
    """Every named component, planned (and so checked) before any tensor is read."""
    from ldm_cli.loading import quiet_libraries

    slots = {s.name: s for s in keymap.LAYOUTS[r.family]}
    with Prefetch(checkpoint, [slots[n].prefix for n in names], dtype, device) as reading:
        quiet_libraries()  # importing diffusers and transformers overlaps the reading
        modules = {n: empty(n, r.configs[n]) for n in names}
        plans = {n: convert.plan(slots[n], modules[n], checkpoint) for n in names}
        read = reading.result()
    return {n: convert.fill(modules[n], plans[n], read) for n in names}


def empty(name: str, config: dict) -> torch.nn.Module:
    """A component with its weights on the meta device: built in milliseconds, filled by assignment."""
    from accelerate import init_empty_weights

    try:
        with init_empty_weights():
            return constructor(name)(config)
    except (TypeError, ValueError, KeyError) as e:
        raise LdmError(f"the {name} config does not describe a model ldm can build ({e})") from None


def constructor(name: str):
    if name in ("unet", "vae"):
        from diffusers import AutoencoderKL, UNet2DConditionModel

        return (UNet2DConditionModel if name == "unet" else AutoencoderKL).from_config
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cls = CLIPTextModelWithProjection if name == "text_encoder_2" else CLIPTextModel
    return lambda config: cls(CLIPTextConfig.from_dict(config))


def settle_prediction(flag: str | None, r: Recipe, found: detect.Found, path: Path, unet) -> None:
    chosen, _ = prediction.decide(flag, r, found, path, lambda: prediction.is_v_model(unet))
    prediction.apply(r, chosen)
    unet.register_to_config(sample_size=r.configs["unet"]["sample_size"])


def tokenizers(r: Recipe) -> list:
    try:
        return [tokenizer(folder, tuple(sorted(overrides.items()))) for folder, overrides in r.tokenizers]
    except (OSError, ValueError) as e:
        raise LdmError(f"cannot load a tokenizer ({str(e).splitlines()[0]}); check the --config folder's tokenizer") from None


@functools.lru_cache(maxsize=8)
def tokenizer(folder: Path, overrides: tuple):
    """Reading the 49408-token vocabulary is most of a small model's load; models only call
    their tokenizers, so one process shares them."""
    return load_tokenizer(folder, **dict(overrides))


def defaults(checkpoint: tensors.Checkpoint) -> dict:
    """The steps, cfg and scheduler a file recommends in its metadata (ldm's built-in model does)."""
    text = checkpoint.metadata.get(DEFAULTS_KEY)
    if text is None:
        return {}
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if not isinstance(data, dict):
        raise LdmError(f"{checkpoint.name}: its {DEFAULTS_KEY} metadata is not a JSON table; the file is damaged")
    return data


def load_vae(path: Path, dtype, config: dict | None = None, allow_pickle: bool = False):
    """A VAE replacing a model's own: a diffusers VAE folder, or a single file in the original or
    diffusers layout. A single file has no config: `config` (the replaced VAE's, whose latent
    scaling the model was trained with) describes it, else SD's."""
    path = Path(path).expanduser()
    if path.is_dir():
        return vae_folder(path, dtype)
    if not path.is_file():
        raise LdmError(f"--vae {str(path)!r} not found; pass a VAE .safetensors file or a diffusers VAE folder")
    checkpoint = tensors.open_checkpoint(path, allow_pickle)
    slot = vae_slot(checkpoint)
    module = empty("vae", config or read_json(recipe.config_file(recipe.SHIPPED / "sd1", "vae")))
    planned = convert.plan(slot, module, checkpoint)
    with Prefetch(checkpoint, [slot.prefix], dtype, torch.device("cpu")) as reading:
        return convert.fill(module, planned, reading.result())


def vae_slot(checkpoint: tensors.Checkpoint) -> keymap.Slot:
    for prefix in VAE_PREFIXES:
        if prefix + "encoder.conv_in.weight" in checkpoint.shapes:
            diffusers = any(k.startswith(prefix + "encoder.down_blocks.") for k in checkpoint.shapes)
            return keymap.Slot("vae", prefix, "diffusers" if diffusers else "vae")
    raise LdmError(f"--vae {checkpoint.name} is not a VAE (it has no encoder.conv_in weights)")


def vae_folder(path: Path, dtype):
    from diffusers import AutoencoderKL

    subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
    if subfolder is None and not (path / "config.json").is_file():
        raise LdmError(f"--vae {str(path)!r} is a folder without config.json (or vae/config.json); pass a diffusers VAE folder")
    try:
        return AutoencoderKL.from_pretrained(path, subfolder=subfolder, torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as e:
        raise LdmError(f"--vae {str(path)!r}: cannot load it ({str(e).splitlines()[0]})") from None
