"""Which file supplies each component of a model: the checkpoint itself, or files of their own
as ComfyUI users keep them (`--text-encoder FILE`, repeatable, beside `--vae FILE`).

A text-encoder file is recognised by its tensors, never by its name: a CLIP by its layer names
(Hugging Face's or open_clip's), told L from G by its width (and depth) against the model's
configs; a T5 by its encoder blocks (Hugging Face's names, or llama.cpp's in a GGUF file).
Everything here reads headers only, so a wrong file is one clear error before any weight is read.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from ldm_cli.errors import LdmError
from ldm_cli.loading import detect, flux, flux2, keymap, mmdit, quantized, qwen_image, recipe, tekken, tensors, zimage
from ldm_cli.loading.keymap import Slot
from ldm_cli.loading.recipe import Recipe
from ldm_cli.notes import note

if TYPE_CHECKING:
    from ldm_cli.loading.options import LoadOptions

SIGNATURES = keymap.TEXT_SIGNATURES
LAYERS = {"clip": r"text_model\.encoder\.layers\.(\d+)\.", "openclip": r"transformer\.resblocks\.(\d+)\.",
          "t5": r"encoder\.block\.(\d+)\.", "t5_gguf": r"enc\.blk\.(\d+)\.", "qwen3": r"layers\.(\d+)\.",
          "qwen3_gguf": r"blk\.(\d+)\.", "qwen25vl": r"layers\.(\d+)\.", "qwen25vl_gguf": r"blk\.(\d+)\."}
LABELS = {"sd3": {"text_encoder": "CLIP-L", "text_encoder_2": "CLIP-G", "text_encoder_3": "T5-XXL"},
          "sdxl": {"text_encoder": "CLIP-L", "text_encoder_2": "OpenCLIP-G"},
          "flux": {"text_encoder": "CLIP-L", "text_encoder_2": "T5-XXL"},
          "chroma": {"text_encoder": "T5-XXL"},
          "zimage": {"text_encoder": "Qwen3-4B"},
          "qwen-image": {"text_encoder": "Qwen2.5-VL-7B"}}
OPTIONAL = {"text_encoder_3"}  # SD3 runs without T5 (its part of the context is zeros)
VAE_PREFIXES = ("", keymap.VAE.prefix, "vae.")  # a bare VAE file, or one cut out of a checkpoint
FILE_NAMES = {"CLIP-L": "clip_l.safetensors", "CLIP-G": "clip_g.safetensors", "T5-XXL": "t5xxl_fp16.safetensors",
              "Qwen3-4B": "qwen_3_4b.safetensors", "Qwen3-8B": "qwen_3_8b.safetensors",
              "Qwen2.5-VL-7B": "qwen_2.5_vl_7b.safetensors"}
# the kinds of text encoder, as a file's layout shows them (a CLIP in either layout fills a CLIP slot)
GROUPS = {"t5": "T5", "t5_gguf": "T5", "qwen3": "Qwen3", "qwen3_gguf": "Qwen3", "qwen25vl": "Qwen2.5-VL",
          "qwen25vl_gguf": "Qwen2.5-VL"}
VAE_FILES = {"flux": "ae.safetensors", "chroma": "ae.safetensors", "zimage": "ae.safetensors",
             "qwen-image": "qwen_image_vae.safetensors", "flux2": "flux2-vae.safetensors"}
WAN_VAE_KEY = "encoder.conv1.weight"  # Qwen-Image's VAE in Wan's names (diffusers': encoder.conv_in)
# where a layout's width shows when its signature's last dimension is not it (a q/k norm's is a head's)
WIDTH_KEYS = {"qwen3_gguf": "token_embd.weight", "qwen25vl_gguf": "token_embd.weight"}


@dataclass(frozen=True)
class Gathered:
    """A single-file model as its headers describe it, before any weight is read."""
    checkpoint: tensors.Checkpoint
    found: detect.Found
    recipe: Recipe
    sources: dict[str, Source]

    def reading_order(self) -> list[tuple[tensors.Checkpoint, list[Slot]]]:
        """Each file the weights come from (the checkpoint first), with the slots read from it."""
        files = {id(s.checkpoint): s.checkpoint for s in self.sources.values()}
        return [(f, [s.slot for s in self.sources.values() if s.checkpoint is f]) for f in files.values()]


def gather(path: Path, options: LoadOptions) -> Gathered:
    """Open a single file, tell its family, and find where each component's weights lie (in it,
    or in the --text-encoder/--vae files); headers only, so this runs before torch is imported."""
    checkpoint = tensors.open_checkpoint(path, options.allow_pickle)
    found = detect.detect(checkpoint, options.variant)
    r = recipe.resolve(found, checkpoint.metadata, options.config)
    present = sources(found, r, checkpoint, options)
    for source in present.values():
        tekken.check_embedded(source.checkpoint)  # ComfyUI's Mistral carries its vocabulary
        quantized.check_mixed(source.checkpoint)
    if options.without_t5:  # every image of the run asked --no-t5: an optional T5 is not read
        present = {name: s for name, s in present.items() if name not in OPTIONAL}
    return Gathered(checkpoint, found, r, present)


@dataclass(frozen=True)
class Source:
    checkpoint: tensors.Checkpoint
    slot: Slot  # where in that file the component's weights lie, and in which layout


def label(r: Recipe, name: str) -> str:
    """A part's name for messages; FLUX.2's encoder by the width its config gives (Qwen3-4B or -8B, Mistral Small)."""
    if r.family == "flux2" and name == "text_encoder":
        config = r.configs[name]
        return flux2.ENCODERS.get(text_width(config), ("Mistral" if config.get("model_type") == "mistral" else "Qwen3",))[0]
    return LABELS.get(r.family, {}).get(name, name.replace("_", " "))


def sources(found: detect.Found, r: Recipe, checkpoint: tensors.Checkpoint, options: LoadOptions) -> dict[str, Source]:
    """component name -> where its weights are: files given explicitly win over the checkpoint's own."""
    out = {s.name: Source(checkpoint, s) for s in detect.slots(found) if s == found.denoiser_slot or holds(checkpoint, s)}
    out.update(text_encoder_files(options.text_encoders, r, options.allow_pickle))
    if options.vae:
        out.pop("vae", None)  # replaced: not read from the checkpoint
        if not Path(options.vae).expanduser().is_dir():  # a folder is checked as it loads
            vae_file(Path(options.vae).expanduser(), r.configs["vae"], options.allow_pickle)
    check_complete(r, out, checkpoint, bool(options.vae))
    return out


