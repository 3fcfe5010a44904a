"""Hand-built LoRA files for tests: random factors for chosen layers of a module, under the
names the trainers write (kohya's `lora_unet_...`, diffusers/PEFT's `unet....lora_A.weight`)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file


def layers(module: torch.nn.Module, ends: tuple[str, ...]) -> list[tuple[str, torch.nn.Module]]:
    """The Linear/Conv2d layers of `module` whose names end with one of `ends`."""
    return [(n, m) for n, m in module.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) and n.endswith(ends)]


def factors(m: torch.nn.Module, rank: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(down, up) for layer m: a convolution's kernel in down, up 1x1."""
    if isinstance(m, torch.nn.Conv2d):
        down = torch.randn(rank, m.in_channels, *m.kernel_size, generator=g)
        return 0.1 * down, 0.1 * torch.randn(m.out_channels, rank, 1, 1, generator=g)
    return 0.1 * torch.randn(rank, m.in_features, generator=g), 0.1 * torch.randn(m.out_features, rank, generator=g)


def kohya(chosen: list[tuple[str, torch.nn.Module]], prefix: str, rank: int = 4, alpha: float | None = None,
          spelled: Callable[[str], str] = lambda n: n, seed: int = 0) -> dict[str, torch.Tensor]:
    """kohya's layout: prefix + the (re-spelled) name with '_' for '.', then .lora_down.weight..."""
    g, out = torch.Generator().manual_seed(seed), {}
    for name, m in chosen:
        key = prefix + spelled(name).replace(".", "_")
        out[f"{key}.lora_down.weight"], out[f"{key}.lora_up.weight"] = factors(m, rank, g)
        if alpha is not None:
            out[f"{key}.alpha"] = torch.tensor(float(alpha))
    return out


def peft(chosen: list[tuple[str, torch.nn.Module]], component: str, rank: int = 4,
         spelled: Callable[[str], str] = lambda n: n, seed: int = 0) -> dict[str, torch.Tensor]:
    """diffusers/PEFT's layout: component.name.lora_A.weight / lora_B.weight."""
    g, out = torch.Generator().manual_seed(seed), {}
    for name, m in chosen:
        key = f"{component}.{spelled(name)}"
        out[f"{key}.lora_A.weight"], out[f"{key}.lora_B.weight"] = factors(m, rank, g)
    return out


def write(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path
