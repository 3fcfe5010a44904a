"""A LoRA file's keys, whatever wrote them, read as one table: layer name -> its factors.

Layer names are kohya's, as A1111 reads them: the module's name with '.' written '_' after a
prefix saying where it lives (`lora_unet_`, `lora_te_`, `lora_te1_`, `lora_te2_`, ...); a factor
is what follows the first '.': `lora_down.weight`, `alpha`, `hada_w1_a`, `lokr_w2`, ...
Read so are:
- kohya / A1111 / LyCORIS files, as they are (U-Net names in diffusers' or the original
  `input_blocks` layout; targets.py knows both);
- diffusers / PEFT files: `unet.` (`transformer.` for a DiT) or `text_encoder.` /
  `text_encoder_2.` before the module's name, factors `lora_A`/`lora_B`, `lora.down`/`lora.up`,
  `lora_linear_layer.down`/`.up`, or the old attention-processor `to_q_lora.down` style;
- ComfyUI-style `diffusion_model.` names (the original layout);
- a denoiser's module names alone, with PEFT's or kohya's factors (`lora_down.weight`, `alpha`),
  as Qwen-Image-Lightning's files have them.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ldm_cli.errors import LdmError

# factor names, as kohya and LyCORIS write them
LORA = ("lora_down.weight", "lora_up.weight")
LOHA = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
FACTORS = {*LORA, "lora_mid.weight", "alpha", *LOHA, "hada_t1", "hada_t2", "lokr_w1", "lokr_w1_a",
           "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "dora_scale"}
# diffusers / PEFT factor spellings -> kohya's
PEFT_FACTORS = {"lora_A.weight": "lora_down.weight", "lora_B.weight": "lora_up.weight",
                "lora_A.default.weight": "lora_down.weight", "lora_B.default.weight": "lora_up.weight",
                "lora.down.weight": "lora_down.weight", "lora.up.weight": "lora_up.weight",
                "lora_linear_layer.down.weight": "lora_down.weight",
                "lora_linear_layer.up.weight": "lora_up.weight", "alpha": "alpha",
                # diffusers' module names with kohya's factors (Qwen-Image-Lightning's files)
                "lora_down.weight": "lora_down.weight", "lora_up.weight": "lora_up.weight",
                "lora_magnitude_vector": "dora_scale", "lora_magnitude_vector.weight": "dora_scale"}
# diffusers component -> kohya prefix (a text encoder's is its number: targets.py also reads
# `lora_te_` for the first)
COMPONENTS = {"unet": "lora_unet_", "transformer": "lora_unet_", "diffusion_model": "lora_unet_",
              "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_", "text_encoder_3": "lora_te3_"}
FLOATS = ("F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2")  # safetensors' names, a pickle's mapped to them
NUMBERS = (*FLOATS, "I8", "I16", "I32", "I64", "U8", "U16", "U32", "U64")  # an alpha may be written as a whole number
PREFIX_ALIASES = {"lora_transformer_": "lora_unet_"}  # some DiT trainers' name for the denoiser
# the old attention-processor layout: attn1.processor.to_q_lora.down.weight
PROCESSOR = re.compile(r"(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")


@dataclass
class LoraFile:
    """A LoRA's layers: name -> {factor: the file's key}; `read(key)` gives a tensor."""
    path: Path
    layers: dict[str, dict[str, str]]
    shapes: dict[str, tuple[int, ...]]
    read: Callable[[str], Any]  # key -> tensor (a view into the file where possible)

    @property
    def name(self) -> str:
        return self.path.stem


def split_key(key: str) -> tuple[str, str] | None:
    """(layer name, factor) of one key; None for a key that is no layer's factor."""
    head, _, factor = key.partition(".")
    if head.startswith("lora_"):  # kohya's layer name; the factor spelled kohya's way or PEFT's
        factor = PEFT_FACTORS.get(factor, factor)
        for alias, prefix in PREFIX_ALIASES.items():
            head = prefix + head.removeprefix(alias) if head.startswith(alias) else head
        return (head, factor) if factor in FACTORS else None
    if m := PROCESSOR.fullmatch(key):
        module = f"{m[1]}.{'to_out.0' if m[2] == 'to_out' else m[2]}"
        return _flat(module), f"lora_{m[3]}.weight"
    for spelling in sorted(PEFT_FACTORS, key=len, reverse=True):
        if key.endswith("." + spelling):
            return _flat(key[:-len(spelling) - 1]), PEFT_FACTORS[spelling]
    return None


