"""Tiny random Stable-Diffusion-family models, built in code and saved as diffusers folders.

Real architectures (the same diffusers/transformers classes real checkpoints use) at toy width:
64x64 images, 8x8x4 latents (8x8x16 for SD3), a 49408-token CLIP vocabulary over 32-wide
encoders, SD3's T5 over the real 32128-token vocabulary. Widths keep the real models' relations
(CLIP-G wider than CLIP-L, T5 wider than both together) so they are told apart as real ones are.
"""
from __future__ import annotations

from pathlib import Path

import torch

from ldm_cli.loading.folder import load_tokenizer

TOKENIZER_DATA = Path(__file__).resolve().parent.parent / "ldm_cli" / "loading" / "configs" / "clip_tokenizer"

SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 clip_sample=False, set_alpha_to_one=False, steps_offset=1, skip_prk_steps=True,
                 timestep_spacing="leading")


def text_encoder(hidden_act: str = "quick_gelu", projection: bool = False, seed: int = 0, width: int = 32):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act=hidden_act,
                            projection_dim=width, bos_token_id=49406, eos_token_id=49407, pad_token_id=1)
    cls = CLIPTextModelWithProjection if projection else CLIPTextModel
    return cls(config).eval()


def vae(scaling_factor: float = 0.18215, seed: int = 1, force_upcast: bool = True, latent_channels: int = 4,
        **extra):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels, sample_size=64,
                         block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8,
                         down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                         scaling_factor=scaling_factor, force_upcast=force_upcast, **extra).eval()


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


# -- SD3 / SD3.5 ---------------------------------------------------------------------------------
T5_TOKENIZER = TOKENIZER_DATA.parent / "t5_tokenizer"
CLIP_L, CLIP_G, T5_WIDTH = 32, 48, 96  # real: 768, 1280, 4096


def sd3_vae(seed: int = 1):
    """16 latent channels, SD3's latent shift and scale, no quant convs (as SD3's VAE)."""
    return vae(1.5305, seed, latent_channels=16, shift_factor=0.0609, use_quant_conv=False,
               use_post_quant_conv=False)


def sd3_transformer(variant: str = "sd3", seed: int = 5):
    """SD3's MMDiT at toy width; sd35-medium adds dual attention (MMDiT-X) and RMS q/k norms,
    sd35-large the q/k norms alone."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    extra = {"sd3": {}, "sd35-medium": dict(dual_attention_layers=(0,), qk_norm="rms_norm"),
             "sd35-large": dict(qk_norm="rms_norm")}[variant]
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, out_channels=16, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=4, caption_projection_dim=32,
                                 joint_attention_dim=T5_WIDTH, pooled_projection_dim=CLIP_L + CLIP_G,
                                 pos_embed_max_size=16, **extra).eval()


def t5_encoder(seed: int = 6):
    """T5 v1.1's encoder (gated GELU, relative attention) over the real vocabulary, at toy width."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(vocab_size=32128, d_model=T5_WIDTH, d_ff=64, d_kv=8, num_heads=4, num_layers=2,
                      feed_forward_proj="gated-gelu", relative_attention_num_buckets=32,
                      relative_attention_max_distance=128, is_encoder_decoder=False, tie_word_embeddings=False)
    return T5EncoderModel(config).eval()


def t5_tokenizer():
    from transformers import T5TokenizerFast

    return T5TokenizerFast.from_pretrained(str(T5_TOKENIZER), local_files_only=True)


