"""Load a model from wherever it lives: the built-in file, a single-file checkpoint, or a
diffusers-layout folder. Nothing here ever reaches the network."""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable

from ldm_cli import files
from ldm_cli.errors import LdmError
from ldm_cli.loading.options import LoadOptions, quiet_libraries  # callers take both from here

BUILTIN = Path(__file__).resolve().parent.parent / "assets" / "builtin.safetensors"
# denoisers that take latents in patches their config's patch_size does not show (families.flux and
# families.chroma pack 2x2; Z-Image's config calls it all_patch_size; FLUX.2's VAE latents are packed)
PACKED = {"FluxTransformer2DModel": 2, "ChromaTransformer2DModel": 2, "ZImageTransformer2DModel": 2,
          "Flux2Transformer2DModel": 2}


def load(source: str | None, options: LoadOptions | None = None, early: Callable[[Any], None] | None = None):
    """A ready-to-run `Model` on the chosen device and dtype. `early` (single files) is given the
    model once its text encoders are in, while its denoiser is still read (single_file.load_single_file)."""
    options = options or LoadOptions()
    path = source_path(source)
    check(path, options)
    gathered = None
    if not path.is_dir():  # a file's family and parts from its headers: a wrong file fails before torch loads
        from ldm_cli.loading import components

        gathered = components.gather(path, options)
    from ldm_cli import device as devices  # imports torch, which takes seconds: after the checks

    device = devices.pick_device(options.device)
    if gathered is None:
        from ldm_cli.loading import folder

        quiet_libraries()
        model = folder.load_folder(path, device, options)
    else:  # quiets the libraries itself, once its reading is under way
        from ldm_cli.loading import single_file

        model = single_file.load_single_file(gathered, device, options, early)
    if source is None:
        model.name = "ldm-builtin"
    model.modules = [Path(p).name.removesuffix(".safetensors").removesuffix(".gguf")
                     for p in [options.vae, *options.text_encoders] if p]
    from ldm_cli import memory, speed

    memory.place(model, device, options)
    speed.apply(model, options.compile)
    devices.fit_threads(model)
    return model


def source_path(source: str | None) -> Path:
    """Where the model `source` names is read from (None: the built-in model)."""
    return files.user_path(source) if source else BUILTIN


def check(path: Path, options: LoadOptions) -> None:
    """What needs no library: the options, and that the model and VAE are files or folders (a
    FIFO would hang the read)."""
    if options.prediction not in (None, "epsilon", "v"):
        raise LdmError(f"unknown --prediction {options.prediction!r}; choose epsilon or v")
    from ldm_cli import memory

    memory.check(options.offload, options.weights, options.compile)
    if not path.exists():
        raise LdmError(f"model not found: {str(path)!r}; pass a .safetensors file or a diffusers folder with --model")
    files.check_openable(path, folders=True)
    if options.vae:
        files.check_openable(Path(options.vae).expanduser(), folders=True)
    if options.text_encoders and path.is_dir():
        raise LdmError(f"--text-encoder is for single-file models; the folder {path.name!r} loads its own "
                       "text_encoder*/ subfolders")
    for name in options.text_encoders:
        if not Path(name).expanduser().exists():
            raise LdmError(f"--text-encoder {name!r} not found; pass a text encoder .safetensors file")
        files.check_openable(Path(name).expanduser())


@functools.lru_cache(maxsize=32)  # a batch asks once per line
def size_multiple(source: str | None) -> int:
    """What width and height must be multiples of (the VAE's factor, 8, times a DiT's patch size),
    from the model's configs or file header alone, so sizes taken from an image are rounded right
    before anything loads. A file that cannot be read says so when it loads."""
    path = files.user_path(source) if source else BUILTIN
    if path.is_dir():
        config = path / "transformer" / "config.json"
        try:
            data = json.loads(config.read_text()) if config.is_file() else {}
            return 8 * PACKED.get(data.get("_class_name"), data.get("patch_size", 1))
        except (OSError, ValueError, AttributeError):
            return 8
    if not path.is_file():  # not there, or a FIFO that would hang the read: load says which
        return 8
    from ldm_cli.loading import flux, mmdit, tensors, zimage

    try:
        shapes = tensors.shapes_of(path)
    except (OSError, LdmError):
        return 8
    if flux.prefix_of(shapes) is not None or zimage.prefix_of(shapes) is not None:
        return 16  # latents packed in 2x2 patches (FLUX.2's files have FLUX's block names)
    prefix = mmdit.prefix_of(shapes)
    return 8 * (mmdit.config(shapes, prefix)["patch_size"] if prefix is not None else 1)


def kind_of(source: str | None, variant: str | None = None) -> tuple[str, str | None] | None:
    """The model's family ("sd" for SD1 and SD2) and variant (None: the family's plain model;
    `variant`: --variant's), from its configs or file header alone, so a command can refuse a
    model before its weights load; None when they cannot be read (loading says why)."""
    from ldm_cli.loading import detect, flux2, qwen_image, recipe, tensors, variants

    path = source_path(source)
    try:
        if path.is_dir():
            index = recipe.read_json(path / "model_index.json")
            family = recipe.PIPELINE_FAMILIES[index["_class_name"]]
            config = path / "transformer" / "config.json"
            told = {"flux": lambda: "dev" if recipe.read_json(config).get("guidance_embeds") else "schnell",
                    "flux2": lambda: flux2.variant_of_index(index),
                    "qwen-image": lambda: qwen_image.variant_of_index(index),
                    "sdxl": lambda: recipe.sdxl_variant(index)}
            found = told[family]() if family in told else None
        else:
            detected = detect.detect(tensors.open_checkpoint(path))
            family, found = detected.family, detected.variant
    except (OSError, ValueError, KeyError, TypeError, LdmError):
        return None
    return family, variants.told(family, found, variant)  # a name the family lacks: refused here
