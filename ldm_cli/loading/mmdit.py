"""SD3's MMDiT in a single file: which variant it is and the diffusers config that builds it,
from tensor names and shapes alone, all relative (counts, ratios, presence), so a tiny test
model is read like a real one.

SD3 medium has neither q/k norms nor a second attention; SD3.5 large adds RMS q/k norms;
SD3.5 medium adds both, the second attention ("dual attention") in its first layers. As in the
original MMDiT, a model of depth d has d heads (64 channels each in every released model)
unless q/k norms give the head width outright.
"""
from __future__ import annotations

import math
import re

from ldm_cli.errors import LdmError

PREFIXES = ("model.diffusion_model.", "")  # as Stability ships it, or the transformer's keys alone
SIGNATURE = "joint_blocks.0.x_block.attn.qkv.weight"
DEFAULT_LATENT = 128  # every SD3 renders 1024x1024 unless asked otherwise
VARIANTS = {"sd3": "SD3 medium", "sd35-medium": "SD3.5 medium", "sd35-large": "SD3.5 large"}


def prefix_of(shapes: dict) -> str | None:
    """Where the MMDiT's keys start, or None when the file holds none."""
    return next((p for p in PREFIXES if p + SIGNATURE in shapes), None)


def variant(shapes: dict, prefix: str) -> str:
    if dual_attention_layers(shapes, prefix):
        return "sd35-medium"
    return "sd35-large" if prefix + "joint_blocks.0.x_block.attn.ln_q.weight" in shapes else "sd3"


def dual_attention_layers(shapes: dict, prefix: str) -> tuple[int, ...]:
    found = (re.fullmatch(re.escape(prefix) + r"joint_blocks\.(\d+)\.x_block\.attn2\.qkv\.weight", k) for k in shapes)
    return tuple(sorted(int(m[1]) for m in found if m))


def num_layers(shapes: dict, prefix: str) -> int:
    found = (re.match(re.escape(prefix) + r"joint_blocks\.(\d+)\.", k) for k in shapes)
    return 1 + max(int(m[1]) for m in found if m)


def config(shapes: dict, prefix: str) -> dict:
    """The SD3Transformer2DModel config of the MMDiT under `prefix`; the default latent size,
    which no tensor tells, is SD3's, or all the position table covers in a smaller model."""
    try:
        width, in_channels, patch, _ = shapes[prefix + "x_embedder.proj.weight"]
        caption, joint = shapes[prefix + "context_embedder.weight"]
        pooled = shapes[prefix + "y_embedder.mlp.0.weight"][1]
        out = shapes[prefix + "final_layer.linear.weight"][0] // patch ** 2
        positions = shapes[prefix + "pos_embed"][1]
    except (KeyError, ValueError):
        raise LdmError("the SD3 transformer's embeddings are missing or misshapen; the file is incomplete") from None
    depth, norm = num_layers(shapes, prefix), shapes.get(prefix + "joint_blocks.0.x_block.attn.ln_q.weight")
    head = norm[0] if norm else width // depth
    if width % head or math.isqrt(positions) ** 2 != positions:
        raise LdmError(f"the SD3 transformer's widths ({width} wide, {depth} layers) do not fit an MMDiT; "
                       "pass --config DIR with its diffusers configs")
    side = math.isqrt(positions)
    return {"_class_name": "SD3Transformer2DModel", "sample_size": min(DEFAULT_LATENT, side), "patch_size": patch,
            "in_channels": in_channels, "out_channels": out, "num_layers": depth, "attention_head_dim": head,
            "num_attention_heads": width // head, "joint_attention_dim": joint, "caption_projection_dim": caption,
            "pooled_projection_dim": pooled, "pos_embed_max_size": side,
            "dual_attention_layers": dual_attention_layers(shapes, prefix), "qk_norm": "rms_norm" if norm else None}
