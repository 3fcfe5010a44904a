"""Which flags fit each 2025-26 family at 1024x1024 on an 8, 12, 16 or 24 GB GPU, computed (not
measured) from the parameter counts of the configs ldm ships, by the rules of the README's FLUX
table: the weights on the GPU at the worst moment (bf16: 2 bytes a parameter; --weights fp8:
1 for the transformer and a T5, the LLM text encoders stay bf16), plus 2 GB of working memory
while the transformer runs and 0.5 GB while the text encoder encodes.

    python bench/family_fit.py        # the README's rows, as Markdown

No weights are allocated: the modules are built on the meta device.
"""
from __future__ import annotations

from pathlib import Path

from ldm_cli.loading import convert, recipe

SIZES = (8, 12, 16, 24)
FAMILIES = {"Z-Image Turbo": "zimage", "Chroma1-HD": "chroma", "FLUX.2 klein 4B": "flux2-klein-4b",
            "FLUX.2 klein 9B": "flux2-klein-9b", "FLUX.2 dev": "flux2-dev", "Qwen-Image": "qwen-image"}
GB = 1e9


def parameters(folder: Path, name: str) -> int:
    config = recipe.flat(recipe.read_json(recipe.config_file(folder, name)))
    return sum(p.numel() for p in convert.empty(name, config).parameters())


def peaks(transformer: int, text: int, vae: int, t5: bool) -> dict[str, tuple[float, float]]:
    """flags -> (GB of weights on the GPU at the peak, with working memory)."""
    fp8_text = text if t5 else 2 * text
    def worst(*moments):  # (weights, working memory) at each moment: the largest total
        return max(moments, key=lambda m: m[0] + m[1])
    return {
        "(none)": worst(((2 * transformer + 2 * text + 2 * vae) / GB, 2)),
        "--weights fp8": worst(((transformer + fp8_text + 2 * vae) / GB, 2)),
        "--offload model": worst(((2 * transformer + 2 * vae) / GB, 2), (2 * text / GB, 0.5)),
        "--offload model --weights fp8": worst(((transformer + 2 * vae) / GB, 2), (fp8_text / GB, 0.5)),
        "--offload sequential": worst(((2 * text + 2 * vae) / GB, 0.5)),
        "--offload sequential --weights fp8": worst(((fp8_text + 2 * vae) / GB, 0.5)),
    }


def lightest(table: dict[str, tuple[float, float]], size: int) -> str:
    """The first flags (fewest trade-offs first) whose peak fits `size` GB."""
    return next((f"`{flags}`" if flags != "(none)" else flags for flags, (w, work) in table.items() if w + work <= size),
                "no")


def main() -> None:
    print("| model | parameters (transformer + text encoder) | " + " | ".join(f"{s} GB" for s in SIZES) + " |")
    print("|---|---|" + "---|" * len(SIZES))
    for label, config in FAMILIES.items():
        folder = recipe.SHIPPED / config
        transformer, text, vae = (parameters(folder, n) for n in ("transformer", "text_encoder", "vae"))
        table = peaks(transformer, text, vae, t5=config == "chroma")
        print(f"| {label} | {transformer / GB:.1f}B + {text / GB:.1f}B | "
              + " | ".join(lightest(table, s) for s in SIZES) + " |")


if __name__ == "__main__":
    main()
