"""A LoRA layer's name -> the weights of the loaded model it changes.

Every Linear and Conv2d of the denoiser and the text encoders is listed under the names LoRA
files use for it (formats.py's kohya spelling: '.' written '_' after a prefix):
- the denoiser under `lora_unet_` + its diffusers name (kohya's SD1 files, diffusers/PEFT files)
  and + its name in the original layout (`input_blocks_4_1_...`: kohya's SDXL files, SD3's and
  FLUX's fused q/k/v), taken from loading/keymap.py, the same mapping single files load through;
  one original layer may stand for several diffusers weights (rows of a fused q/k/v);
- text encoder i under `lora_te{i+1}_` (and the first also under `lora_te_`), with and without
  `text_model_`: transformers 5's CLIPTextModel has no `text_model` level, while the files'
  names, written for older transformers, always have it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ldm_cli.errors import LdmError
from ldm_cli.loading import keymap

DENOISER = "denoiser"


@dataclass(frozen=True)
class Target:
    component: str  # "denoiser", or "text_encoder", "text_encoder_2", ...
    module: str  # the module's name in its component
    part: int | None = None  # which rows of a fused original layer's delta
    split: tuple[int, ...] | None = None  # the rows of each part, when not equal thirds
    swap: bool = False  # the original stores (shift, scale) halves; diffusers (scale, shift)

    @property
    def text(self) -> bool:
        return self.component != DENOISER


def components(model) -> dict[str, torch.nn.Module]:
    text = {("text_encoder" if i == 0 else f"text_encoder_{i + 1}"): encoder
            for i, encoder in enumerate(model.text_encoders) if encoder is not None}
    return {DENOISER: model.denoiser, **text}


def table(model) -> dict[str, list[Target]]:
    """Layer name -> the targets it changes, for every weight a LoRA can change (each once: where
    the original layout keeps diffusers' name, as Z-Image's does for most layers, both spell it alike)."""
    out: dict[str, list[Target]] = {}
    for component, module in components(model).items():
        for name, target in (_denoiser_names(model) if component == DENOISER else _text_names(component, module)):
            if target not in out.setdefault(name, []):
                out[name].append(target)
    return out


def weights(module: torch.nn.Module) -> list[str]:
    """The names of the module's Linear and Conv2d layers (what LoRAs change)."""
    return [name for name, m in module.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]


def _denoiser_names(model):
    origin = _origin_mapper(model)
    for name in weights(model.denoiser):
        yield "lora_unet_" + _flat(name), Target(DENOISER, name)
        found = _origin(origin, name)
        if found is not None:
            yield "lora_unet_" + _flat(found.key.removesuffix(".weight")), \
                Target(DENOISER, name, found.part, found.split, found.swap)


def _origin_mapper(model):
    layout = keymap.LAYOUTS.get(model.family.name)
    if layout is None:
        return None
    return keymap.mapper(layout[0].kind, dict(model.denoiser.config))


def _origin(mapper, name: str):
    """The weight's origin in the original layout; None where it has none (or no mapping)."""
    if mapper is None:
        return None
    try:
        return mapper(name + ".weight")
    except (LdmError, KeyError):  # a layer the keymap does not place (keymap.unsupported)
        return None


def _text_names(component: str, module: torch.nn.Module):
    number = 1 if component == "text_encoder" else int(component.rsplit("_", 1)[1])
    prefixes = [f"lora_te{number}_"] + (["lora_te_"] if number == 1 else [])
    for name in weights(module):
        bare = name.removeprefix("text_model.")
        for prefix in prefixes:
            for spelled in dict.fromkeys((bare, "text_model." + bare)):
                yield prefix + _flat(spelled), Target(component, name)


def _flat(name: str) -> str:
    return name.replace(".", "_")