def _flat(module: str) -> str:
    """A diffusers module path as a kohya layer name; a path without a component is the denoiser's."""
    component, _, rest = module.partition(".")
    if component not in COMPONENTS:
        component, rest = "unet", module
    return COMPONENTS[component] + rest.replace(".", "_")


def layers(keys: list[str]) -> dict[str, dict[str, str]]:
    out: dict[str, dict[str, str]] = {}
    for key in keys:
        if (found := split_key(key)) is not None:
            out.setdefault(found[0], {})[found[1]] = key
    return out


def kind(factors: dict) -> str | None:
    """lora (LoRA, LoCon, Tucker LoCon), loha, lokr, or None: none ldm can apply."""
    if all(f in factors for f in LORA):
        return "lora"
    if all(f in factors for f in LOHA):
        return "loha"
    has = [f"lokr_w{i}" in factors or {f"lokr_w{i}_a", f"lokr_w{i}_b"} <= set(factors) for i in (1, 2)]
    return "lokr" if all(has) else None


def check(path: Path, found: dict[str, dict[str, str]], shapes: dict[str, tuple[int, ...]],
          dtypes: dict[str, str]) -> None:
    """A file ldm can apply: some layers, each of a kind ldm knows, none with DoRA, each layer's
    factors floating-point numbers whose shapes make a delta (deltas.problem), its alpha one number.
    `dtypes`: safetensors' names (F16, F32, ...)."""
    if not found:
        raise LdmError(f"{path.name} is not a LoRA: it holds no LoRA, LoHa or LoKr weights")
    if any("dora_scale" in factors for factors in found.values()):
        raise LdmError(f"{path.name} is a DoRA (it has dora_scale weights), which ldm does not apply yet")
    unknown = sorted({f for factors in found.values() if kind(factors) is None for f in factors})
    if unknown:
        raise LdmError(f"{path.name} has layers ldm cannot apply (factors {', '.join(unknown)}); "
                       "ldm applies LoRA, LoCon, LoHa and LoKr")
    for factors in found.values():
        _check_layer(path, factors, shapes, dtypes)


def _check_layer(path: Path, factors: dict[str, str], shapes: dict[str, tuple[int, ...]],
                 dtypes: dict[str, str]) -> None:
    from ldm_cli.networks import deltas

    for factor, key in factors.items():
        wanted = NUMBERS if factor == "alpha" else FLOATS
        if dtypes.get(key, "F32") not in wanted:
            raise LdmError(f"{path.name} is not a usable LoRA: {key} holds {dtypes[key]} values, "
                           "not floating-point numbers")
    if "alpha" in factors and math.prod(shapes[factors["alpha"]]) != 1:
        raise LdmError(f"{path.name} is not a usable LoRA: {factors['alpha']} is {list(shapes[factors['alpha']])}, "
                       "not one number")
    if found := deltas.problem(kind(factors), {f: shapes[key] for f, key in factors.items()}):
        raise LdmError(f"{path.name} is not a usable LoRA: {factors[found[0]]} {found[1]}")


def peek(path: Path, allow_pickle: bool) -> None:
    """Check from the header alone, with no tensor read, that `path` is a LoRA ldm can apply
    (a pickle's keys are checked when it loads)."""
    from ldm_cli import files
    from ldm_cli.loading import safety, tensors

    files.check_openable(path)
    kind = safety.sniff(path)
    if kind == "pickle" and not allow_pickle:
        raise safety.refusal(path)
    if kind not in ("safetensors", "pickle"):
        raise LdmError(f"{path.name} is neither a safetensors file nor a PyTorch file; it is not a LoRA")
    if kind == "safetensors":
        header = tensors.read_header(path)[0]
        check(path, layers(list(header)), {k: tuple(e["shape"]) for k, e in header.items()},
              {k: e["dtype"] for k, e in header.items()})


def open_lora(path: Path, allow_pickle: bool) -> LoraFile:
    from ldm_cli.loading import tensors

    checkpoint = tensors.open_checkpoint(path, allow_pickle)
    found = layers(list(checkpoint.shapes))
    check(path, found, checkpoint.shapes, checkpoint.dtypes)
    return LoraFile(path, found, checkpoint.shapes, checkpoint.get)