def text_encoder_files(paths: list[str], r: Recipe, allow_pickle: bool) -> dict[str, Source]:
    given: dict[str, Source] = {}
    for path in paths:
        for name, source in text_encoder_file(Path(path).expanduser(), r, allow_pickle).items():
            if name in given:
                raise LdmError(f"two {label(r, name)} text encoders given ({given[name].checkpoint.name} and "
                               f"{source.checkpoint.name}); pass one")
            given[name] = source
    return given


def holds(checkpoint: tensors.Checkpoint, slot: Slot) -> bool:
    if slot.kind == "vae":
        return slot.prefix + "encoder.conv_in.weight" in checkpoint.shapes
    if slot.kind == "qwen_vae":
        return slot.prefix + WAN_VAE_KEY in checkpoint.shapes
    return slot.prefix + SIGNATURES[layout(slot.kind)] in checkpoint.shapes


def layout(kind: str) -> str:
    """The key layout a slot kind is stored in (SD3's CLIP-L is a Hugging Face CLIP)."""
    return "clip" if kind == "clip_unprojected" else kind


def check_complete(r: Recipe, present: dict[str, Source], checkpoint: tensors.Checkpoint, vae_given: bool) -> None:
    if "vae" not in present and not vae_given:
        example = f"e.g. {VAE_FILES[r.family]}" if r.family in VAE_FILES else "the model's own VAE file"
        raise LdmError(f"{checkpoint.name} has no VAE; pass one with --vae ({example})")
    for name in r.text_encoders:
        if name in present:
            continue
        what = label(r, name)
        if name not in OPTIONAL:
            example = f" (e.g. {FILE_NAMES[what]})" if what in FILE_NAMES else ""
            raise LdmError(f"{checkpoint.name} has no {what} text encoder; pass its file with --text-encoder{example}")


def note_missing(r: Recipe, present: dict[str, Source], checkpoint: tensors.Checkpoint) -> None:
    """Once the model has loaded: which optional part it runs without."""
    for name in r.text_encoders:
        if name not in present:
            note(f"no {label(r, name)} text encoder in {checkpoint.name} or given with --text-encoder; "
                 "running without it (as --no-t5 does)")


