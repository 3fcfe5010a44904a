"""A loaded model: its components, its family and what it recommends."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ldm_cli.families import Family


@dataclass
class Model:
    family: Family
    denoiser: torch.nn.Module  # UNet2DConditionModel (or a DiT for later families)
    vae: torch.nn.Module  # AutoencoderKL
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    name: str
    hash: str | None = None  # A1111 short hash: first 10 hex of the file's sha256
    path: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # recommended steps, cfg, scheduler
    options: dict[str, Any] = field(default_factory=dict)  # family switches (e.g. SDXL's zeroed empty negative)

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
    def prediction_type(self) -> str:
        return self.scheduler_config.get("prediction_type", "epsilon")
