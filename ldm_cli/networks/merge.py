"""LoRAs merged into the model's weights for a run, W + sum(multiplier * scale * delta), and the
weights restored exactly for the next set.

Each changed weight is summed in fp32 (deltas from every LoRA of the set, in the set's order)
and cast back once to the model's dtype. Before a weight is first changed, its original is
copied to the CPU; restoring copies it back, so the model returns bit for bit to what was
loaded. Subtracting the deltas again would not: in fp16 or bf16, (W + d) - d is not W. The cost
is host memory for the changed layers only (a LoRA on every attention and convolution layer of
SDXL's U-Net: about its size in fp16). Changes are made in place, so weights that are views of
a fused projection (speed.py) stay views.

Everything is checked (`plan`) before any weight changes: a LoRA none of whose layers is in the
model, or one whose layer shapes differ from the model's (made for another family), is refused.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

import torch

from ldm_cli.errors import LdmError
from ldm_cli.networks import deltas, formats
from ldm_cli.networks.targets import Target
from ldm_cli.notes import note_once


@dataclass(frozen=True)
class Applied:
    """One LoRA of a set, with its text-encoder and denoiser multipliers."""
    lora: formats.LoraFile
    te: float = 1.0
    unet: float = 1.0
    mentioned: str = ""  # the name the prompt gave it (its stem or its alias): A1111 records hashes so


@dataclass(frozen=True)
class Contribution:
    applied: Applied
    layer: str
    target: Target
    scale: float  # multiplier x alpha / rank


Plan = dict[tuple[str, str], list[Contribution]]


def plan(components: dict[str, torch.nn.Module], table: dict[str, list[Target]], loras: list[Applied],
         family: str = "this model") -> Plan:
    """Which weight gets which deltas; raises LdmError for a LoRA that does not fit the model."""
    out: Plan = defaultdict(list)
    for applied in loras:
        missing = []
        for layer, factors in applied.lora.layers.items():
            if layer not in table:
                missing.append(layer)
                continue
            for target in table[layer]:
                if target.component not in components:  # a text encoder freed once the prompts were encoded
                    continue
                weight = _weight(components, target)
                out[(target.component, target.module)].append(_contribution(applied, layer, target, weight))
        _report_missing(applied.lora, missing, family)
    return out


def _contribution(applied: Applied, layer: str, target: Target, weight: torch.Tensor) -> Contribution:
    lora, factors = applied.lora, applied.lora.layers[layer]
    if weight.device.type == "meta" or not weight.is_floating_point():
        raise LdmError(f"the LoRA {lora.name!r} cannot be merged into weights kept quantized (GGUF) or offloaded "
                       "layer by layer (--offload sequential); use --offload model, or a model file in fp16/bf16")
    kind = formats.kind(factors)
    shapes = {f: lora.shapes[key] for f, key in factors.items()}
    computed = deltas.checked_shape(kind, {f: s for f, s in shapes.items() if f != "alpha"})
    if computed is None:
        raise LdmError(f"the LoRA {lora.name!r} is broken: the factors of its layer {layer} have shapes that do not "
                       f"fit together ({', '.join(f'{f} {list(s)}' for f, s in shapes.items())})")
    natural = _part_shape(computed, target)
    if not deltas.fits(natural, tuple(weight.shape)):
        raise LdmError(f"the LoRA {lora.name!r} does not fit this model: its layer {layer} changes a "
                       f"{list(natural)} weight where the model's is {list(weight.shape)}; it was made for "
                       "another model family")
    alpha = _alpha(lora, factors["alpha"]) if "alpha" in factors else None
    multiplier = applied.te if target.text else applied.unet
    return Contribution(applied, layer, target, multiplier * deltas.scale(kind, shapes, alpha))


def _alpha(lora: formats.LoraFile, key: str) -> float:
    """A layer's alpha: one finite number (a NaN would turn every weight it touches into NaN)."""
    value = lora.read(key)
    if value.numel() != 1:
        raise LdmError(f"{lora.path.name} is not a usable LoRA: {key} is {list(value.shape)}, not one number")
    if not math.isfinite(alpha := float(value)):
        raise LdmError(f"{lora.path.name} is not a usable LoRA: {key} is {alpha}, not a finite number")
    return alpha


