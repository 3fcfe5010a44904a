"""What to build for a detected checkpoint: each component's diffusers config and the
tokenizers. They come from the configs shipped in loading/configs/<family>/ (diffusers-layout
folders without weights, so no hub is ever consulted), overridden by the file's own
`ldm.config` metadata, overridden in turn by --config DIR, as diffusers' from_single_file(config=)
does.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ldm_cli import files, limits, untrusted_json
from ldm_cli.errors import LdmError
from ldm_cli.loading import flux2, keymap
from ldm_cli.loading.detect import Found, text_slots

SHIPPED = Path(__file__).resolve().parent / "configs"
TOKENIZER = SHIPPED / "clip_tokenizer"
T5_TOKENIZER = SHIPPED / "t5_tokenizer"
QWEN3_TOKENIZER = SHIPPED / "qwen3_tokenizer"
QWEN25VL_TOKENIZER = SHIPPED / "qwen25vl_tokenizer"  # its own config over qwen3_tokenizer's BPE files
QWEN25VL_PROCESSOR = SHIPPED / "qwen25vl_processor"  # the release's image processor config
MISTRAL_TOKENIZER = SHIPPED / "mistral_tokenizer"  # Tekken, built by loading/tekken.py
QWEN25VL_FILES = {"vocab_file": str(QWEN3_TOKENIZER / "vocab.json"), "merges_file": str(QWEN3_TOKENIZER / "merges.txt")}
OPENCLIP_TOKENS = {"pad_token": "!"}  # OpenCLIP pads with "!"; OpenAI's CLIP repeats the end token
METADATA_KEY = "ldm.config"
# model_index.json's pipeline class -> the family it holds ("sd": SD1 or SD2, told by the text encoder)
PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd", "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLInpaintPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3", "StableDiffusion3Img2ImgPipeline": "sd3",
    "StableDiffusion3InpaintPipeline": "sd3",
    "FluxPipeline": "flux", "FluxImg2ImgPipeline": "flux", "FluxInpaintPipeline": "flux",
    "FluxKontextPipeline": "flux", "FluxKontextInpaintPipeline": "flux",
    "ChromaPipeline": "chroma", "ChromaImg2ImgPipeline": "chroma", "ChromaInpaintPipeline": "chroma",
    "ZImagePipeline": "zimage", "ZImageImg2ImgPipeline": "zimage", "ZImageInpaintPipeline": "zimage",
    "Flux2KleinPipeline": "flux2", "Flux2KleinInpaintPipeline": "flux2", "Flux2Pipeline": "flux2",
    "QwenImagePipeline": "qwen-image", "QwenImageImg2ImgPipeline": "qwen-image",
    "QwenImageInpaintPipeline": "qwen-image", "QwenImageEditPipeline": "qwen-image",
    "QwenImageEditPlusPipeline": "qwen-image",
}


@dataclass
class Recipe:
    family: str
    configs: dict[str, dict]  # unet (transformer), vae, text_encoder[, text_encoder_2[, _3]], scheduler
    sources: dict[str, str]  # component -> "shipped", "metadata" or "--config"
    tokenizers: list[tuple[Path, dict]]  # (folder, overrides) per text encoder
    options: dict

    @property
    def text_encoders(self) -> list[str]:
        return [s.name for s in text_slots(self.family)]

    @property
    def denoiser(self) -> str:
        return keymap.LAYOUTS[self.family][0].name


def read_json(path: Path) -> dict:
    """A config of a diffusers-layout folder (shipped, --config's, or a model's own): a JSON
    object, read with untrusted_json's bounds (a FIFO or a huge file is never read whole)."""
    files.check_openable(path)
    try:
        with open(path, "rb") as f:
            data = untrusted_json.loads(f.read(limits.MAX_JSON_CHARS + 1), f"{str(path)!r}")
    except FileNotFoundError:
        raise LdmError(f"{str(path.parent)!r} is not a diffusers model folder: it has no {path.name}") from None
    except OSError as e:
        raise LdmError(f"cannot read {str(path)!r} ({e.strerror or e})") from None
    if not isinstance(data, dict):
        raise LdmError(f"{str(path)!r} is not a JSON object of settings; download it again")
    return data


def components(family: str) -> list[str]:
    return [s.name for s in keymap.LAYOUTS[family]] + ["scheduler"]


def resolve(found: Found, metadata: dict[str, str], config_dir: str | None) -> Recipe:
    r = shipped(found)
    if METADATA_KEY in metadata:
        overlay(r, from_metadata(metadata[METADATA_KEY], found.family), "metadata")
    if config_dir:
        overlay(r, from_folder(Path(config_dir).expanduser(), r), "--config")
    return r


def shipped_folder(found: Found) -> Path:
    """FLUX.1 dev and schnell have a config each, FLUX.2 klein 4B and 9B one each (their Qwen3s
    differ: 4B's for a transformer of unreleased width) and FLUX.2 dev its own (Mistral); the others one."""
    if found.family == "flux":
        return SHIPPED / f"flux-{found.variant}"
    if found.family == "flux2" and found.variant == "dev":
        return SHIPPED / "flux2-dev"
    if found.family == "flux2":
        return SHIPPED / ("flux2-klein-9b" if flux2.size(found.denoiser_config) == "9B" else "flux2-klein-4b")
    return SHIPPED / found.family


def shipped(found: Found) -> Recipe:
    folder = shipped_folder(found)
    configs = {name: read_json(config_file(folder, name)) for name in components(found.family)}
    denoiser = keymap.LAYOUTS[found.family][0].name
    # the inpainting variants differ only in in_channels; SD3's and FLUX's shapes say the whole config
    configs[denoiser].update(found.denoiser_config or {"in_channels": found.in_channels})
    tokenizers = [tokenizer_for(s, configs[s.name]) for s in text_slots(found.family)]
    index = read_json(folder / "model_index.json")
    options = {"force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True)}
    if found.variant:
        options["variant"] = found.variant
    return Recipe(found.family, configs, dict.fromkeys(configs, "shipped"), tokenizers, options)


def qwen25vl_image_processor(folder: Path | None = None):
    """Qwen2.5-VL's image processor (the PIL one: no torchvision), from a folder's config or ldm's
    copy of the release's (14-pixel patches merged 2x2, 3136 to 12845056 pixels)."""
    from transformers import Qwen2VLImageProcessorPil

    config = folder / "preprocessor_config.json" if folder is not None else None
    config = config if config is not None and config.is_file() else QWEN25VL_PROCESSOR / "preprocessor_config.json"
    data = {k: v for k, v in read_json(config).items() if k not in ("image_processor_type", "processor_class")}
    return Qwen2VLImageProcessorPil(**data)


def qwen25vl_tokenizer(folder: Path | None = None):
    """Qwen2.5-VL's tokenizer: a model folder's own `tokenizer/` when it has one, else ldm's copy
    (its tokenizer_config.json over the vocabulary and merges shipped once, beside Qwen3's)."""
    from transformers import AutoTokenizer

    if folder is not None and (folder / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return AutoTokenizer.from_pretrained(str(QWEN25VL_TOKENIZER), local_files_only=True, **QWEN25VL_FILES)


def tokenizer_for(slot: keymap.Slot, config: dict) -> tuple[Path, dict]:
    """T5's, Qwen3's, Mistral's (a Llama-named LLM slot holding Mistral) and Qwen2.5-VL's own; else
    CLIP's, padded with "!" for OpenCLIP models (plain GELU, like SD2's)."""
    if slot.kind == "qwen25vl":
        return QWEN25VL_TOKENIZER, QWEN25VL_FILES
    if slot.kind == "qwen3" and config.get("model_type") == "mistral":
        return MISTRAL_TOKENIZER, {}
    if slot.kind in ("t5", "qwen3"):
        return (T5_TOKENIZER if slot.kind == "t5" else QWEN3_TOKENIZER), {}
    return TOKENIZER, OPENCLIP_TOKENS if config.get("hidden_act") == "gelu" else {}


def flat(config: dict) -> dict:
    """A vision-language model's config with its text model's settings at the top, where a text
    encoder's are read (transformers 5 saves Qwen2.5-VL's under text_config)."""
    text = config.get("text_config")
    if not isinstance(text, dict):
        return config
    return {**{k: v for k, v in config.items() if k not in ("text_config", "vision_config")}, **text}


def config_file(folder: Path, name: str) -> Path:
    return folder / name / ("scheduler_config.json" if name == "scheduler" else "config.json")


def overlay(r: Recipe, configs: dict[str, dict], source: str) -> None:
    for name, config in configs.items():
        r.configs[name] = config
        r.sources[name] = source


def from_metadata(text: str, family: str) -> dict[str, dict]:
    """The configs a file carries in its own safetensors metadata (ldm's built-in model does)."""
    try:
        data = untrusted_json.loads(text, "the metadata", max_chars=len(text))  # the header's size was checked
    except untrusted_json.BadJson:
        data = None
    if not isinstance(data, dict) or not all(isinstance(v, dict) for k, v in data.items() if k != "family"):
        raise LdmError(f"the file's {METADATA_KEY} metadata is not a JSON table of component configs; the file is damaged")
    if data.get("family", family) != family:
        raise LdmError(f"the file's {METADATA_KEY} metadata describes a {data['family']} model, but its weights are {family}")
    return {k: v for k, v in data.items() if k in components(family)}


def from_folder(folder: Path, r: Recipe) -> dict[str, dict]:
    """--config DIR: a diffusers-layout folder; any component config it has wins."""
    if not folder.is_dir():
        raise LdmError(f"--config {str(folder)!r} is not a folder; pass a diffusers-layout model folder (configs are enough)")
    index = folder / "model_index.json"
    if index.exists():
        check_family(read_json(index), r.family, folder)
        r.options["force_zeros_for_empty_prompt"] = read_json(index).get("force_zeros_for_empty_prompt", True)
    found = {name: flat(read_json(config_file(folder, name))) for name in components(r.family)
             if config_file(folder, name).exists()}
    names = ["tokenizer"] + [f"tokenizer_{i + 1}" for i in range(1, len(r.tokenizers))]
    for i, name in enumerate(names):
        if (folder / name).is_dir():
            r.tokenizers[i] = (folder / name, {})
    if not found:
        raise LdmError(f"--config {str(folder)!r} has no component configs (unet/config.json, vae/config.json, ...)")
    return found


def check_family(index: dict, family: str, folder: Path) -> None:
    kind = PIPELINE_FAMILIES.get(index.get("_class_name"))
    if kind is not None and kind != (family if family in ("sdxl", "sd3", "flux", "chroma", "zimage", "flux2",
                                                           "qwen-image") else "sd"):
        raise LdmError(f"--config {str(folder)!r} describes a {index['_class_name']}, but the checkpoint is {family}; "
                       "pass a config folder of the same family")
