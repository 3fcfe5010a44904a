"""The built-in model's shape: Stable Diffusion 1's classes and scheduler at toy scale.

Sized for a 2-core CPU: 20 guided steps of one 64x64 image in under half a second, and a file
under 16 MB in fp16 (the text encoder's 49408-token embedding is most of it).
"""
from __future__ import annotations

from typing import Any

from ldm_cli.demo import scenes

TOKENIZER = "clip_tokenizer"  # the real CLIP BPE vocabulary, in ldm_cli/loading/configs/


def vae_config() -> dict[str, Any]:
    """4 blocks = 8x downsampling to an 8x8x4 latent; scaling_factor is set from the data later."""
    return {
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [16, 32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8,
        "sample_size": scenes.SIZE, "scaling_factor": 1.0,
    }


def unet_config(context_dim: int = 64) -> dict[str, Any]:
    """Three levels, 8x8 -> 4x4 -> 2x2, cross-attention at the first two and in the middle (at
    2x2, where each cell is a corner of the picture and where the text says to put a shape is
    easiest to act on); plain ResNet blocks at 2x2."""
    return {
        "sample_size": scenes.SIZE // 8, "in_channels": 4, "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "block_out_channels": [32, 64, 64], "layers_per_block": 1, "norm_num_groups": 8,
        "cross_attention_dim": context_dim, "attention_head_dim": 2,
    }


def text_config() -> dict[str, Any]:
    """OpenAI-CLIP style (quick GELU, pad = end-of-text), as SD1's encoder."""
    return {
        "vocab_size": 49408, "hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2,
        "num_attention_heads": 4, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
        "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407, "projection_dim": 64,
    }


def scheduler_config() -> dict[str, Any]:
    """Stable Diffusion's own training schedule."""
    return {
        "_class_name": "PNDMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
        "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "clip_sample": False,
    }


def autoencoder(config: dict[str, Any] | None = None):
    from diffusers import AutoencoderKL

    return AutoencoderKL(**(config or vae_config()))


def denoiser():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**unet_config(text_config()["hidden_size"]))


def text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    return CLIPTextModel(CLIPTextConfig(**text_config()))


def tokenizer():
    from pathlib import Path

    from ldm_cli.loading.folder import load_tokenizer

    return load_tokenizer(Path(__file__).resolve().parent.parent / "loading" / "configs" / TOKENIZER)
