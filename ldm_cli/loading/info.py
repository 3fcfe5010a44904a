"""`ldm info CHECKPOINT`: what a single file holds, from its header (plus, for an SD2 file
with nothing else to go on, the same probe forward pass loading runs): each part's storage
(dtype, float8, scaled float8 or GGUF quantization), and for a model shipped in parts (SD3,
FLUX, Chroma, Z-Image, FLUX.2, Qwen-Image) which parts it still needs and the flag that supplies each."""
from __future__ import annotations

from pathlib import Path

from ldm_cli.errors import LdmError
from ldm_cli.loading import (components, detect, flux, flux2, keymap, mmdit, plan, prediction, quantized, qwen_image, recipe,
                              tensors, variants, weight_table, zimage)


def describe(path: Path, config: str | None = None, allow_pickle: bool = False, variant: str | None = None) -> dict:
    from ldm_cli import hashing

    path = Path(path).expanduser()
    if path.is_dir() or not path.exists():
        raise LdmError(f"{str(path)!r} is not a checkpoint file; `ldm info` reads .safetensors files and PNGs")
    checkpoint = tensors.open_checkpoint(path, allow_pickle)
    found = detect.detect(checkpoint, variant)
    r = recipe.resolve(found, checkpoint.metadata, config)
    held = [s for s in detect.slots(found) if s == found.denoiser_slot or components.holds(checkpoint, s)]
    sizes = {s.name: parameters(r, s, checkpoint) for s in held}
    chosen, why = "flow", "family"  # a flow model predicts a velocity, always
    if r.denoiser == "unet":
        chosen, why = prediction.decide(None, r, found, path, lambda: probe(r, found, checkpoint))
        prediction.apply(r, chosen)
    told = variant_from(found, checkpoint, variant)
    return {"file": path.name, "family": found.family, **({"variant": found.variant} if found.variant else {}), **told,
            "model": label(found, checkpoint), "prediction": chosen, "prediction_from": why,
            "native_size": native_size(r), "dtype": tensors.dtype_name(checkpoint, found.denoiser_slot.prefix),
            "storage": {s.name: quantized.storage(checkpoint, s.prefix) for s in held},
            **{f"parameters_{name}": n for name, n in sizes.items()},
            "components": [s.name for s in held], "needs": needs(r, [s.name for s in held]),
            "hash": hashing.short_hash(path), "ema": found.ema}


def variant_from(found: detect.Found, checkpoint: tensors.Checkpoint, given: str | None) -> dict:
    """What the variant was taken from where shapes cannot tell (FLUX.2 klein's step-distilled and
    base releases, Z-Image Turbo and Base): --variant, else the file's metadata or name."""
    if given is not None:
        return {"variant_from": variants.TOLD}
    if found.family == "flux2":
        return {"variant_from": flux2.told_by(checkpoint.shapes, found.denoiser_slot.prefix, checkpoint.metadata)}
    return {"variant_from": "the file's name"} if found.family == "zimage" else {}


def label(found: detect.Found, checkpoint: tensors.Checkpoint) -> str:
    from ldm_cli.families.family import LABELS

    if found.family == "flux":
        return flux.VARIANTS[found.variant]
    if found.family == "zimage":
        return zimage.VARIANTS[found.variant]
    if found.family == "flux2" and found.variant == "dev":
        return flux2.VARIANTS["dev"]  # one size
    if found.family == "qwen-image" and found.variant:
        return qwen_image.VARIANTS[found.variant]
    if found.family == "flux2":
        return f"{flux2.VARIANTS[found.variant]} {flux2.size(found.denoiser_config)}"
    if found.variant:
        return mmdit.VARIANTS[found.variant] + (" turbo" if detect.turbo(checkpoint) else "")
    return LABELS[found.family] + (" inpainting" if found.inpainting else "")


def needs(r: recipe.Recipe, held: list[str]) -> list[str]:
    """The parts the file lacks, each with the flag that supplies it."""
    out = ["vae (--vae)"] if "vae" not in held else []
    for name in r.text_encoders:
        if name not in held:
            optional = ", optional" if name in components.OPTIONAL else ""
            out.append(f"{name} ({components.label(r, name)}, --text-encoder{optional})")
    return out


def parameters(r: recipe.Recipe, slot: keymap.Slot, checkpoint: tensors.Checkpoint) -> int:
    """The component's size as ldm builds it (checked against the file, so a damaged one fails here):
    weights, not buffers (SD3's position table). Needs torch only for an architecture not yet seen."""
    def build():
        from ldm_cli.loading import convert, quiet_libraries

        quiet_libraries()
        return convert.empty(slot.name, r.configs[slot.name])
    table = weight_table.table(slot.name, r.configs[slot.name], build)
    plan.plan(slot, table.weights, table.config, checkpoint)
    return table.parameters


def probe(r: recipe.Recipe, found: detect.Found, checkpoint: tensors.Checkpoint) -> bool:
    import torch

    from ldm_cli.loading import single_file

    unet = single_file.build(r, checkpoint, [found.denoiser_slot], torch.float32, torch.device("cpu"))["unet"]
    return prediction.is_v_model(unet)


def native_size(r: recipe.Recipe) -> str:
    size = r.configs[r.denoiser].get("sample_size", flux.DEFAULT_LATENT)  # FLUX's and Z-Image's configs have none
    h, w = (size, size) if isinstance(size, int) else size
    vae = r.configs["vae"]
    # Qwen-Image's video VAE: one halving per temperal_downsample entry, as Model.vae_scale_factor
    factor = 2 ** len(vae["temperal_downsample"]) if "temperal_downsample" in vae else 2 ** (len(vae["block_out_channels"]) - 1)
    return f"{w * factor}x{h * factor}"
