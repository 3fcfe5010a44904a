"""Chroma's transformer in a single file (lodestones' layout: FLUX's `double_blocks` and
`single_blocks` without their modulation layers, plus the `distilled_guidance_layer` that computes
every block's modulation from the timestep; no `guidance_in`, no `vector_in`), and the diffusers
config that builds it, from tensor names and shapes alone, as loading/flux.py reads FLUX's.

The approximator names it, as diffusers' single-file code tells Chroma from FLUX. HD and Base
share the architecture; no tensor tells them apart.
"""
from __future__ import annotations

from ldm_cli.errors import LdmError
from ldm_cli.loading import flux

SIGNATURE = "distilled_guidance_layer.in_proj.bias"  # diffusers' CHECKPOINT_KEY_NAMES["chroma"]
APPROXIMATOR = "distilled_guidance_layer."


def prefix_of(shapes: dict) -> str | None:
    """Where Chroma's transformer keys start (FLUX's prefixes), or None when the file holds none."""
    return next((p for p in flux.PREFIXES if p + SIGNATURE in shapes and p + flux.SIGNATURE in shapes), None)


def config(shapes: dict, prefix: str) -> dict:
    """The ChromaTransformer2DModel config of the transformer under `prefix`."""
    try:
        width, in_channels = shapes[prefix + "img_in.weight"]
        joint = shapes[prefix + "txt_in.weight"][1]
        out_channels = shapes[prefix + "final_layer.linear.weight"][0]
        head = shapes[prefix + "double_blocks.0.img_attn.norm.query_norm.scale"][0]
        hidden, channels = shapes[prefix + APPROXIMATOR + "in_proj.weight"]
    except (KeyError, ValueError):
        raise LdmError("the Chroma transformer's embeddings, q/k norms or approximator are missing or misshapen; "
                       "the file is incomplete") from None
    if width % head or in_channels != out_channels or channels % 4:
        raise LdmError(f"this Chroma transformer ({width} wide, {head}-wide heads, {in_channels} channels in, "
                       f"{out_channels} out, a {channels}-channel approximator) does not fit ChromaTransformer2DModel")
    return {"_class_name": "ChromaTransformer2DModel", "patch_size": 1, "in_channels": in_channels, "out_channels": None,
            "num_layers": flux.count(shapes, prefix, "double_blocks"),
            "num_single_layers": flux.count(shapes, prefix, "single_blocks"), "attention_head_dim": head,
            "num_attention_heads": width // head, "joint_attention_dim": joint,
            "axes_dims_rope": list(flux.rope_axes(head)), "approximator_num_channels": channels,
            "approximator_hidden_dim": hidden, "approximator_layers": flux.count(shapes, prefix, APPROXIMATOR + "layers")}
