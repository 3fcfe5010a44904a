"""Weights stored in fewer bits than they compute in, the one place that knows each format:

- float8 (e4m3fn, e5m2): upcast to the compute dtype as they are read.
- ComfyUI's scaled float8 (`*_fp8_scaled` files: a `scaled_fp8` marker, and beside each float8
  weight a `.scale_weight` it must be multiplied by; without the multiply the weights are far too
  small and images come out white). The multiply happens as the stored tensor is read, before a
  fused tensor is split. `.scale_input` only serves float8 matmuls, which ldm does not run.
- ComfyUI's newer mixed-precision files (`*_fp8_mixed`): some layers float8, each with a
  `.weight_scale` (a scalar, or one per row) and an `.input_scale` beside it, the rest in bf16;
  which layers, and in what format, is said per layer by a `.comfy_quant` tensor (the JSON's
  bytes, `{"format": "float8_e4m3fn"}`) and/or the header's `_quantization_metadata`
  (`{"format_version": "1.0", "layers": {layer: {"format": ...}}}`). float8 layers are
  multiplied by their `.weight_scale` as read, as the older form; the formats ldm cannot
  dequantize (nvfp4, mxfp8, int8) are refused in one line before anything is read.
- GGUF (llama.cpp's format; city96's FLUX and T5 files), read with the `gguf` package: quantized
  weights stay quantized in memory as diffusers' GGUFParameter, their Linear layers become
  diffusers' GGUFLinear, which dequantizes at each call; weights stored F32/F16/BF16 are plain.
  Layers a model keeps in fp32 (T5's `wo`) and non-Linear weights are dequantized once, as
  diffusers' GGUF quantizer does.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ldm_cli.errors import LdmError

if TYPE_CHECKING:
    import torch

# scaled float8's bookkeeping (the older form's and the mixed-precision one's), never a weight
SIDE_TENSORS = (".scale_weight", ".scale_input", "scaled_fp8", ".weight_scale", ".input_scale", ".comfy_quant")
SCALES = ("scale_weight", "weight_scale")  # a float8 weight's multiplier: the older name, the newer
MIXED_MARK = ".comfy_quant"
MIXED_METADATA = "_quantization_metadata"
MIXED_FLOAT8 = {"float8_e4m3fn", "float8_e5m2"}  # ComfyUI's per-layer formats that are float8 times a scale
FLOAT8 = {"F8_E4M3": "fp8_e4m3fn", "F8_E5M2": "fp8_e5m2"}
PLAIN = ("F32", "F16", "BF16")  # GGUF types that are not quantized
# Where each GGUF block keeps its fp16 scales (d, and dmin where it has one), in bytes from the
# block's start (llama.cpp's block structs); the rest of a block is integer codes, never NaN.
SCALE_OFFSETS = {"Q4_0": (0,), "Q4_1": (0, 2), "Q5_0": (0,), "Q5_1": (0, 2), "Q8_0": (0,), "IQ4_NL": (0,),
                 "IQ4_XS": (0,), "Q2_K": (80, 82), "Q3_K": (108,), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


def is_quantized(dtype: str) -> bool:
    """A GGUF block quantization (Q8_0, Q4_K, IQ4_XS, ...), as opposed to a float or integer dtype."""
    return dtype.startswith(("Q", "IQ", "TQ"))


def weight_keys(checkpoint, prefixes: list[str]) -> list[str]:
    """The keys under `prefixes` that hold weights: floats or quantized blocks, not scales."""
    return [k for k, d in checkpoint.dtypes.items() if k.startswith(tuple(prefixes)) and not k.endswith(SIDE_TENSORS)
            and (d.startswith(("F", "BF")) or is_quantized(d))]


def scale_key(checkpoint, key: str) -> str | None:
    """Where the scale of a scaled-float8 weight lies, if it has one (`.scale_weight`, or the
    mixed-precision files' `.weight_scale`)."""
    if not key.endswith(".weight"):
        return None
    return next((s for s in (key.removesuffix("weight") + name for name in SCALES) if s in checkpoint.shapes), None)


def mixed_formats(checkpoint) -> dict[str, str]:
    """Each layer's format in a ComfyUI mixed-precision file (layer -> "float8_e4m3fn", ...): its
    `.comfy_quant` tensor's, else the header's `_quantization_metadata`; empty for any other file."""
    from ldm_cli import untrusted_json

    formats = {}
    if MIXED_METADATA in checkpoint.metadata:
        data = untrusted_json.loads(checkpoint.metadata[MIXED_METADATA], f"{checkpoint.name}'s {MIXED_METADATA}")
        layers = data.get("layers") if isinstance(data, dict) else None
        formats = {k: v.get("format") for k, v in (layers or {}).items() if isinstance(v, dict)}
    for key in (k for k in checkpoint.shapes if k.endswith(MIXED_MARK)):
        raw = checkpoint.get(key)
        data = untrusted_json.loads(bytes(raw.flatten().tolist()), f"{checkpoint.name}'s {key!r}")
        formats[key.removesuffix(MIXED_MARK)] = data.get("format") if isinstance(data, dict) else None
    return formats


def check_mixed(checkpoint) -> None:
    """A mixed-precision file's layers are all in formats ldm dequantizes: one line otherwise,
    before anything is read."""
    formats = mixed_formats(checkpoint)
    if unread := sorted({str(f) for f in formats.values() if f not in MIXED_FLOAT8}):
        layer = next(k for k, f in formats.items() if str(f) == unread[0])
        raise LdmError(f"{checkpoint.name} stores {layer!r} (and {sum(str(f) in unread for f in formats.values()) - 1} "
                       f"more layers) in ComfyUI's {', '.join(unread)} format, which ldm cannot dequantize; use its "
                       "fp8, fp8_scaled or bf16 file")


def read(checkpoint, key: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The weight at `key` on `device`, dequantized to `dtype`, or still quantized (GGUF) and copied."""
    import torch

    stored = checkpoint.get(key)
    if is_quantized(checkpoint.dtypes[key]):
        blocks = stored.to(device=device, copy=True)
        check_scales(checkpoint, key, blocks)
        return blocks
    if (scale := scale_key(checkpoint, key)) is None:
        return stored.to(device=device, dtype=dtype, copy=True)
    factor = checkpoint.get(scale).to(device=device, dtype=torch.float32)
    rows = factor.reshape(-1, *[1] * (stored.dim() - 1)) if factor.numel() > 1 else factor  # per-row or one
    return (stored.to(device=device, dtype=torch.float32) * rows).to(dtype)


def check_scales(checkpoint, key: str, blocks: torch.Tensor) -> None:
    """A GGUF weight's block scales are finite: one NaN scale makes its layer, and every image, NaN."""
    import gguf
    import torch

    quant = checkpoint.dtypes[key]
    if quant in SCALE_OFFSETS:  # the scales alone: 2 bytes of each block
        raw = blocks.as_subclass(torch.Tensor).reshape(-1, gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[quant]][1])
        values = torch.cat([raw[:, o:o + 2] for o in SCALE_OFFSETS[quant]], dim=1).contiguous().view(torch.float16)
    else:  # a type diffusers learnt after this table: dequantized whole
        from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

        values = dequantize_gguf_tensor(blocks)
    if not bool(torch.isfinite(values).all()):
        raise LdmError(f"{checkpoint.name} is corrupt: its GGUF tensor {key!r} has NaN or inf scales, which would "
                       "make every image black; download it again")


def storage(checkpoint, prefix: str) -> str:
    """How most of the weights under `prefix` are stored: bf16, fp8_e4m3fn, fp8_e4m3fn scaled, Q8_0, ..."""
    counts: dict[str, int] = {}
    for key in weight_keys(checkpoint, [prefix]):
        counts[checkpoint.dtypes[key]] = counts.get(checkpoint.dtypes[key], 0) + math.prod(checkpoint.shapes[key])
    top = max(counts, key=counts.get) if counts else "?"
    scaled = top in FLOAT8 and any(k.startswith(prefix) and k.endswith(".scale_weight") for k in checkpoint.shapes)
    names = {"F32": "fp32", "F16": "fp16", "BF16": "bf16", **FLOAT8}
    return names.get(top, top) + (" scaled" if scaled else "") + mixed_storage(checkpoint, prefix)


def mixed_storage(checkpoint, prefix: str) -> str:
    """ComfyUI's mixed precision under `prefix`, as `ldm info` names it: its layers' formats."""
    formats = sorted({str(f) for layer, f in mixed_formats(checkpoint).items() if layer.startswith(prefix)})
    if formats:
        return f" mixed precision ({', '.join(formats)} layers, comfy_quant)"
    scaled = any(k.startswith(prefix) and k.endswith(".weight_scale") for k in checkpoint.shapes)
    return " mixed precision (weight_scale)" if scaled else ""


# -- GGUF -------------------------------------------------------------------------------------------
def read_gguf(path: Path) -> tuple[dict, dict, dict, Callable[[str], Any]]:
    """(shapes, dtypes, metadata, key -> tensor) of a .gguf file; shapes as the model sees them
    (GGUF lists dimensions innermost first)."""
    reader = gguf_reader(path)
    from diffusers.quantizers.gguf.utils import SUPPORTED_GGUF_QUANT_TYPES

    tensors = {t.name: t for t in reader.tensors}
    for t in tensors.values():
        if t.tensor_type.name not in PLAIN and t.tensor_type not in SUPPORTED_GGUF_QUANT_TYPES:
            supported = ", ".join(sorted(q.name for q in SUPPORTED_GGUF_QUANT_TYPES if q.name not in PLAIN))
            raise LdmError(f"{path.name} stores {t.name!r} as GGUF {t.tensor_type.name}, which ldm cannot dequantize; "
                           f"use a file quantized as one of {supported}")
    shapes = {name: tuple(int(d) for d in reversed(t.shape)) for name, t in tensors.items()}
    dtypes = {name: t.tensor_type.name for name, t in tensors.items()}
    return shapes, dtypes, {}, lambda key: gguf_tensor(tensors[key])  # no ldm metadata lives in GGUF files


def gguf_reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise LdmError(f"{path.name} is a GGUF file, which needs the gguf package: pip install gguf") from None
    from ldm_cli.loading import gguf_header

    gguf_header.check(path)  # every count in the header fits the file, before the reader allocates
    try:
        return gguf.GGUFReader(path, "c")  # copy-on-write: never writes the file
    except ValueError as e:
        if "GGMLQuantizationType" in str(e):  # a type newer than the installed gguf package
            raise LdmError(f"{path.name} uses a GGUF quantization type the installed gguf package cannot read "
                           f"({e}); update gguf (pip install -U gguf) or use a Q8_0/Q5_K/Q4_K file") from None
        raise corrupt_gguf(path) from None
    except (IndexError, KeyError, TypeError, OSError):
        raise corrupt_gguf(path) from None


def corrupt_gguf(path: Path) -> LdmError:
    return LdmError(f"{path.name} is truncated or corrupt (its GGUF header or tensor data is cut short or malformed); "
                    "download it again")


def gguf_tensor(t) -> torch.Tensor:
    """A view into the mapped file: a plain tensor, or the raw blocks as a GGUFParameter."""
    import torch
    from diffusers.quantizers.gguf.utils import GGUFParameter

    data = torch.from_numpy(t.data)
    if t.tensor_type.name == "BF16":  # stored as raw bytes
        return data.view(torch.bfloat16)
    if t.tensor_type.name in PLAIN:
        return data
    return GGUFParameter(data, quant_type=t.tensor_type)


def place(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Put the quantized weights of `state` into `module` (their Linear layers becoming GGUFLinear)
    and return the rest, for load_state_dict; weights GGUFLinear cannot hold are dequantized."""
    import torch

    gguf_utils = sys.modules.get("diffusers.quantizers.gguf.utils")
    if gguf_utils is None:  # what makes GGUF weights was never imported: there are none (and gguf stays unloaded)
        return state
    GGUFParameter, dequantize_gguf_tensor = gguf_utils.GGUFParameter, gguf_utils.dequantize_gguf_tensor
    quantized = {k for k, v in state.items() if isinstance(v, GGUFParameter)}
    if not quantized:
        return state
    compute = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    kept = {k for k in quantized if stays_quantized(module, k)}
    rest = {k: (dequantize_gguf_tensor(v).to(compute) if k in quantized - kept else v)
            for k, v in state.items() if k not in kept}
    for key in kept:
        owner = to_gguf_linear(module, key.removesuffix(".weight"), compute)
        owner._parameters["weight"] = state[key]
    return rest


def stays_quantized(module: torch.nn.Module, key: str) -> bool:
    import torch

    path, _, leaf = key.rpartition(".")
    fp32 = getattr(module, "_keep_in_fp32_modules", None) or []
    return (leaf == "weight" and isinstance(module.get_submodule(path), torch.nn.Linear)
            and not any(part in fp32 for part in path.split(".")))


def to_gguf_linear(module: torch.nn.Module, path: str, compute: torch.dtype) -> torch.nn.Module:
    """Replace the Linear at `path` by diffusers' GGUFLinear, built empty."""
    from accelerate import init_empty_weights
    from diffusers.quantizers.gguf.utils import GGUFLinear

    parent, _, name = path.rpartition(".")
    old = module.get_submodule(path)
    with init_empty_weights():
        new = GGUFLinear(old.in_features, old.out_features, old.bias is not None, compute_dtype=compute)
    new.requires_grad_(False)
    module.get_submodule(parent)._modules[name] = new
    return new
