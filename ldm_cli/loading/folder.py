"""diffusers-layout folders: model_index.json plus one subfolder per component.

SD1/SD2 and SDXL folders hold a `unet/`; SD3 folders a `transformer/` and up to three text
encoders, of which the third (T5) may be left out: the model then runs without T5. FLUX folders
hold a `transformer/`, CLIP-L and T5 (`text_encoder_2/`, required: FLUX never runs without T5);
Chroma folders a `transformer/` and T5 alone (`text_encoder/`, required likewise); Z-Image folders
a `transformer/` and Qwen3 (`text_encoder/`; its `tokenizer/`, or ldm's copy); FLUX.2 klein folders
likewise, with FLUX.2's own VAE (AutoencoderKLFlux2), and FLUX.2 dev's with Mistral Small 3.x
(`text_encoder/`, of which only the language model is read; its `tokenizer/`, or ldm's Tekken); Qwen-Image folders a `transformer/`,
Qwen2.5-VL (`text_encoder/`, of which only the text model is read; its `tokenizer/`, or ldm's
copy) and their own video VAE (AutoencoderKLQwenImage)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ldm_cli import files
from ldm_cli.errors import LdmError
from ldm_cli.loading import tensors
from ldm_cli.loading.recipe import (PIPELINE_FAMILIES, QWEN3_TOKENIZER, qwen25vl_image_processor,
                                   qwen25vl_tokenizer, read_json, sdxl_variant)
from ldm_cli.notes import note

if TYPE_CHECKING:
    from ldm_cli.model import Model

T5_TOKENIZER = Path(__file__).resolve().parent / "configs" / "t5_tokenizer"


def sd_family_name(text_encoder_config: dict) -> str:
    """SD2's OpenCLIP encoder uses plain GELU; SD1's OpenAI CLIP uses quick GELU."""
    return "sd2" if text_encoder_config.get("hidden_act") == "gelu" else "sd1"


def load_tokenizer(folder: Path, **overrides):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **overrides)


def _unet_parts(folder: Path, name: str, dtype: torch.dtype, options) -> tuple:
    """(U-Net, text encoders, tokenizers) of an SD1/SD2/SDXL folder (an SDXL refiner's: CLIP-G alone)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, local_files_only=True)
    encoders, tokenizers = [], []
    if name != "sdxl" or not _refiner(folder):
        encoders.append(CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype, local_files_only=True))
        tokenizers.append(load_tokenizer(folder / "tokenizer"))
    if name == "sdxl":
        encoders.append(CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", dtype=dtype,
                                                                    local_files_only=True))
        tokenizers.append(load_tokenizer(folder / "tokenizer_2"))
    return unet, encoders, tokenizers


def _refiner(folder: Path) -> bool:
    return sdxl_variant(read_json(folder / "model_index.json")) is not None


def _sd3_parts(folder: Path, name: str, dtype: torch.dtype, options) -> tuple:
    """(transformer, [CLIP-L, CLIP-G, T5 or None], their tokenizers) of an SD3 folder."""
    from diffusers import SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    transformer = SD3Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype,
                                                        local_files_only=True)
    encoders = [CLIPTextModelWithProjection.from_pretrained(folder / sub, dtype=dtype, local_files_only=True)
                for sub in ("text_encoder", "text_encoder_2")]
    tokenizers = [load_tokenizer(folder / "tokenizer"), load_tokenizer(folder / "tokenizer_2")]
    if options.without_t5:  # every image of the run asked --no-t5: T5's 9.5 GB are not read
        return transformer, [*encoders, None], [*tokenizers, None]
    t5, t5_tokenizer = _t5(folder, dtype, "_3", optional=True)
    return transformer, [*encoders, t5], [*tokenizers, t5_tokenizer]


def _flux_parts(folder: Path, name: str, dtype: torch.dtype, options) -> tuple:
    """(transformer, [CLIP-L, T5], their tokenizers) of a FLUX folder."""
    from diffusers import FluxTransformer2DModel
    from transformers import CLIPTextModel

    transformer = FluxTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype,
                                                         local_files_only=True)
    clip = CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype, local_files_only=True)
    t5, t5_tokenizer = _t5(folder, dtype, "_2", optional=False, family="FLUX")
    return transformer, [clip, t5], [load_tokenizer(folder / "tokenizer"), t5_tokenizer]


