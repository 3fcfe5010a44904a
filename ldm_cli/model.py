"""A loaded model: its components, its family and what it recommends."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ldm_cli.families import Family


@dataclass
class Model:
    family: Family
    denoiser: torch.nn.Module  # UNet2DConditionModel, or a DiT (SD3Transformer2DModel)
    vae: torch.nn.Module  # AutoencoderKL
    text_encoders: list[torch.nn.Module | None]  # None: a part run without (SD3's T5)
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    name: str
    hash: str | None = None  # A1111 short hash: first 10 hex of the file's sha256
    path: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # recommended steps, cfg, scheduler
    options: dict[str, Any] = field(default_factory=dict)  # family switches (e.g. SDXL's zeroed empty negative)
    modules: list[str] = field(default_factory=list)  # parts given as separate files: Forge's "Module N"

    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.denoiser.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def size_multiple(self) -> int:
        """Width and height must be multiples of this: the VAE's factor times a DiT's patch size."""
        return self.vae_scale_factor * (getattr(self.denoiser.config, "patch_size", None) or 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def native_size(self) -> tuple[int, int]:
        size = self.denoiser.config.sample_size
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
