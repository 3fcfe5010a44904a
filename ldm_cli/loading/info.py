"""`ldm info CHECKPOINT`: what a single file holds, from its header (plus, for an SD2 file
with nothing else to go on, the same probe forward pass loading runs)."""
from __future__ import annotations

import math
from pathlib import Path

import torch

from ldm_cli.errors import LdmError
from ldm_cli.loading import convert, detect, keymap, prediction, recipe, single_file, tensors


def describe(path: Path, config: str | None = None, allow_pickle: bool = False) -> dict:
    from ldm_cli import families, hashing

    path = Path(path).expanduser()
    if path.is_dir() or not path.exists():
        raise LdmError(f"{str(path)!r} is not a checkpoint file; `ldm info` reads .safetensors files and PNGs")
    checkpoint = tensors.open_checkpoint(path, allow_pickle)
    found = detect.detect(checkpoint)
    r = recipe.resolve(found, checkpoint.metadata, config)
    sizes = {name: parameters(r, name, checkpoint) for name in single_file.weight_names(r)}
    chosen, why = prediction.decide(None, r, found, path, lambda: probe(r, checkpoint))
    prediction.apply(r, chosen)
    label = families.get(found.family).label + (" inpainting" if found.inpainting else "")
    return {"file": path.name, "family": found.family, "model": label, "prediction": chosen, "prediction_from": why,
            "native_size": native_size(r), "dtype": tensors.dtype_name(checkpoint, keymap.UNET.prefix),
            **{f"parameters_{name}": n for name, n in sizes.items()},
            "hash": hashing.short_hash(path), "ema": found.ema}


def parameters(r: recipe.Recipe, name: str, checkpoint: tensors.Checkpoint) -> int:
    """The component's size as ldm builds it (checked against the file, so a damaged one fails here)."""
    module = single_file.empty(name, r.configs[name])
    slot = next(s for s in keymap.LAYOUTS[r.family] if s.name == name)
    convert.plan(slot, module, checkpoint)
    return sum(math.prod(t.shape) for t in module.state_dict().values())


def probe(r: recipe.Recipe, checkpoint: tensors.Checkpoint) -> bool:
    unet = single_file.build(r, checkpoint, ["unet"], torch.float32, torch.device("cpu"))["unet"]
    return prediction.is_v_model(unet)


def native_size(r: recipe.Recipe) -> str:
    size = r.configs["unet"]["sample_size"]
    h, w = (size, size) if isinstance(size, int) else size
    factor = 2 ** (len(r.configs["vae"]["block_out_channels"]) - 1)
    return f"{w * factor}x{h * factor}"
