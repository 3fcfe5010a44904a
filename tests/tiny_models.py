"""Tiny random Stable-Diffusion-family models, built in code and saved as diffusers folders.

Real architectures (the same diffusers/transformers classes real checkpoints use) at toy width:
64x64 images, 8x8x4 latents, a 49408-token CLIP vocabulary over 32-wide encoders.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ldm_cli.loading.folder import load_tokenizer

TOKENIZER_DATA = Path(__file__).resolve().parent.parent / "ldm_cli" / "loading" / "configs" / "clip_tokenizer"

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True,
                 timestep_spacing="leading")


def text_encoder(hidden_act: str = "quick_gelu", projection: bool = False, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act=hidden_act,
                            projection_dim=32, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def vae(scaling_factor: float = 0.18215, seed: int = 1, force_upcast: bool = True):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=64,
                         block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         scaling_factor=scaling_factor, force_upcast=force_upcast).eval()


def unet(cross_attention_dim: int = 32, in_channels: int = 4, sdxl: bool = False, seed: int = 2):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    extra = {}
    if sdxl:
        extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                     projection_class_embeddings_input_dim=6 * 8 + 32, use_linear_projection=True)
    return UNet2DConditionModel(sample_size=8, in_channels=in_channels, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=cross_attention_dim,
                                attention_head_dim=4 if not sdxl else (2, 4),
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), **extra).eval()


def tokenizer(openclip: bool = False):
    # OpenCLIP (SD2, SDXL's second encoder) pads with "!" rather than the end token.
    return load_tokenizer(TOKENIZER_DATA, **({"pad_token": "!"} if openclip else {}))


def sd_pipeline(kind: str = "sd1", inpainting: bool = False):
    """kind: sd1 (epsilon, quick GELU) or sd2 (v-prediction, GELU, "!" padding)."""
    from diffusers import DDIMScheduler, StableDiffusionInpaintPipeline, StableDiffusionPipeline

    sd2 = kind == "sd2"
    cls = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    scheduler = DDIMScheduler(**{k: v for k, v in SCHEDULER.items() if k != "skip_prk_steps"},
                              prediction_type="v_prediction" if sd2 else "epsilon")
    return cls(vae=vae(), text_encoder=text_encoder("gelu" if sd2 else "quick_gelu"), tokenizer=tokenizer(sd2),
               unet=unet(in_channels=9 if inpainting else 4), scheduler=scheduler, safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)


def sdxl_pipeline(inpainting: bool = False):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline

    cls = StableDiffusionXLInpaintPipeline if inpainting else StableDiffusionXLPipeline
    scheduler = EulerDiscreteScheduler(**{k: v for k, v in SCHEDULER.items() if k not in ("skip_prk_steps", "clip_sample", "set_alpha_to_one")})
    return cls(vae=vae(0.13025), text_encoder=text_encoder(seed=3), text_encoder_2=text_encoder("gelu", True, seed=4),
               tokenizer=tokenizer(), tokenizer_2=tokenizer(True), unet=unet(64, 9 if inpainting else 4, sdxl=True),
               scheduler=scheduler)


def save(pipe, folder: Path) -> Path:
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder
