"""Qwen-Image's transformer in a single file, and the diffusers config that builds it, from tensor
names and shapes alone (a model of any width, or a tiny test one, is read like the released).

Qwen's own names are diffusers' (`transformer_blocks.N.attn.to_q`, `img_in`, `txt_in`,
`txt_norm`), bare in a file saved from the release or under ComfyUI's `model.diffusion_model.`
(`diffusion_models/qwen_image*.safetensors`). The text input's RMS norm (`txt_norm`) beside the
image input (`img_in`) names it: no other family ldm reads has both. Qwen-Image and
Qwen-Image-2512 have the same shapes.
"""
from __future__ import annotations

import re

from ldm_cli.errors import LdmError

PREFIXES = ("model.diffusion_model.", "")
# a folder's pipeline class -> the variant (the same transformer shapes: only the folder tells)
INDEX_VARIANTS = {"QwenImageEditPipeline": "edit", "QwenImageEditPlusPipeline": "edit-plus"}
VARIANTS = {"edit": "Qwen-Image-Edit", "edit-plus": "Qwen-Image-Edit Plus (2509, 2511)"}
SIGNATURE = ("txt_norm.weight", "img_in.weight")
HEAD_NORM = "transformer_blocks.0.attn.norm_q.weight"  # (head width,)
PATCH = 2


def variant_of_index(index: dict) -> str | None:
    """edit or edit-plus for an edit pipeline's folder; None for Qwen-Image itself."""
    return INDEX_VARIANTS.get(index.get("_class_name"))


def prefix_of(shapes: dict) -> str | None:
    """Where the Qwen-Image transformer's keys start, or None when the file holds none."""
    return next((p for p in PREFIXES if all(p + k in shapes for k in SIGNATURE)), None)


def count(shapes: dict, prefix: str) -> int:
    found = (re.match(re.escape(prefix) + r"transformer_blocks\.(\d+)\.", k) for k in shapes)
    return 1 + max((int(m[1]) for m in found if m), default=-1)


def config(shapes: dict, prefix: str) -> dict:
    """The QwenImageTransformer2DModel config of the transformer under `prefix`."""
    try:
        width, patches = shapes[prefix + "img_in.weight"]
        text = shapes[prefix + "txt_in.weight"][1]
        head = shapes[prefix + HEAD_NORM][0]
        out = shapes[prefix + "proj_out.weight"][0]
    except (KeyError, ValueError):
        raise LdmError("the Qwen-Image transformer's input and output projections or q/k norms are missing or "
                       "misshapen; the file is incomplete") from None
    if width % head or patches % (PATCH * PATCH) or out % (PATCH * PATCH):
        raise LdmError(f"this Qwen-Image transformer is {width} wide with {head}-wide heads and {patches} input "
                       "features a patch; ldm runs Qwen-Image and Qwen-Image-2512")
    return {"_class_name": "QwenImageTransformer2DModel", "patch_size": PATCH, "in_channels": patches,
            "out_channels": out // (PATCH * PATCH), "num_layers": count(shapes, prefix), "attention_head_dim": head,
            "num_attention_heads": width // head, "joint_attention_dim": text, "guidance_embeds": False,
            "axes_dims_rope": list(rope_axes(head))}


def rope_axes(head: int) -> tuple[int, int, int]:
    """The rotary embedding's split of a head over (frame, height, width), which no tensor stores:
    the released (16, 56, 56) for 128-wide heads, else about the same proportions, each axis even."""
    side = (head - head // 8) // 4 * 2
    return head - 2 * side, side, side
