"""The fast path on a GPU: the same arithmetic as the stock pipelines, arranged to run faster.

Applied to every model loaded on CUDA (images match diffusers' pipelines within rounding):
- attention through PyTorch's scaled_dot_product_attention, which picks flash or
  memory-efficient kernels (diffusers' default processors already use it; tests check it);
- fused attention projections (U-Nets, VAEs, SD3's MMDiT): q, k and v (k and v for
  cross-attention) as one matmul instead of three, the separate weights kept as views of the
  fused one, so no memory is added;
- channels-last layout for the U-Net's and the VAE's convolutions, cuDNN's native layout for
  fp16/bf16 tensor cores.
On the CPU and MPS none of it is applied: unmeasured there, and it would cost the CPU's exact
agreement with diffusers' pipelines (tests/test_parity.py) a rounding difference.
`--compile` (compiling.py) comes on top, on any device.
"""
from __future__ import annotations

import torch

# The processor sets (diffusers' SDPA defaults) whose modules diffusers can fuse; anything else
# (a custom processor, added KV projections, a mix) is left alone.
FUSABLE = ({"AttnProcessor2_0"}, {"JointAttnProcessor2_0"})
# fused projection -> the projections it replaces, in the order diffusers concatenates them
FUSED_PARTS = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v"),
               "to_added_qkv": ("add_q_proj", "add_k_proj", "add_v_proj")}


def apply(model, compile: bool = False) -> None:
    """The fast path for `model`'s device; `compile`: also torch.compile its denoiser."""
    if model.device.type == "cuda":
        for module in (model.denoiser, model.vae):
            if not plain_weights(module):  # memory.py's float8 or offloaded weights, GGUF's bytes
                continue
            fuse_projections(module)
            if is_convolutional(module):
                module.to(memory_format=torch.channels_last)
    if compile:
        from ldm_cli import compiling

        compiling.compile_denoiser(model)


def plain_weights(module: torch.nn.Module) -> bool:
    """Weights stored as they compute and held in place: fusing and re-laying them is safe."""
    return all(p.dtype in (torch.float16, torch.bfloat16, torch.float32) and p.device.type != "meta"
               for p in module.parameters())


def processor_names(module: torch.nn.Module) -> set[str]:
    return {type(p).__name__ for p in getattr(module, "attn_processors", {}).values()}


def fuse_projections(module: torch.nn.Module) -> bool:
    """Fuse `module`'s attention projections where diffusers can; True if it did."""
    names = processor_names(module)
    if not hasattr(module, "fuse_qkv_projections") or names not in FUSABLE:
        return False
    module.fuse_qkv_projections()
    for attention in module.modules():
        share_fused_storage(attention)
    return True


def share_fused_storage(attention: torch.nn.Module) -> None:
    """Make the separate projections' weights views of the fused ones, freeing their copies
    (diffusers keeps both so it can unfuse; SDXL's U-Net would carry 1.3 GB twice)."""
    for fused_name, part_names in FUSED_PARTS.items():
        fused = getattr(attention, fused_name, None)
        if not isinstance(fused, torch.nn.Linear):
            continue
        parts = [getattr(attention, name) for name in part_names]
        sizes = [part.out_features for part in parts]
        for what in ("weight", "bias"):
            whole = getattr(fused, what)
            if whole is not None:
                for part, piece in zip(parts, whole.data.split(sizes)):
                    getattr(part, what).data = piece


def is_convolutional(module: torch.nn.Module) -> bool:
    """A U-Net or a VAE, built of 2-D convolutions; not a DiT, whose one is its patch embedding, nor
    a video VAE (Qwen-Image's): its 3-D convolutions' 5-D weights have no channels-last layout."""
    layers = list(module.modules())
    return sum(isinstance(m, torch.nn.Conv2d) for m in layers) > 1 and not any(isinstance(m, torch.nn.Conv3d)
                                                                               for m in layers)
