"""Tiny random upscaler models for tests, built with spandrel's own architecture classes and saved
as .safetensors or .pth under the key names their trainers write."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm_cli.libraries import import_spandrel


def esrgan(scale: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """An ESRGAN (RRDBNet) with one block of 8 filters: the old-style keys detection reads."""
    import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    return _randomised(ESRGAN(num_filters=8, num_blocks=1, scale=scale))


def compact(scale: int = 2, seed: int = 0, gain: float = 0.1) -> dict[str, torch.Tensor]:
    """RealESRGAN's compact SRVGG with 8 features and 2 convolutions: its output is the input
    enlarged (nearest) plus what the convolutions add, a few levels on average at gain 0.1."""
    import_spandrel()
    from spandrel.architectures.Compact import Compact

    torch.manual_seed(seed)
    return _randomised(Compact(num_feat=8, num_conv=2, upscale=scale), gain)


def swinir(seed: int = 0) -> dict[str, torch.Tensor]:
    """A 2x SwinIR with one stage of one block, 8 wide, window 8."""
    import_spandrel()
    from spandrel.architectures.SwinIR import SwinIR

    torch.manual_seed(seed)
    return _randomised(SwinIR(img_size=32, embed_dim=12, depths=[1], num_heads=[2], window_size=8, mlp_ratio=2.0,
                              upscale=2, upsampler="pixelshuffle", resi_connection="1conv"))


def _randomised(module: torch.nn.Module, gain: float = 0.3) -> dict[str, torch.Tensor]:
    """The module's weights drawn again, larger than its init, so its output depends on the input."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * (gain if p.ndim > 1 else gain / 6))
    return {k: v.contiguous() for k, v in module.state_dict().items()}


def save(state: dict[str, torch.Tensor], path: Path, nested: str | None = None) -> Path:
    """As .safetensors, or as a torch pickle (optionally nested under `nested`, as RealESRGAN's params_ema)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save({nested: state} if nested else state, path)
    return path
