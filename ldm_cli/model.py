"""A loaded model: its components, its family and what it recommends."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ldm_cli.families.family import Family


@dataclass
class Model:
    family: Family
    denoiser: torch.nn.Module  # UNet2DConditionModel, or a DiT (SD3Transformer2DModel, FluxTransformer2DModel)
    vae: torch.nn.Module  # AutoencoderKL (FLUX.2: AutoencoderKLFlux2; Qwen-Image: AutoencoderKLQwenImage)
    text_encoders: list[torch.nn.Module | None]  # None: a part run without (SD3's T5); [] once freed
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    name: str
    hash: str | None = None  # A1111 short hash: first 10 hex of the file's sha256
    path: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # recommended steps, cfg, scheduler
    options: dict[str, Any] = field(default_factory=dict)  # family switches (e.g. SDXL's zeroed empty negative)
    modules: list[str] = field(default_factory=list)  # parts given as separate files: Forge's "Module N"
    embeddings: Any = None  # textual inversion: a clip_text.EmbeddingLookup read as prompts are tokenized
    networks: Any = None  # its LoRAs and embeddings for the run (networks.session.Session)
    encoded: Any = None  # the run's prompts encoded ahead of its batches (ahead.Ahead)
    # schedules encoded while its denoiser's weights were still being read (commands.load_model),
    # by conditioning's key; each is taken once
    prepared: dict[tuple, Any] = field(default_factory=dict)
    # an edit's images its text encoder reads (Editing.prompt_images), by the record of its inputs
    edit_inputs: dict[str | None, list[Any]] | None = None
    controls: list[Any] = field(default_factory=list)  # (ControlUnit, its ControlNetModel) pairs acting now
    controlnets: dict[str, Any] = field(default_factory=dict)  # ControlNetModels loaded, by path
    kept: bool = False  # held between runs (model_slot.py): its text encoders are released, never freed
    refiner: Model | None = None  # the Model that finishes its images' last steps (refiner.py)
    # where and in what dtype it computes, when its weights are kept elsewhere or in another
    # dtype (memory.py: offloaded to the CPU, stored in float8); None: where its weights are
    run_device: torch.device | None = None
    run_dtype: torch.dtype | None = None

    @property
    def device(self) -> torch.device:
        return self.run_device or next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the first floating-point weight's (GGUF keeps quantized ones as bytes)."""
        return self.run_dtype or next(p.dtype for p in self.denoiser.parameters() if p.is_floating_point())

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent pixel, as the loop sees latents (FLUX.2's packed: twice the VAE's)."""
        return self.vae_downscale * self.family.latent_patch

    @property
    def vae_downscale(self) -> int:
        """Image pixels per pixel of the VAE's own latents."""
        config = self.vae.config
        if getattr(config, "temperal_downsample", None) is not None:  # a video VAE (Qwen-Image's): one per level
            return 2 ** len(config.temperal_downsample)
        return 2 ** (len(config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: the VAE's factor times a DiT's patch size
        (the family's, when its denoiser packs patches its config does not show: FLUX)."""
        patch = self.family.patch_size or getattr(self.denoiser.config, "patch_size", None) or 1
        return self.vae_scale_factor * patch

    @property
    def latent_channels(self) -> int:
        channels = getattr(self.vae.config, "latent_channels", None) or self.vae.config.z_dim  # z_dim: Qwen-Image's
        return channels * self.family.latent_patch ** 2

    @property
    def native_size(self) -> tuple[int, int]:
        size = getattr(self.denoiser.config, "sample_size", None) or self.family.sample_size
        h, w = (size, size) if isinstance(size, int) else size
        return w * self.vae_scale_factor, h * self.vae_scale_factor

    @property
    def is_inpainting(self) -> bool:
        """A dedicated inpainting denoiser: latents + mask + masked-image latents as input."""
        return self.denoiser.config.in_channels == 2 * self.latent_channels + 1

    @property
    def train_timesteps(self) -> int:
        """The noise levels it was trained on; no sampler can take more steps than this."""
        return self.scheduler_config.get("num_train_timesteps", 1000)

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")