def sd3_pipeline(variant: str = "sd3", t5: bool = True):
    """A StableDiffusion3Pipeline (flow-matching Euler, shift 3); t5=False leaves text_encoder_3 out."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    return StableDiffusion3Pipeline(
        transformer=sd3_transformer(variant), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=sd3_vae(), text_encoder=text_encoder(projection=True, seed=3, width=CLIP_L), tokenizer=tokenizer(),
        text_encoder_2=text_encoder("gelu", True, seed=4, width=CLIP_G), tokenizer_2=tokenizer(True),
        text_encoder_3=t5_encoder() if t5 else None, tokenizer_3=t5_tokenizer() if t5 else None)


def tiny_sd3_folder(folder: Path, variant: str = "sd3", t5: bool = True) -> Path:
    """A tiny SD3 (or SD3.5-medium/large-like) model saved as a diffusers folder."""
    return save(sd3_pipeline(variant, t5), folder)


def save(pipe, folder: Path) -> Path:
    pipe.save_pretrained(folder, safe_serialization=True)
    return folder


# -- FLUX.1 dev / schnell ------------------------------------------------------------------------
FLUX_SCHEDULERS = {  # FLUX.1's own scheduler configs: dev shifts by image size, schnell does not
    "dev": dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                max_image_seq_len=4096),
    "schnell": dict(shift=1.0, use_dynamic_shifting=False, base_shift=0.5, max_shift=1.15, base_image_seq_len=256,
                    max_image_seq_len=4096),
}


def flux_vae(seed: int = 1):
    """16 latent channels, FLUX's latent shift and scale, no quant convs (as FLUX's ae)."""
    return vae(0.3611, seed, latent_channels=16, shift_factor=0.1159, use_quant_conv=False,
               use_post_quant_conv=False)


def flux_transformer(variant: str = "dev", seed: int = 7):
    """FLUX's transformer at toy width: one double-stream and one single-stream block, rotary
    axes (4, 6, 6) over 16-wide heads; dev has the guidance embedding."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                  pooled_projection_dim=CLIP_L, guidance_embeds=variant == "dev",
                                  axes_dims_rope=(4, 6, 6)).eval()


def flux_pipeline(variant: str = "dev", t5: bool = True):
    """A FluxPipeline with FLUX.1 dev's or schnell's scheduler; t5=False leaves text_encoder_2 out."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return FluxPipeline(transformer=flux_transformer(variant), vae=flux_vae(),
                        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULERS[variant]),
                        text_encoder=text_encoder(seed=3, width=CLIP_L), tokenizer=tokenizer(),
                        text_encoder_2=t5_encoder() if t5 else None, tokenizer_2=t5_tokenizer() if t5 else None)


# -- Chroma --------------------------------------------------------------------------------------
def chroma_transformer(seed: int = 8):
    """Chroma's transformer at toy width: FLUX's blocks without their modulations, the timestep's
    modulations from a 2-layer approximator 32 wide; rotary axes (4, 6, 6) over 16-wide heads."""
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    return ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                    axes_dims_rope=(4, 6, 6), approximator_num_channels=16,
                                    approximator_hidden_dim=32, approximator_layers=2).eval()


def chroma_pipeline():
    """A ChromaPipeline with the shipped scheduler config (FLUX.1 dev's dynamic shift) and FLUX's VAE."""
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    return ChromaPipeline(transformer=chroma_transformer(), vae=flux_vae(),
                          scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULERS["dev"]),
                          text_encoder=t5_encoder(), tokenizer=t5_tokenizer())


# -- Z-Image -------------------------------------------------------------------------------------
QWEN3_TOKENIZER = TOKENIZER_DATA.parent / "qwen3_tokenizer"
QWEN3_WIDTH = 32
ZIMAGE_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)  # Turbo's


def qwen3_encoder(seed: int = 8):
    """Qwen3 over the real 151,936-token vocabulary at toy width: two layers (the pipeline reads the
    second-to-last hidden state), grouped-query attention as Qwen3-4B's."""
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=151936, hidden_size=QWEN3_WIDTH, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    return Qwen3Model(config).eval()


def qwen3_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(QWEN3_TOKENIZER), local_files_only=True)