def _qwen3_parts(folder: Path, name: str, dtype: torch.dtype, options) -> tuple:
    """(transformer, [Qwen3], [its tokenizer]) of a Z-Image or FLUX.2 klein folder."""
    import diffusers
    from transformers import AutoTokenizer, Qwen3Model

    transformer = getattr(diffusers, TRANSFORMERS[name]).from_pretrained(folder, subfolder="transformer",
                                                                          torch_dtype=dtype, local_files_only=True)
    # Qwen3Model: klein's Qwen3ForCausalLM without its language-model head, which no pipeline reads
    qwen = Qwen3Model.from_pretrained(folder / "text_encoder", dtype=dtype, local_files_only=True)
    tokenizer = folder / "tokenizer"
    tokenizer = tokenizer if (tokenizer / "tokenizer_config.json").exists() else QWEN3_TOKENIZER
    return transformer, [qwen], [AutoTokenizer.from_pretrained(str(tokenizer), local_files_only=True)]


# Mistral3ForConditionalGeneration's language model, under either name transformers has saved it by
MISTRAL_KEYS = {r"^model\.language_model\.": "", r"^language_model\.model\.": ""}


def _flux2_parts(folder: Path, name: str, dtype: torch.dtype, options) -> tuple:
    """klein's parts (_qwen3_parts), or dev's: (transformer, [Mistral Small's language model], [its
    tokenizer]); the pipeline reads hidden states only, so the vision tower and LM head stay on disk."""
    from diffusers import Flux2Transformer2DModel
    from transformers import MistralModel

    from ldm_cli.loading import tekken

    if read_json(folder / "model_index.json").get("_class_name") != "Flux2Pipeline":
        return _qwen3_parts(folder, name, dtype, options)
    transformer = Flux2Transformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype,
                                                          local_files_only=True)
    mistral = MistralModel.from_pretrained(folder / "text_encoder", dtype=dtype, local_files_only=True,
                                           key_mapping=MISTRAL_KEYS)
    return transformer, [mistral], [tekken.load(folder / "tokenizer")]


def _qwen_image_parts(folder: Path, name: str, dtype: torch.dtype, options) -> tuple:
    """(transformer, [Qwen2.5-VL], [its tokenizer (and image processor)]) of a Qwen-Image folder:
    Qwen-Image reads text only, so the vision tower's weights are left on disk; its Edit models
    read the input images with it (the whole model, and the folder's processor/ config or ldm's)."""
    from diffusers import QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLTextModel

    from ldm_cli.loading import qwen_image

    transformer = QwenImageTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype,
                                                              local_files_only=True)
    tokenizer = qwen25vl_tokenizer(folder / "tokenizer")
    if qwen_image.variant_of_index(read_json(folder / "model_index.json")) is None:
        return transformer, [Qwen2_5_VLTextModel.from_pretrained(folder / "text_encoder", dtype=dtype,
                                                                 local_files_only=True)], [tokenizer]
    qwen = Qwen2_5_VLForConditionalGeneration.from_pretrained(folder / "text_encoder", dtype=dtype,
                                                              local_files_only=True)
    return transformer, [qwen], [tokenizer, qwen25vl_image_processor(folder / "processor")]


def _chroma_parts(folder: Path, name: str, dtype: torch.dtype, options) -> tuple:
    """(transformer, [T5], [its tokenizer]) of a Chroma folder."""
    from diffusers import ChromaTransformer2DModel

    transformer = ChromaTransformer2DModel.from_pretrained(folder, subfolder="transformer", torch_dtype=dtype,
                                                           local_files_only=True)
    t5, t5_tokenizer = _t5(folder, dtype, "", optional=False, family="Chroma")
    return transformer, [t5], [t5_tokenizer]


