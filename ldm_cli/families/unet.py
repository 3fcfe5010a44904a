"""Calling a UNet2DConditionModel denoiser (SD1, SD2, SDXL share it)."""
from __future__ import annotations

import torch

from ldm_cli.families.family import Cond

ADDED_KEYS = ("text_embeds", "time_ids")  # SDXL's pooled text and size/crop conditioning
# ControlNet residuals, put into the conditioning by the loop (control.py) when units act
CONTROL_KEYS = ("down_block_additional_residuals", "mid_block_additional_residual")


def predict(model, latents: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
    added = {k: cond[k] for k in ADDED_KEYS if k in cond}
    control = {k: cond[k] for k in CONTROL_KEYS if k in cond}
    return model.denoiser(latents, t, encoder_hidden_states=cond["encoder_hidden_states"],
                          added_cond_kwargs=added or None, **control, return_dict=False)[0]


def control_input(model, net, images: torch.Tensor, generators: list) -> torch.Tensor:
    """A U-Net ControlNet reads the control image's pixels in [0, 1]."""
    return images


def control_residuals(model, net, x: torch.Tensor, t: torch.Tensor, cond: Cond, image: torch.Tensor,
                      scale: float, mode: int | None = None) -> dict:
    added = {k: cond[k] for k in ADDED_KEYS if k in cond}
    down, mid = net(x, t, encoder_hidden_states=cond["encoder_hidden_states"], controlnet_cond=image,
                    conditioning_scale=scale, added_cond_kwargs=added or None, return_dict=False)
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def tokenize(tokenizer, texts: list[str], device: torch.device) -> torch.Tensor:
    ids = tokenizer(texts, padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    return ids.to(device)