def vae_file(path: Path, config: dict, allow_pickle: bool) -> tuple[tensors.Checkpoint, Slot]:
    """A --vae file, and where its weights lie; its latent channels checked against the model's."""
    if not path.exists():
        raise LdmError(f"--vae {str(path)!r} not found; pass a VAE .safetensors file or a diffusers VAE folder")
    checkpoint = tensors.open_checkpoint(path, allow_pickle)
    if config.get("_class_name") == "AutoencoderKLQwenImage":
        return checkpoint, qwen_vae_slot(checkpoint, path, config)
    for prefix in VAE_PREFIXES:
        if prefix + "encoder.conv_in.weight" in checkpoint.shapes:
            diffusers = any(k.startswith(prefix + "encoder.down_blocks.") for k in checkpoint.shapes)
            slot = Slot("vae", prefix, "diffusers" if diffusers else "vae")
            check_channels(path.name, checkpoint.shapes.get(prefix + "decoder.conv_in.weight", (0, None))[1], config)
            return checkpoint, slot
    raise LdmError(f"--vae {checkpoint.name} is not a VAE (it has no encoder.conv_in weights)")


def qwen_vae_slot(checkpoint: tensors.Checkpoint, path: Path, config: dict) -> Slot:
    """Where Qwen-Image's VAE lies in a --vae file: Wan's names, bare or under `vae.`."""
    prefix = next((p for p in ("", "vae.") if p + WAN_VAE_KEY in checkpoint.shapes), None)
    if prefix is None:
        raise LdmError(f"--vae {path.name} is not Qwen-Image's VAE (it has no {WAN_VAE_KEY}, as "
                       "qwen_image_vae.safetensors has); pass that file or a diffusers AutoencoderKLQwenImage folder")
    check_channels(path.name, checkpoint.shapes.get(prefix + "decoder.conv1.weight", (0, None))[1], config)
    return Slot("vae", prefix, "qwen_vae")


def check_channels(name: str, channels: int | None, config: dict) -> None:
    """A VAE's latents must be the model's: SD's 4 channels do not fit SD3's 16."""
    wanted = config.get("latent_channels", config.get("z_dim", 4))
    if channels is not None and channels != wanted:
        raise LdmError(f"--vae {name} is a {channels}-channel VAE, but this model works in {wanted}-channel latents; "
                       "pass a VAE of the model's own family")


def text_encoder_file(path: Path, r: Recipe, allow_pickle: bool) -> dict[str, Source]:
    """The text encoders one --text-encoder file holds, each matched to the model's slot."""
    if not path.exists():
        raise LdmError(f"--text-encoder {str(path)!r} not found; pass a text encoder .safetensors file")
    checkpoint = tensors.open_checkpoint(path, allow_pickle)
    refuse_non_encoders(checkpoint)
    found = encoders_in(checkpoint)
    if not found:
        raise LdmError(f"--text-encoder {checkpoint.name} holds no text encoder ldm recognises "
                       "(a CLIP, T5, Qwen3 or Qwen2.5-VL encoder in Hugging Face or open_clip layout)")
    out = {}
    for kind, prefix in found:
        slot = matching_slot(checkpoint, kind, prefix, r)
        if slot.name in out:
            raise LdmError(f"--text-encoder {checkpoint.name} holds two {label(r, slot.name)} text encoders; pass one")
        out[slot.name] = Source(checkpoint, cut_short(checkpoint, slot, r))
    return out


def cut_short(checkpoint: tensors.Checkpoint, slot: Slot, r: Recipe) -> Slot:
    """FLUX.2 dev's Mistral as ComfyUI ships it: only the layers up to the deepest one the pipeline
    reads. Its config is cut to the file's depth with the last hidden state left unnormed (as the
    whole model's layer 30 is), and a final norm the file lacks, never read, is the identity."""
    config = r.configs[slot.name]
    if config.get("model_type") != "mistral" or slot.kind != "qwen3":
        return slot
    depth = layer_count(checkpoint, slot.kind, slot.prefix)
    if depth >= config["num_hidden_layers"]:
        return slot
    if depth < flux2.MISTRAL_DEPTH:
        raise LdmError(f"--text-encoder {checkpoint.name} holds {depth} of Mistral's {config['num_hidden_layers']} "
                       f"layers; FLUX.2 dev reads its layer {flux2.MISTRAL_DEPTH}: pass the whole file "
                       "(or ComfyUI's mistral_3_small_flux2 file)")
    r.configs[slot.name] = {**config, "num_hidden_layers": depth, "tie_last_hidden_states": False}
    return slot if slot.prefix + "norm.weight" in checkpoint.shapes else Slot(slot.name, slot.prefix, "llm_unnormed")


