"""Z-Image's transformer in a single file, and the diffusers config that builds it, from tensor
names and shapes alone (a model of any width, or a tiny test one, is read like the released).

Two layouts: Tongyi's original (its fused `attention.qkv`, `x_embedder`, `final_layer`, as
ComfyUI's `diffusion_models/z_image_turbo*.safetensors` keep it) and diffusers' own names (a
ZImageTransformer2DModel saved as one file); either bare or under ComfyUI's
`model.diffusion_model.`. Its adaptive norm is one Linear (`adaLN_modulation.0`; Lumina 2,
its sibling, has a SiLU first and so `.1`). Turbo and Base have the same shapes: only the
file's name tells them apart.
"""
from __future__ import annotations

import re

from ldm_cli.errors import LdmError

PREFIXES = ("model.diffusion_model.", "")
SIGNATURE = "layers.0.adaLN_modulation.0.weight"
CAPTION = "cap_embedder.1.weight"  # the caption projection: (width, Qwen3's width)
ORIGINAL = "layers.0.attention.qkv.weight"  # Tongyi's fused q/k/v; diffusers' names split it
VARIANTS = {"turbo": "Z-Image Turbo", "base": "Z-Image"}
RELEASED_ROPE = (32, 48, 48)  # the released rotary axes (caption/frame, height, width) for 128-wide heads
ROPE_LENGTHS = [1536, 512, 512]  # positions each axis' table holds; no tensor stores them
PATCH = 2


def prefix_of(shapes: dict) -> str | None:
    """Where the Z-Image transformer's keys start, or None when the file holds none."""
    return next((p for p in PREFIXES if p + SIGNATURE in shapes and p + CAPTION in shapes), None)


def original(shapes: dict, prefix: str) -> bool:
    """Tongyi's layout (fused q/k/v), rather than diffusers' names."""
    return prefix + ORIGINAL in shapes


def variant(name: str) -> str:
    """turbo or base: alike in shape, told by the release's name (Z-Image-Turbo, z_image_turbo_bf16)."""
    return "turbo" if "turbo" in name.lower() else "base"


def count(shapes: dict, prefix: str, blocks: str) -> int:
    found = (re.match(re.escape(prefix + blocks) + r"\.(\d+)\.", k) for k in shapes)
    return 1 + max((int(m[1]) for m in found if m), default=-1)


def config(shapes: dict, prefix: str) -> dict:
    """The ZImageTransformer2DModel config of the transformer under `prefix`."""
    names = ("x_embedder.weight", "layers.0.attention.q_norm.weight") if original(shapes, prefix) else (
        f"all_x_embedder.{PATCH}-1.weight", "layers.0.attention.norm_q.weight")
    try:
        width, caption = shapes[prefix + CAPTION]
        patches = shapes[prefix + names[0]][1]
        head = shapes[prefix + names[1]][0]
    except (KeyError, ValueError):
        raise LdmError("the Z-Image transformer's embeddings or q/k norms are missing or misshapen; "
                       "the file is incomplete") from None
    if width % head or patches % (PATCH * PATCH):
        raise LdmError(f"this Z-Image transformer is {width} wide with {head}-wide heads and {patches} input "
                       "features a patch; ldm runs Z-Image Turbo and Base")
    return {"_class_name": "ZImageTransformer2DModel", "all_patch_size": [PATCH], "all_f_patch_size": [1],
            "in_channels": patches // (PATCH * PATCH), "dim": width, "n_layers": count(shapes, prefix, "layers"),
            "n_refiner_layers": count(shapes, prefix, "noise_refiner"), "n_heads": width // head,
            "n_kv_heads": width // head, "cap_feat_dim": caption, "axes_dims": list(rope_axes(head)),
            "axes_lens": ROPE_LENGTHS}


def rope_axes(head: int) -> tuple[int, int, int]:
    """The rotary embedding's split of a head over (caption/frame, height, width), which no tensor
    stores: the released split for 128-wide heads, else the same proportions (1/4, 3/8, 3/8), each
    axis even."""
    if head == sum(RELEASED_ROPE):
        return RELEASED_ROPE
    first = 2 * max(1, round(head / 8))
    side = (head - first) // 2
    return head - 2 * side, side, side
