"""Which device and dtype a run uses."""
from __future__ import annotations

import torch

from ldm_cli.errors import LdmError

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def pick_device(name: str = "auto", allow_mps: bool = True) -> torch.device:
    """The device `name` names; "auto" takes CUDA, else MPS (where allowed), else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if allow_mps and getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise LdmError("--device cuda asked for, but PyTorch sees no CUDA device; use --device cpu or install a CUDA build of torch (README)")
    if name == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise LdmError("--device mps asked for, but this PyTorch has no MPS support; use --device cpu")
    if name not in ("cpu", "cuda", "mps"):
        raise LdmError(f"unknown --device {name!r}; choose auto, cpu, cuda or mps")
    return torch.device(name)


def pick_dtype(name: str, device: torch.device, family_cuda_dtype: str = "fp16") -> torch.dtype:
    """fp16 on GPUs (bf16 where the family asks for it), fp32 on the CPU where half is slow."""
    if name == "auto":
        return DTYPES[family_cuda_dtype] if device.type in ("cuda", "mps") else torch.float32
    if name not in DTYPES:
        raise LdmError(f"unknown --dtype {name!r}; choose auto, fp16, bf16 or fp32")
    return DTYPES[name]