def refuse_non_encoders(checkpoint: tensors.Checkpoint) -> None:
    keys = checkpoint.shapes
    if any(m.prefix_of(keys) is not None for m in (mmdit, flux, zimage, flux2, qwen_image)) or any(
            k.startswith(keymap.UNET.prefix) for k in keys):
        raise LdmError(f"--text-encoder {checkpoint.name} is a whole model checkpoint, not a text encoder; "
                       "pass it with --model")
    if any("lora" in k.lower() for k in list(keys)[:50]):
        raise LdmError(f"--text-encoder {checkpoint.name} is a LoRA, not a text encoder")
    if "encoder.conv_in.weight" in keys or keymap.VAE.prefix + "encoder.conv_in.weight" in keys:
        raise LdmError(f"--text-encoder {checkpoint.name} is a VAE, not a text encoder; pass it with --vae")


def encoders_in(checkpoint: tensors.Checkpoint) -> list[tuple[str, str]]:
    """(layout, prefix) of every text encoder in the file. Qwen2.5 is a Qwen with q biases: Qwen3's
    signature layer and its own at one prefix (CLIP's q biases alone are no Qwen), then not Qwen3."""
    found = [(kind, key[:-len(signature)]) for key in checkpoint.shapes
             for kind, signature in SIGNATURES.items() if key.endswith(signature)]
    qwen25 = {prefix for kind, prefix in found if kind == "qwen25vl" and ("qwen3", prefix) in found}
    return [(kind, prefix) for kind, prefix in found
            if not (kind == "qwen25vl" and prefix not in qwen25) and not (kind == "qwen3" and prefix in qwen25)]


def matching_slot(checkpoint: tensors.Checkpoint, kind: str, prefix: str, r: Recipe) -> Slot:
    """The model's text-encoder slot this encoder fills: T5 the T5, Qwen3 the Qwen3; a CLIP the one
    of its width (and, between two of one width, its depth)."""
    width_key = prefix + WIDTH_KEYS.get(kind, SIGNATURES[kind])
    if width_key not in checkpoint.shapes:
        raise LdmError(f"--text-encoder {checkpoint.name} has no {width_key!r}; the file is incomplete")
    width = checkpoint.shapes[width_key][-1]
    depth = layer_count(checkpoint, kind, prefix)
    group = GROUPS.get(kind, "CLIP")
    slots = [s for s in detect.text_slots(r.family) if GROUPS.get(s.kind, "CLIP") == group]
    fits = [s for s in slots if text_width(r.configs[s.name]) == width]
    if kind == "qwen3":  # Qwen3's names are Mistral's too: Qwen3 alone normalises q and k
        group = "Qwen3" if prefix + "layers.0.self_attn.q_norm.weight" in checkpoint.shapes else "Mistral"
        fits = [s for s in fits if (r.configs[s.name].get("model_type") == "mistral") == (group == "Mistral")]
    if len(fits) > 1:
        fits = [s for s in fits if r.configs[s.name].get("num_hidden_layers", r.configs[s.name].get("num_layers")) == depth]
    if len(fits) != 1:
        wanted = ", ".join(f"{label(r, s.name)} ({text_width(r.configs[s.name])} wide)" for s in slots) or "none"
        raise LdmError(f"--text-encoder {checkpoint.name} holds a {group} text encoder "
                       f"{width} wide with {depth} layers, which this {r.family} model does not use; it takes: {wanted}")
    slot = fits[0]
    # SD3's CLIP-L stays unprojected whatever the file's layout calls it
    return Slot(slot.name, prefix, slot.kind if kind == layout(slot.kind) else kind)


def text_width(config: dict) -> int | None:
    return config.get("hidden_size", config.get("d_model"))


def layer_count(checkpoint: tensors.Checkpoint, kind: str, prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + LAYERS[kind])
    return 1 + max(int(m[1]) for k in checkpoint.shapes if (m := pattern.match(k)))
