"""FLUX.1's transformer in a single file: dev or schnell, and the diffusers config that builds
it, from tensor names and shapes alone, so a model of any width (or a tiny test one) is read
like the released ones. (diffusers' own converter assumes the released width, 3072.)

dev is guidance-distilled: it embeds the guidance scale (`guidance_in`); schnell has no such
embedding. Widths: img_in gives the hidden size and the packed latent channels (16 x 2 x 2),
the RMS q/k norms the head width, the block counts the depth.
"""
from __future__ import annotations

import re

from ldm_cli.errors import LdmError

PREFIXES = ("model.diffusion_model.", "")  # ComfyUI's all-in-one files, or Black Forest Labs' bare keys
SIGNATURE = "double_blocks.0.img_attn.qkv.weight"
GUIDANCE = "guidance_in.in_layer.weight"
VARIANTS = {"dev": "FLUX.1 dev", "schnell": "FLUX.1 schnell"}
DEFAULT_LATENT = 128  # FluxPipeline's default: 1024x1024 images
RELEASED_ROPE = (16, 56, 56)  # the released models' rotary axes (index, height, width) for 128-wide heads


def prefix_of(shapes: dict) -> str | None:
    """Where the FLUX transformer's keys start, or None when the file holds none."""
    return next((p for p in PREFIXES if p + SIGNATURE in shapes), None)


def variant(shapes: dict, prefix: str) -> str:
    return "dev" if prefix + GUIDANCE in shapes else "schnell"


def count(shapes: dict, prefix: str, blocks: str) -> int:
    found = (re.match(re.escape(prefix + blocks) + r"\.(\d+)\.", k) for k in shapes)
    return 1 + max((int(m[1]) for m in found if m), default=-1)


def config(shapes: dict, prefix: str) -> dict:
    """The FluxTransformer2DModel config of the transformer under `prefix`."""
    try:
        width, in_channels = shapes[prefix + "img_in.weight"]
        joint = shapes[prefix + "txt_in.weight"][1]
        pooled = shapes[prefix + "vector_in.in_layer.weight"][1]
        out_channels = shapes[prefix + "final_layer.linear.weight"][0]
        head = shapes[prefix + "double_blocks.0.img_attn.norm.query_norm.scale"][0]
    except (KeyError, ValueError):
        raise LdmError("the FLUX transformer's embeddings or q/k norms are missing or misshapen; the file is incomplete") from None
    if width % head or in_channels != out_channels:
        why = (f"takes {in_channels} input channels for {out_channels} out (FLUX Fill, Depth or Canny?)"
               if in_channels != out_channels else f"is {width} wide with {head}-wide heads")
        raise LdmError(f"this FLUX transformer {why}; ldm runs FLUX.1 dev and schnell")
    return {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": in_channels, "out_channels": None,
            "num_layers": count(shapes, prefix, "double_blocks"),
            "num_single_layers": count(shapes, prefix, "single_blocks"), "attention_head_dim": head,
            "num_attention_heads": width // head, "joint_attention_dim": joint, "pooled_projection_dim": pooled,
            "guidance_embeds": prefix + GUIDANCE in shapes, "axes_dims_rope": list(rope_axes(head))}


def rope_axes(head: int) -> tuple[int, int, int]:
    """The rotary embedding's split of a head over (index, height, width) position ids, which no
    tensor stores: the released split for 128-wide heads, else the same proportions (each axis
    even; a file's ldm.config metadata or --config DIR says otherwise)."""
    if head == sum(RELEASED_ROPE):
        return RELEASED_ROPE
    side = 2 * ((head - max(2, 2 * round(head / 16))) // 4)
    return head - 2 * side, side, side
