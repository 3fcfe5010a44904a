"""Single-file checkpoints in the original layout (.safetensors; a pickle only with
--allow-pickle): the family from the header, each component built empty from its config, the
converted weights read straight in (from the checkpoint, or from the text-encoder and VAE files
given beside it), the prediction type settled. Nothing touches the network.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import torch

from ldm_cli import untrusted_json
from ldm_cli.errors import LdmError
from ldm_cli.loading import components, convert, detect, keymap, plan, prediction, tekken, tensors, vae_file
from ldm_cli.loading.folder import load_tokenizer, to_device
from ldm_cli.loading.options import quiet_libraries
from ldm_cli.loading.prefetch import Prefetch, in_background
from ldm_cli.loading.recipe import Recipe, read_json

if TYPE_CHECKING:
    from ldm_cli.loading.options import LoadOptions
    from ldm_cli.model import Model

DEFAULTS_KEY = "ldm.defaults"


def load_single_file(gathered: components.Gathered, device: torch.device, options: LoadOptions,
                     early: Callable[[Model], None] | None = None) -> Model:
    """The model `gathered` describes (components.gather), read, built and settled. `early` is
    given the model as soon as its text encoders are in, while the rest is still read: it may
    encode prompts, and must touch no other weights."""
    from ldm_cli import device as devices
    from ldm_cli import families, hashing, memory
    from ldm_cli.model import Model

    checkpoint, found, r, path = gathered.checkpoint, gathered.found, gathered.recipe, gathered.checkpoint.path
    digest = in_background(hashing.short_hash, path)  # a new file's first hash overlaps the load
    family = families.get(found.family)
    dtype = devices.pick_dtype(options.dtype, device, family.cuda_dtype)
    device = memory.load_device(device, options)  # the CPU, when memory.place puts the weights later
    found_tokenizers = []  # loaded by this thread while the weights are read, before it joins the copying
    made: list[Model] = []

    def assemble(parts: dict[str, torch.nn.Module]) -> Model:
        return Model(family=family, denoiser=parts[r.denoiser], vae=parts.get("vae"), tokenizers=found_tokenizers,
                     text_encoders=[parts.get(n) for n in r.text_encoders], scheduler_config=r.configs["scheduler"],
                     name=path.stem, path=str(path), defaults=defaults(checkpoint, r, gathered.sources),
                     options=r.options, modules=[Path(p).stem for p in [*([options.vae] if options.vae else []),
                                                                        *options.text_encoders]])

    def text_ready(parts: dict[str, torch.nn.Module]) -> None:  # the denoiser may still be empty
        made.append(assemble(parts))
        made[0].run_device, made[0].run_dtype = device, dtype  # not the empty denoiser's
        early(made[0])

    parts = read(gathered, dtype, device, lambda: found_tokenizers.extend(tokenizers(r, gathered.sources)),
                 text_ready if early is not None else None)
    settle_prediction(options.prediction, r, found, path, parts[r.denoiser])
    model = made[0] if made else assemble(parts)  # the same modules, filled in place since
    model.run_device = model.run_dtype = None
    model.vae = vae_file.load_vae(Path(options.vae), dtype, r.configs["vae"], options.allow_pickle) if options.vae else parts["vae"]
    model.hash = digest()
    if not options.without_t5:
        components.note_missing(r, gathered.sources, checkpoint)
    return to_device(model, device)


def read(gathered: components.Gathered, dtype: torch.dtype, device: torch.device,
         meanwhile: Callable[[], None] | None = None,
         text_ready: Callable[[dict[str, torch.nn.Module]], None] | None = None) -> dict[str, torch.nn.Module]:
    """Every component, from whichever file holds it: the checkpoint first, then the others;
    `meanwhile` runs while the first file is read, `text_ready` (given every part, those not
    read yet still empty) once the text encoders are in, if one file holds them all."""
    text = {n for n in gathered.recipe.text_encoders if n in gathered.sources}
    parts: dict[str, torch.nn.Module] = {}
    for checkpoint, slots in gathered.reading_order():
        holds_text = bool(text) and text <= {s.name for s in slots}
        parts.update(build(gathered.recipe, checkpoint, slots, dtype, device, meanwhile,
                           (lambda modules: text_ready({**parts, **modules})) if text_ready and holds_text else None))
        meanwhile = None
    return parts


def build(r: Recipe, checkpoint: tensors.Checkpoint, slots: list[keymap.Slot], dtype: torch.dtype,
          device: torch.device, meanwhile: Callable[[], None] | None = None,
          text_ready: Callable[[dict[str, torch.nn.Module]], None] | None = None) -> dict[str, torch.nn.Module]:
    """Every component under `slots` in this file, planned (and so checked) while it is read;
    `meanwhile` runs then too (work that would otherwise wait for the copy to end); with
    `text_ready`, the text encoders are read first and it is given every module once they are in."""
    text = [s.name for s in slots if s.name in r.text_encoders] if text_ready is not None else []
    first = sorted(slots, key=lambda s: s.name not in text)
    with Prefetch(checkpoint, [s.prefix for s in first], dtype, device) as reading:
        quiet_libraries()  # importing diffusers and transformers overlaps the reading
        modules = {s.name: convert.empty(s.name, r.configs[s.name]) for s in slots}
        plans = {s.name: plan.for_module(s, modules[s.name], checkpoint) for s in slots}
        if meanwhile is not None:
            meanwhile()
        if text:
            so_far = reading.until({p.key for n in text for p in plans[n].values() if not p.origin.eye})
            for n in text:
                keep_fp32(convert.fill(modules[n], plans[n], so_far), dtype)
            text_ready(modules)
        tensors_read = reading.result()
    return {n: modules[n] if n in text else keep_fp32(convert.fill(modules[n], plans[n], tensors_read), dtype)
            for n in modules}


def keep_fp32(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """The layers transformers keeps in fp32 under fp16, as from_pretrained does (T5's `wo`,
    whose activations overflow fp16)."""
    keep = getattr(module, "_keep_in_fp32_modules", None) or []
    if dtype == torch.float16:
        for name, param in module.named_parameters():
            if param.is_floating_point() and any(part in keep for part in name.split(".")):
                param.data = param.data.float()
    return module


def settle_prediction(flag: str | None, r: Recipe, found: detect.Found, path: Path, denoiser) -> None:
    """Epsilon or v, for the noise-prediction families; a flow model predicts a velocity, always."""
    if r.denoiser != "unet":
        if flag:
            raise LdmError(f"--prediction {flag} is for SD1, SD2 and SDXL models; this {r.family} model is a flow model")
        return
    unet = denoiser
    chosen, _ = prediction.decide(flag, r, found, path, lambda: prediction.is_v_model(unet))
    prediction.apply(r, chosen)
    unet.register_to_config(sample_size=r.configs["unet"]["sample_size"])


def tokenizers(r: Recipe, present) -> list:
    """One per text encoder; None for an encoder run without (SD3's T5, not `present`)."""
    try:
        return [tokenizer(folder, tuple(sorted(overrides.items()))) if name in present else None
                for name, (folder, overrides) in zip(r.text_encoders, r.tokenizers)]
    except (OSError, ValueError) as e:
        raise LdmError(f"cannot load a tokenizer ({str(e).splitlines()[0]}); check the --config folder's tokenizer") from None


@functools.lru_cache(maxsize=8)
def tokenizer(folder: Path, overrides: tuple):
    """Reading the 49408-token vocabulary is most of a small model's load; models only call
    their tokenizers, so one process shares them."""
    config = folder / "tokenizer_config.json"
    kind = read_json(config).get("tokenizer_class", "") if config.is_file() else ""
    if kind.startswith("T5"):
        from transformers import T5TokenizerFast

        return T5TokenizerFast.from_pretrained(str(folder), local_files_only=True, **dict(overrides))
    if kind == tekken.MARK:  # ldm's copy of Mistral's
        return tekken.load(folder)
    # Qwen3's byte-level BPE (Qwen2's tokenizer class); a --config folder's Mistral (a tokenizer.json)
    if kind.startswith("Qwen2") or (folder / "tokenizer.json").is_file() and not kind.startswith("CLIP"):
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True, **dict(overrides))
    return load_tokenizer(folder, **dict(overrides))