def _t5(folder: Path, dtype: torch.dtype, suffix: str, optional: bool, family: str = "") -> tuple:
    """(T5 encoder, its tokenizer) from text_encoder<suffix>/; when the folder has none, (None,
    None) with a note where the model runs without T5 (SD3), else an error (FLUX, Chroma, never
    trained without it: a single file without T5 is refused alike)."""
    from transformers import T5EncoderModel, T5TokenizerFast

    if not (folder / f"text_encoder{suffix}" / "config.json").exists():
        if not optional:
            raise LdmError(f"{folder.name} has no T5-XXL text encoder (text_encoder{suffix}/), which {family} needs; "
                           f"add the release's text_encoder{suffix}/ and tokenizer{suffix}/ folders to it")
        note(f"{folder.name} has no T5 text encoder (text_encoder{suffix}): running without T5, as --no-t5 does")
        return None, None
    tokenizer_folder = folder / f"tokenizer{suffix}"
    tokenizer_folder = tokenizer_folder if tokenizer_folder.is_dir() else T5_TOKENIZER
    return (T5EncoderModel.from_pretrained(folder / f"text_encoder{suffix}", dtype=dtype, local_files_only=True),
            T5TokenizerFast.from_pretrained(str(tokenizer_folder), local_files_only=True))


def _defaults(folder: Path, name: str, variant: str | None, scheduler_config: dict, encoders: list) -> dict:
    """SD3's, FLUX's, Chroma's and Z-Image's recommended settings; a folder cannot say it holds SD3's
    turbo model but by its name."""
    from ldm_cli.families import chroma, flux, flux2, qwen_image, sd3, zimage

    if name == "chroma":
        return chroma.defaults(scheduler_config)
    if name == "qwen-image":
        return qwen_image.defaults(scheduler_config)
    if name in ("flux", "flux2", "zimage"):
        return {"flux": flux, "flux2": flux2, "zimage": zimage}[name].defaults(variant, scheduler_config)
    if name != "sd3":
        return {}
    return sd3.defaults("turbo" in folder.name.lower(), scheduler_config.get("shift", 3.0), encoders[2] is not None)


def _variant(folder: Path, index: dict, name: str, given: str | None) -> str | None:
    """The folder's variant, before its weights load: --variant's (`given`), else its
    model_index.json's pipeline (SDXL's refiner too), its transformer's config (SD3, FLUX) or, for
    Z-Image, its name."""
    from ldm_cli.families import flux, sd3
    from ldm_cli.loading import flux2, qwen_image, variants, zimage

    found = {"flux2": lambda: flux2.variant_of_index(index), "zimage": lambda: zimage.variant(folder.name),
             "sd3": lambda: sd3.variant(read_json(folder / "transformer" / "config.json")),
             "flux": lambda: flux.variant(read_json(folder / "transformer" / "config.json")),
             "qwen-image": lambda: qwen_image.variant_of_index(index),
             "sdxl": lambda: sdxl_variant(index)}.get(name, lambda: None)()
    return variants.told(name, found, given)


