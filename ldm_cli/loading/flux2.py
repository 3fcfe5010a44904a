"""FLUX.2's transformer in a single file, and the diffusers config that builds it, from tensor
names and shapes alone (a model of any width, or a tiny test one, is read like the released).

Black Forest Labs ship the transformer's keys bare (`flux-2-klein-4b.safetensors`,
`flux2-dev.safetensors`); ComfyUI's `diffusion_models/` files put them under
`model.diffusion_model.`. FLUX.2 is told from FLUX.1 by its shared modulations
(`single_stream_modulation.lin`, where FLUX.1 modulates each block).
Which model: dev embeds the guidance scale (`guidance_in`) and reads Mistral Small's layers;
klein does not, and the text width it reads is three of its Qwen3's layers side by side, so 7680
is klein 4B (Qwen3-4B) and 12288 klein 9B (Qwen3-8B). klein's step-distilled and base releases
have the same shapes: the file's ModelSpec metadata (title or architecture), where it has one,
else its name tells them apart (BFL's base files say `base`).
Note that diffusers' own single-file detection takes every FLUX.2 file for dev."""
from __future__ import annotations

import re

from ldm_cli.errors import LdmError

PREFIXES = ("model.diffusion_model.", "")
SIGNATURE = "single_stream_modulation.lin.weight"
GUIDANCE = "guidance_in.in_layer.weight"
VARIANTS = {"distilled": "FLUX.2 klein", "base": "FLUX.2 klein base", "dev": "FLUX.2 dev"}
# the text encoder's width -> (its release, the FLUX.2 it conditions)
ENCODERS = {2560: ("Qwen3-4B", "4B"), 4096: ("Qwen3-8B", "9B"), 5120: ("Mistral-Small-3.2-24B", "32B")}
TEXT_LAYERS = 3  # the pipelines' layers (klein's 9, 18 and 27; dev's 10, 20 and 30), side by side
MISTRAL_DEPTH = 30  # the deepest of dev's: a Mistral file needs layers 0-29 only
RELEASED_ROPE = (32, 32, 32, 32)  # (time, height, width, index) for 128-wide heads


def prefix_of(shapes: dict) -> str | None:
    """Where the FLUX.2 transformer's keys start, or None when the file holds none."""
    return next((p for p in PREFIXES if p + SIGNATURE in shapes and p + "img_in.weight" in shapes), None)


def variant_of_index(index: dict) -> str:
    """dev (a Flux2Pipeline), or klein's distilled or base, from a folder's model_index.json
    (Flux2KleinPipeline's is_distilled)."""
    if index.get("_class_name") == "Flux2Pipeline":
        return "dev"
    return "distilled" if index.get("is_distilled") else "base"


# ModelSpec's fields naming the model (the safetensors metadata kohya's tools and many releases write)
SPEC_KEYS = ("modelspec.title", "modelspec.architecture")
BASE_WORD = re.compile(r"(?<![a-z])base(?![a-z])", re.IGNORECASE)  # flux-2-klein-base-4b, "klein Base"; not "based"


def variant_of(shapes: dict, prefix: str, name: str, metadata: dict | None = None) -> str:
    """dev by its guidance embedding; klein's distilled or base, alike in shape, by what the file's
    ModelSpec metadata says, else by the release's name (flux-2-klein-base-4b)."""
    if prefix + GUIDANCE in shapes:
        return "dev"
    key = spec_key(metadata or {})
    return "base" if BASE_WORD.search(metadata[key] if key else name) else "distilled"


def told_by(shapes: dict, prefix: str, metadata: dict) -> str:
    """What variant_of went by, for `ldm info`."""
    if prefix + GUIDANCE in shapes:
        return "its guidance embedding"
    key = spec_key(metadata)
    return f"the file's metadata ({key})" if key else "the file's name"


def spec_key(metadata: dict) -> str | None:
    """The first ModelSpec field naming the model that the file fills in."""
    return next((k for k in SPEC_KEYS if isinstance(metadata.get(k), str) and metadata[k].strip()), None)


def text_width(config: dict) -> int:
    return config["joint_attention_dim"] // TEXT_LAYERS


def size(config: dict) -> str:
    """4B, 9B or 32B for the released widths; else the text width (a model ldm was not shipped configs for)."""
    return ENCODERS.get(text_width(config), (None, f"{text_width(config)}-wide"))[1]


def count(shapes: dict, prefix: str, blocks: str) -> int:
    found = (re.match(re.escape(prefix + blocks) + r"\.(\d+)\.", k) for k in shapes)
    return 1 + max((int(m[1]) for m in found if m), default=-1)


def config(shapes: dict, prefix: str) -> dict:
    """The Flux2Transformer2DModel config of the transformer under `prefix`."""
    try:
        width, in_channels = shapes[prefix + "img_in.weight"]
        joint = shapes[prefix + "txt_in.weight"][1]
        head = shapes[prefix + "double_blocks.0.img_attn.norm.query_norm.scale"][0]
        mlp = shapes[prefix + "double_blocks.0.img_mlp.0.weight"][0] // 2  # SwiGLU: gate and value rows
    except (KeyError, ValueError):
        raise LdmError("the FLUX.2 transformer's embeddings, q/k norms or MLP are missing or misshapen; "
                       "the file is incomplete") from None
    if width % head or joint % TEXT_LAYERS or head % 4:
        raise LdmError(f"this FLUX.2 transformer is {width} wide with {head}-wide heads reading {joint}-wide text; "
                       "ldm runs FLUX.2 klein 4B and 9B and FLUX.2 dev")
    return {"_class_name": "Flux2Transformer2DModel", "patch_size": 1, "in_channels": in_channels,
            "out_channels": None, "num_layers": count(shapes, prefix, "double_blocks"),
            "num_single_layers": count(shapes, prefix, "single_blocks"), "attention_head_dim": head,
            "num_attention_heads": width // head, "joint_attention_dim": joint, "mlp_ratio": mlp / width,
            "axes_dims_rope": list(RELEASED_ROPE if head == sum(RELEASED_ROPE) else (head // 4,) * 4),
            "guidance_embeds": prefix + GUIDANCE in shapes}