def zimage_transformer(seed: int = 9):
    """Z-Image's transformer at toy width: one refiner layer each for image and caption, one main
    layer, rotary axes (4, 6, 6) over 16-wide heads."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    model = ZImageTransformer2DModel(dim=32, n_layers=1, n_refiner_layers=1, n_heads=2, n_kv_heads=2,
                                     cap_feat_dim=QWEN3_WIDTH, axes_dims=[4, 6, 6], axes_lens=[1536, 512, 512]).eval()
    with torch.no_grad():  # its pad tokens start at zeros; random ones show a wrongly padded sequence
        model.x_pad_token.normal_()
        model.cap_pad_token.normal_()
    return model


def zimage_pipeline():
    """A ZImagePipeline with Z-Image Turbo's scheduler and FLUX's VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline

    return ZImagePipeline(transformer=zimage_transformer(), vae=flux_vae(),
                          scheduler=FlowMatchEulerDiscreteScheduler(**ZIMAGE_SCHEDULER),
                          text_encoder=qwen3_encoder(), tokenizer=qwen3_tokenizer())


# -- FLUX.2 klein --------------------------------------------------------------------------------
# FLUX.2 klein's scheduler config: the pipeline computes the dynamic shift's mu itself
FLUX2_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                       base_image_seq_len=256, max_image_seq_len=4096)
FLUX2_LATENTS = 8  # the VAE's latent channels at toy size (FLUX.2's are 32); 4x packed


def flux2_vae(seed: int = 11):
    """FLUX.2's VAE at toy width; random BatchNorm statistics, so that a latent not normalised (or
    normalised over the wrong channels) shows."""
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(seed)
    model = AutoencoderKLFlux2(in_channels=3, out_channels=3, latent_channels=FLUX2_LATENTS, sample_size=64,
                               block_out_channels=(8, 16, 16, 16), layers_per_block=1, norm_num_groups=8).eval()
    with torch.no_grad():
        model.bn.running_mean.normal_(0, 0.5)
        model.bn.running_var.uniform_(0.25, 4.0)
    return model


def flux2_transformer(seed: int = 12):
    """FLUX.2's transformer at toy width: one double-stream and one single-stream block, four rotary
    axes over 16-wide heads, reading Qwen3's three layers side by side; no guidance embedding (klein)."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(in_channels=4 * FLUX2_LATENTS, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2, joint_attention_dim=3 * QWEN3_WIDTH,
                                    axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False).eval()
    with torch.no_grad():  # at toy width its gates start near zero and the prompt barely shows: open them
        for modulation in (model.double_stream_modulation_img, model.double_stream_modulation_txt,
                           model.single_stream_modulation):
            modulation.linear.weight.mul_(10)
    return model


def klein_qwen3(seed: int = 13):
    """Qwen3 as klein ships it (Qwen3ForCausalLM) at toy width, deep enough for the pipeline's
    layers 9, 18 and 27."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=151936, hidden_size=QWEN3_WIDTH, intermediate_size=64, num_hidden_layers=28,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                         tie_word_embeddings=True)
    return Qwen3ForCausalLM(config).eval()


def flux2_klein_pipeline(distilled: bool = True):
    """A Flux2KleinPipeline, step-distilled or base."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline

    return Flux2KleinPipeline(transformer=flux2_transformer(), vae=flux2_vae(),
                              scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER),
                              text_encoder=klein_qwen3(), tokenizer=qwen3_tokenizer(), is_distilled=distilled)


# -- FLUX.2 dev ----------------------------------------------------------------------------------
MISTRAL_WIDTH = 32


def mistral3(seed: int = 14):
    """Mistral Small 3.x as FLUX.2 dev ships it (Mistral3ForConditionalGeneration: a Pixtral vision
    tower the pipeline never uses) at toy width over Tekken's 131,072 tokens, 31 layers deep for
    the pipeline's 10/20/30."""
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration, MistralConfig, PixtralVisionConfig

    torch.manual_seed(seed)
    text = MistralConfig(vocab_size=131072, hidden_size=MISTRAL_WIDTH, intermediate_size=64, num_hidden_layers=31,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=1024,
                         rope_theta=1e9)
    vision = PixtralVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 head_dim=8, image_size=32, patch_size=16)
    config = Mistral3Config(text_config=text.to_dict(), vision_config=vision.to_dict(), spatial_merge_size=1)
    return Mistral3ForConditionalGeneration(config).eval()