def defaults(checkpoint: tensors.Checkpoint, r: Recipe | None = None, parts: dict | None = None) -> dict:
    """The steps, cfg and scheduler a file recommends in its metadata (ldm's built-in model
    does), over its family's own (SD3's, FLUX's, Chroma's, Z-Image's, FLUX.2's, Qwen-Image's)."""
    base = {}
    if r is not None and r.family == "sd3":
        from ldm_cli.families import sd3

        base = sd3.defaults(detect.turbo(checkpoint), r.configs["scheduler"].get("shift", 3.0), "text_encoder_3" in parts)
    if r is not None and r.family == "flux":
        from ldm_cli.families import flux

        base = flux.defaults(r.options["variant"], r.configs["scheduler"])
    if r is not None and r.family == "chroma":
        from ldm_cli.families import chroma

        base = chroma.defaults(r.configs["scheduler"])
    if r is not None and r.family == "zimage":
        from ldm_cli.families import zimage

        base = zimage.defaults(r.options["variant"], r.configs["scheduler"])
    if r is not None and r.family == "flux2":
        from ldm_cli.families import flux2

        base = flux2.defaults(r.options["variant"], r.configs["scheduler"])
    if r is not None and r.family == "qwen-image":
        from ldm_cli.families import qwen_image

        base = qwen_image.defaults(r.configs["scheduler"])
    if r is not None and r.family in ("sd1", "sd2", "sdxl"):
        base = {**base, **_few_steps(checkpoint)}
    text = checkpoint.metadata.get(DEFAULTS_KEY)
    if text is None:
        return base
    try:
        data = untrusted_json.loads(text, "the metadata")
    except untrusted_json.BadJson:
        data = None
    if not isinstance(data, dict):
        raise LdmError(f"{checkpoint.name}: its {DEFAULTS_KEY} metadata is not a JSON table; the file is damaged")
    return {**base, **data}


def _few_steps(checkpoint: tensors.Checkpoint) -> dict:
    """The settings of a checkpoint whose metadata says it is made for few steps (presets.py), said."""
    from ldm_cli import presets
    from ldm_cli.notes import note

    found = presets.from_metadata(checkpoint.metadata)
    if found is None:
        return {}
    note(f"{checkpoint.name} is a {found[0]} model (its metadata says): {presets.described(found[1])} "
         "unless given otherwise")
    return found[1]