def _options(index: dict, name: str, variant: str | None) -> dict:
    if name in ("sd3", "flux", "zimage", "flux2", "qwen-image"):
        return {"variant": variant} if variant else {}
    zeros = {"force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True)}
    return {**zeros, "variant": variant} if variant else zeros  # SDXL's refiner


PARTS = {"sd3": _sd3_parts, "flux": _flux_parts, "chroma": _chroma_parts,  # DiT families: a transformer/, not a unet/
         "zimage": _qwen3_parts, "flux2": _flux2_parts, "qwen-image": _qwen_image_parts}
TRANSFORMERS = {"zimage": "ZImageTransformer2DModel", "flux2": "Flux2Transformer2DModel"}
# diffusers' VAE class where a family's is not AutoencoderKL
VAES = {"flux2": "AutoencoderKLFlux2", "qwen-image": "AutoencoderKLQwenImage"}
# the subfolders each family loads (T5's, optional in SD3 and checked by _t5 in FLUX, when present)
SUBFOLDERS = {"sd1": ["unet", "vae", "text_encoder"], "sd2": ["unet", "vae", "text_encoder"],
              "sdxl": ["unet", "vae", "text_encoder", "text_encoder_2"],
              "sd3": ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"],
              "flux": ["transformer", "vae", "text_encoder", "text_encoder_2"],
              "chroma": ["transformer", "vae", "text_encoder"], "zimage": ["transformer", "vae", "text_encoder"],
              "flux2": ["transformer", "vae", "text_encoder"], "qwen-image": ["transformer", "vae", "text_encoder"]}
T5_PARTS = {"sd3": "text_encoder_3", "flux": "text_encoder_2", "chroma": "text_encoder"}


def check_parts(folder: Path, name: str, options) -> None:
    """Each part the folder's family loads, before any is: its config.json a JSON object and its
    weights there, regular files with sound safetensors headers (as a single file's are checked),
    so a missing or truncated part is one line naming it rather than a library's traceback."""
    for sub in SUBFOLDERS[name]:
        if sub == "text_encoder" and name == "sdxl" and _refiner(folder):
            continue  # a refiner reads CLIP-G (text_encoder_2) alone
        if sub == T5_PARTS.get(name) and not (folder / sub / "config.json").exists():
            continue  # _t5 says what a missing T5 means for the family
        if sub == T5_PARTS.get(name) and options.without_t5 and name == "sd3":
            continue  # not read: SD3 runs without it
        read_json(folder / sub / "config.json")
        for weights in _weight_files(folder / sub):
            files.check_openable(weights)
            if not weights.exists():
                raise LdmError(f"{str(weights)!r} is missing; the model folder is incomplete, download it again")
            tensors.read_header(weights)


def _weight_files(part: Path) -> list[Path]:
    """The safetensors files a part's library reads: one file, or the shards its index names."""
    stem = "model" if part.name.startswith("text_encoder") else "diffusion_pytorch_model"
    single, index = part / f"{stem}.safetensors", part / f"{stem}.safetensors.index.json"
    if index.exists():
        shards = read_json(index).get("weight_map")
        if not isinstance(shards, dict) or not all(isinstance(v, str) and "/" not in v for v in shards.values()):
            raise LdmError(f"{str(index)!r} has no weight_map of file names; download it again")
        return [part / shard for shard in sorted(set(shards.values()))]
    if single.exists() or (part / f"{stem}.bin").exists():  # a .bin is the library's own to refuse or read
        return [single] if single.exists() else []
    raise LdmError(f"{str(part)!r} has no weights ({single.name}); the model folder is incomplete, download it again")


def load_folder(folder: Path, device: torch.device, options) -> Model:
    import diffusers

    from ldm_cli import device as devices
    from ldm_cli import families, hashing, memory
    from ldm_cli.model import Model

    index = read_json(folder / "model_index.json")
    kind = PIPELINE_FAMILIES.get(index.get("_class_name"))
    if kind is None:
        raise LdmError(f"{str(folder)!r} holds a {index.get('_class_name')!r}, which ldm does not run; supported: {', '.join(sorted(PIPELINE_FAMILIES))}")
    name = kind if kind != "sd" else sd_family_name(read_json(folder / "text_encoder" / "config.json"))
    check_parts(folder, name, options)
    variant = _variant(folder, index, name, options.variant)
    family = families.get(name)
    dtype = devices.pick_dtype(options.dtype, device, family.cuda_dtype)
    denoiser, encoders, tokenizers = PARTS.get(name, _unet_parts)(folder, name, dtype, options)
    vae_class = getattr(diffusers, VAES.get(name, "AutoencoderKL"))
    vae = vae_class.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, local_files_only=True)
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    if options.prediction:
        scheduler_config["prediction_type"] = {"v": "v_prediction"}.get(options.prediction, options.prediction)
    weights = next((folder / ("transformer" if name in PARTS else "unet")).glob("*.safetensors"), None)
    model = Model(family=family, denoiser=denoiser, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                  scheduler_config=scheduler_config, name=folder.name,
                  hash=hashing.short_hash(weights) if weights else None, path=str(folder),
                  defaults=_defaults(folder, name, variant, scheduler_config, encoders),
                  options=_options(index, name, variant))
    if options.vae:
        from ldm_cli.loading import vae_file

        # a single-file VAE has no config: it takes the replaced VAE's (its latent scaling)
        model.vae = vae_file.load_vae(Path(options.vae), dtype, dict(model.vae.config), options.allow_pickle)
    return to_device(model, memory.load_device(device, options))


def to_device(model, device: torch.device):
    for module in (model.denoiser, model.vae, *model.text_encoders):
        if module is not None:  # None: a text encoder run without (SD3's T5)
            module.to(device).eval().requires_grad_(False)
    return model
