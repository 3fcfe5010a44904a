"""Tiny checkpoints in the original single-file layout (as A1111 and ComfyUI read them), made
from the tiny diffusers folders, for the loading tests.

The weights move with the package's own diffusers-to-original mapping (convert.to_original)
rather than a second hand-written copy of it: a copy by the same hand would share its mistakes.
What keeps this honest is the independent oracle in test_loading: diffusers' own
from_single_file reads every file written here back into exactly the weights it came from.

Around the weights go the extra keys real files carry, which a loader must ignore: an EMA copy
of the UNet (with different values, so loading it by mistake shows), the noise-schedule
buffers, CLIP's position_ids, and for OpenCLIP a text layer the model does not use (SD2's 24th)
and its unused projection.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ldm_cli.loading import convert, keymap


def component(folder: Path, name: str) -> torch.nn.Module:
    """One component of a diffusers folder, of the class its config names."""
    import importlib

    config = json.loads((folder / name / "config.json").read_text())
    library, cls = ("diffusers", config["_class_name"]) if "_class_name" in config else (
        "transformers", config["architectures"][0])
    return getattr(importlib.import_module(library), cls).from_pretrained(folder / name, local_files_only=True)


def components(folder: Path, family: str) -> list[torch.nn.Module]:
    """The denoiser, vae and the text encoders of a diffusers folder, in keymap.LAYOUTS order."""
    return [component(folder, slot.name) for slot in keymap.LAYOUTS[family]]


def original_state(folder: Path, family: str) -> dict[str, torch.Tensor]:
    unet, vae, *encoders = components(folder, family)
    return convert.to_original(family, unet, vae, encoders)


def write(folder: Path, path: Path, family: str, *, dtype: torch.dtype = torch.float32, extras: bool = True,
          metadata: dict[str, str] | None = None) -> Path:
    state = original_state(folder, family)
    if extras:
        state.update(extra_keys(state, family))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    convert.save_single_file(state, path, metadata or {})
    return path


def extra_keys(state: dict[str, torch.Tensor], family: str) -> dict[str, torch.Tensor]:
    if family in ("sd3", "flux", "chroma"):
        return sd3_extra_keys(state)
    generator = torch.Generator().manual_seed(7)
    unet = keymap.UNET.prefix
    out = {"model_ema." + k[len(unet):].replace(".", ""): torch.randn(v.shape, generator=generator)
           for k, v in state.items() if k.startswith(unet)}
    out["model_ema.decay"] = torch.tensor(0.9999)
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
    out.update(betas=betas, alphas_cumprod=torch.cumprod(1 - betas, 0))
    for slot in keymap.LAYOUTS[family]:
        if slot.kind == "clip":
            out[slot.prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
        if slot.kind == "openclip":
            out.update(unused_openclip_layer(state, slot.prefix))
    return out


def sd3_extra_keys(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """What Stability's SD3 files (and ComfyUI's FLUX ones) carry beside the weights: CLIP position
    ids, and a CLIP-L projection that neither applies (random here, so using it by mistake shows)."""
    out = {}
    for name in ("clip_l", "clip_g"):
        prefix = f"text_encoders.{name}.transformer."
        if prefix + "text_model.embeddings.token_embedding.weight" in state:
            out[prefix + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    width = state.get("text_encoders.clip_l.transformer.text_model.final_layer_norm.weight")
    if width is not None:
        generator = torch.Generator().manual_seed(8)
        out["text_encoders.clip_l.transformer.text_projection.weight"] = torch.randn(
            len(width), len(width), generator=generator)
    return out


def component_file(module: torch.nn.Module, kind: str, path: Path, *, dtype: torch.dtype = torch.float32,
                   prefix: str = "", extra: dict[str, torch.Tensor] | None = None) -> Path:
    """One component alone, as ComfyUI users keep them (clip_l.safetensors, t5xxl_fp16.safetensors,
    a VAE): its weights in the original layout under `prefix`, stored as `dtype`, plus `extra`."""
    state = {**convert.export(keymap.Slot("part", prefix, kind), module), **(extra or {})}
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    convert.save_single_file(state, path, {})
    return path


def unused_openclip_layer(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """One more resblock than the model has (the diffusers SD2 text encoder stops a layer early)."""
    blocks = prefix + "transformer.resblocks."
    layers = {int(k[len(blocks):].split(".")[0]) for k in state if k.startswith(blocks)}
    last, spare = f"{blocks}{max(layers)}.", f"{blocks}{max(layers) + 1}."
    out = {spare + k[len(last):]: v.flip(0) for k, v in state.items() if k.startswith(last)}
    width = state[prefix + "token_embedding.weight"].shape[1]
    if prefix + "text_projection" not in state:  # SD2 files carry one its text encoder does not use
        out[prefix + "text_projection"] = torch.ones(width, width)
    out[prefix + "logit_scale"] = torch.tensor(4.6052)
    return out


def ldm_metadata(folder: Path, family: str, defaults: dict | None = None) -> dict[str, str]:
    """The metadata ldm's built-in model carries: component configs (and recommended settings)."""
    config = {"family": family}
    for slot in keymap.LAYOUTS[family]:
        config[slot.name] = json.loads((folder / slot.name / "config.json").read_text())
    config["scheduler"] = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    out = {"ldm.config": json.dumps(config)}
    if defaults is not None:
        out["ldm.defaults"] = json.dumps(defaults)
    return out


def distinct_sdxl_pipeline():
    """Tiny SDXL whose two text encoders differ in width (32 and 48), as the real ones do (768,
    1280): diffusers' from_single_file tells them apart by width alone."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from tests import tiny_models

    base = tiny_models.sdxl_pipeline()
    torch.manual_seed(4)
    encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=49408, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=77, hidden_act="gelu", projection_dim=40, bos_token_id=49406, eos_token_id=49407,
        pad_token_id=1)).eval()
    torch.manual_seed(2)
    unet = UNet2DConditionModel.from_config(base.unet.config, cross_attention_dim=80,
                                            projection_class_embeddings_input_dim=6 * 8 + 40).eval()
    return StableDiffusionXLPipeline(vae=base.vae, text_encoder=base.text_encoder, text_encoder_2=encoder_2,
                                     tokenizer=base.tokenizer, tokenizer_2=base.tokenizer_2, unet=unet,
                                     scheduler=base.scheduler)