def flux2_dev_transformer(seed: int = 15):
    """klein's toy transformer with dev's guidance embedding, reading Mistral's three layers side by side."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    model = Flux2Transformer2DModel(in_channels=4 * FLUX2_LATENTS, num_layers=1, num_single_layers=1,
                                    attention_head_dim=16, num_attention_heads=2,
                                    joint_attention_dim=3 * MISTRAL_WIDTH, axes_dims_rope=(4, 4, 4, 4),
                                    guidance_embeds=True).eval()
    with torch.no_grad():  # open the gates, as for klein; the guidance embedding's too, so that --guidance shows
        for modulation in (model.double_stream_modulation_img, model.double_stream_modulation_txt,
                           model.single_stream_modulation):
            modulation.linear.weight.mul_(10)
        model.time_guidance_embed.guidance_embedder.linear_2.weight.mul_(10)
    return model


def flux2_dev_pipeline():
    """A Flux2Pipeline with ldm's Tekken tokenizer (FLUX.2 dev's folder ships the same vocabulary)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline

    from ldm_cli.loading import tekken

    return Flux2Pipeline(transformer=flux2_dev_transformer(), vae=flux2_vae(),
                         scheduler=FlowMatchEulerDiscreteScheduler(**FLUX2_SCHEDULER), text_encoder=mistral3(),
                         tokenizer=tekken.load())


# -- Qwen-Image ----------------------------------------------------------------------------------
QWEN25VL_WIDTH = 32
QWEN_IMAGE_SCHEDULER = dict(  # Qwen-Image's (and 2512's) scheduler_config.json
    base_image_seq_len=256, base_shift=0.5, max_image_seq_len=8192, max_shift=0.9, num_train_timesteps=1000,
    shift=1.0, shift_terminal=0.02, time_shift_type="exponential", use_dynamic_shifting=True)


def qwen25vl_encoder(seed: int = 10):
    """Qwen2.5-VL at toy width with its (one-block) vision tower, as Qwen-Image's text_encoder/ holds
    the whole model: two text layers, grouped-query attention, multimodal rotary sections (1, 1, 2)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    config = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=152064, hidden_size=QWEN25VL_WIDTH, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, tie_word_embeddings=False),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=QWEN25VL_WIDTH,
                           fullatt_block_indexes=[0]))
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def qwen25vl_tokenizer():
    from ldm_cli.loading.recipe import qwen25vl_tokenizer as shipped

    return shipped()


def qwen_image_transformer(seed: int = 11):
    """Qwen-Image's transformer at toy width: one double-stream block, rotary axes (4, 6, 6) over
    16-wide heads."""
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=1,
                                       attention_head_dim=16, num_attention_heads=2,
                                       joint_attention_dim=QWEN25VL_WIDTH, axes_dims_rope=(4, 6, 6)).eval()


def qwen_image_vae(seed: int = 12):
    """Qwen-Image's video VAE at toy width: the release's levels and blocks (3 downsamplings, 8x; the
    layout diffusers' Wan converter assumes), per-channel latent statistics."""
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(seed)
    return AutoencoderKLQwenImage(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2,
                                  temperal_downsample=[False, True, True]).eval()


def qwen_image_pipeline():
    """A QwenImagePipeline with Qwen-Image's scheduler."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline

    return QwenImagePipeline(transformer=qwen_image_transformer(), vae=qwen_image_vae(),
                             scheduler=FlowMatchEulerDiscreteScheduler(**QWEN_IMAGE_SCHEDULER),
                             text_encoder=qwen25vl_encoder(), tokenizer=qwen25vl_tokenizer())
