"""FLUX.2 klein: which release a model is. The step-distilled and base releases have the same
shapes; a diffusers folder says which in model_index.json (Flux2KleinPipeline's is_distilled)."""
from __future__ import annotations

VARIANTS = {"distilled": "FLUX.2 klein", "base": "FLUX.2 klein base"}


def variant_of_index(index: dict) -> str:
    """distilled or base, from a folder's model_index.json."""
    return "distilled" if index.get("is_distilled") else "base"