def _report_missing(lora: formats.LoraFile, missing: list[str], family: str) -> None:
    if len(missing) == len(lora.layers):
        raise LdmError(f"the LoRA {lora.name!r} does not fit this model: none of its {len(missing)} layers "
                       f"is in {family} (e.g. {missing[0]}); it was made for another model family")
    if missing:  # as A1111, which applies the layers it finds (said once: a batch resolves each line)
        note_once(f"the LoRA {lora.name!r}: {len(missing)} of its {len(lora.layers)} layers are not in this model "
             f"and were skipped (e.g. {missing[0]})")


def _weight(components: dict[str, torch.nn.Module], target: Target) -> torch.Tensor:
    return components[target.component].get_submodule(target.module).weight


def _part_shape(natural: tuple[int, ...], target: Target) -> tuple[int, ...]:
    """The shape of `target`'s rows of the delta; a fused delta whose rows are not its parts'
    (a crafted file) keeps its own, which then fits no part."""
    if target.part is None or sum(target.split or (natural[0] // 3,) * 3) != natural[0]:
        return natural
    rows = _rows(natural[0], target)
    return (rows.stop - rows.start, *natural[1:])


def _rows(total: int, target: Target) -> slice:
    """The rows of a fused layer's delta that belong to `target`'s part."""
    sizes = target.split or (total // 3,) * 3
    start = sum(sizes[:target.part])
    return slice(start, start + sizes[target.part])


def _check_in_range(total: torch.Tensor, contributions: list[Contribution], dtype: torch.dtype) -> None:
    """The merged weight must hold in the model's dtype (fp16 ends at 65504), NaN nowhere."""
    if not bool((total.abs() <= torch.finfo(dtype).max).all()):
        names = ", ".join(dict.fromkeys(f"{c.applied.lora.path.name} (scale {c.scale:g})" for c in contributions))
        raise LdmError(f"merging {names} into {contributions[0].target.module} overflows its "
                       f"{str(dtype).removeprefix('torch.')} weight; lower the LoRA's weight")


class Merger:
    """The LoRA set merged into a model now, and the originals of the weights it changed."""

    def __init__(self):
        self.originals: dict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def merge(self, components: dict[str, torch.nn.Module], merging: Plan) -> None:
        """Add each planned delta to its weight (after `restore`, onto the originals); a delta or
        sum that is not finite (a LoRA's NaN, an overflow) restores every weight and raises."""
        cache: dict = {}
        try:
            with torch.no_grad():
                for key, contributions in merging.items():
                    weight = _weight(components, contributions[0].target).detach()
                    if key not in self.originals:
                        self.originals[key] = (weight, weight.to("cpu", copy=True))
                    total = weight.float()
                    for c in contributions:
                        total.add_(self._delta(c, weight, cache), alpha=c.scale)
                    _check_in_range(total, contributions, weight.dtype)
                    weight.copy_(total)
        except LdmError:
            self.restore()
            raise

    @staticmethod
    def _delta(c: Contribution, weight: torch.Tensor, cache: dict) -> torch.Tensor:
        """The contribution's delta in the weight's shape, fp32, on its device. The last layer's
        full delta is kept: a fused q/k/v layer feeds three weights in a row."""
        key = (id(c.applied.lora), c.layer)
        if key not in cache:
            cache.clear()
            lora, factors = c.applied.lora, c.applied.lora.layers[c.layer]
            tensors = {f: lora.read(k).to(weight.device, torch.float32) for f, k in factors.items() if f != "alpha"}
            cache[key] = deltas.compute(formats.kind(factors), tensors)
            if not torch.isfinite(cache[key]).all():
                raise LdmError(f"{lora.path.name} is not a usable LoRA: its layer {c.layer} holds NaN or inf values")
        delta = cache[key]
        if c.target.part is not None:
            delta = delta[_rows(delta.shape[0], c.target)]
        if c.target.swap:
            delta = torch.cat(delta.chunk(2)[::-1])
        return deltas.fitted(delta, tuple(weight.shape))

    def forget(self, kept: set[str]) -> None:
        """Drop the originals of every component but `kept` (their modules are gone)."""
        self.originals = {key: v for key, v in self.originals.items() if key[0] in kept}

    def restore(self) -> None:
        """Every changed weight back to its original, exactly."""
        with torch.no_grad():
            for weight, original in self.originals.values():
                weight.copy_(original)
        self.originals.clear()
