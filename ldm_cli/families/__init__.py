"""Model families. A family is data plus two functions: how a prompt becomes conditioning, and
how the denoiser is called. The sampling loop knows nothing else about a model, so a DiT family
(SD3's MMDiT with flow matching, PixArt) is one more module here, not a change to the loop.

Conditioning is a dict of tensors batched along dim 0, so the loop can stack the negative and
positive halves for classifier-free guidance without knowing what is inside.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    import torch

    from ldm_cli.model import Model

Cond = dict[str, "torch.Tensor"]


@dataclass(frozen=True)
class Family:
    name: str
    label: str
    # (model, texts, width, height, negative) -> conditioning for len(texts) images
    encode: Callable[[Model, list[str], int, int, bool], Cond]
    # (model, latents, timestep, conditioning) -> the denoiser's raw output
    predict: Callable[[Model, torch.Tensor, torch.Tensor, Cond], torch.Tensor]
    # dtype on CUDA when none is asked for
    cuda_dtype: str = "fp16"


def get(name: str) -> Family:
    from ldm_cli.families import sd, sdxl

    registry = {f.name: f for f in (sd.SD1, sd.SD2, sdxl.SDXL)}
    if name not in registry:
        from ldm_cli.errors import LdmError

        raise LdmError(f"unknown model family {name!r}; known: {', '.join(registry)}")
    return registry[name]
