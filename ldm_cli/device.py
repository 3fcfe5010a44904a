"""Which device, dtype and CPU threads a run uses."""
from __future__ import annotations

import os

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


# Real denoisers have hundreds of millions of parameters; the built-in model has 1.5 million.
ONE_THREAD_BELOW = 10_000_000


def fit_threads(model) -> None:
    """One CPU thread for a denoiser under ONE_THREAD_BELOW parameters, the process's share of
    the cores for any other. A tiny model's ops take microseconds, less than waking a second
    thread asleep at its barrier (ldm_cli/__init__'s OMP_WAIT_POLICY): the built-in model ran a
    step in 11 ms on one thread and 35 ms on two (2 cores, a fresh process). A thread count the
    user (or a launcher) gave wins."""
    import ldm_cli

    if model.device.type != "cpu" or ldm_cli.THREADS_GIVEN:
        return
    small = sum(p.numel() for p in model.denoiser.parameters()) < ONE_THREAD_BELOW
    torch.set_num_threads(1 if small else int(os.environ["OMP_NUM_THREADS"]))
