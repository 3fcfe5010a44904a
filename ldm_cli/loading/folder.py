"""diffusers-layout folders: model_index.json plus one subfolder per component."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ldm_cli.errors import LdmError

if TYPE_CHECKING:
    from ldm_cli.model import Model

PIPELINE_FAMILIES = {
    "StableDiffusionPipeline": "sd", "StableDiffusionInpaintPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl", "StableDiffusionXLInpaintPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
}


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise LdmError(f"{str(path.parent)!r} is not a diffusers model folder: it has no {path.name}") from None
    except (OSError, ValueError) as e:
        raise LdmError(f"cannot read {str(path)!r} ({e})") from None


def sd_family_name(text_encoder_config: dict) -> str:
    """SD2's OpenCLIP encoder uses plain GELU; SD1's OpenAI CLIP uses quick GELU."""
    return "sd2" if text_encoder_config.get("hidden_act") == "gelu" else "sd1"


def load_tokenizer(folder: Path, **overrides):
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True, **overrides)


def load_folder(folder: Path, device: torch.device, options) -> Model:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from ldm_cli import device as devices
    from ldm_cli import families, hashing
    from ldm_cli.model import Model

    index = read_json(folder / "model_index.json")
    kind = PIPELINE_FAMILIES.get(index.get("_class_name"))
    if kind is None:
        raise LdmError(f"{str(folder)!r} holds a {index.get('_class_name')!r}, which ldm does not run; supported: {', '.join(sorted(PIPELINE_FAMILIES))}")
    name = "sdxl" if kind == "sdxl" else sd_family_name(read_json(folder / "text_encoder" / "config.json"))
    family = families.get(name)
    dtype = devices.pick_dtype(options.dtype, device, family.cuda_dtype)
    common = {"local_files_only": True}
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", torch_dtype=dtype, **common)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=dtype, **common)
    encoders = [CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype, **common)]
    tokenizers = [load_tokenizer(folder / "tokenizer")]
    if name == "sdxl":
        encoders.append(CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", dtype=dtype, **common))
        tokenizers.append(load_tokenizer(folder / "tokenizer_2"))
    scheduler_config = read_json(folder / "scheduler" / "scheduler_config.json")
    if options.prediction:
        scheduler_config["prediction_type"] = {"v": "v_prediction"}.get(options.prediction, options.prediction)
    weights = next((folder / "unet").glob("*.safetensors"), None)
    model = Model(family=family, denoiser=unet, vae=vae, text_encoders=encoders, tokenizers=tokenizers,
                  scheduler_config=scheduler_config, name=folder.name,
                  hash=hashing.short_hash(weights) if weights else None, path=str(folder),
                  options={"force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True)})
    if options.vae:
        from ldm_cli.loading import single_file

        # a single-file VAE has no config: it takes the replaced VAE's (its latent scaling)
        model.vae = single_file.load_vae(Path(options.vae), dtype, dict(model.vae.config), options.allow_pickle)
    return to_device(model, device)


def to_device(model, device: torch.device):
    for module in (model.denoiser, model.vae, *model.text_encoders):
        module.to(device).eval().requires_grad_(False)
    return model
