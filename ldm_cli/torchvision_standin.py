"""What spandrel takes from torchvision, for machines without it (or with a wheel that does not
load against this torch): `torchvision.transforms.functional`'s InterpolationMode, normalize
and rotate, as torchvision documents them for tensors. spandrel imports them at module level
for two architectures ldm does not run (LaMa, RestoreFormer); libraries.import_spandrel()
registers this module in torchvision's place only while spandrel imports.

rotate covers what torchvision's tensor path does with `center` and `expand` left at their
defaults; anything else raises rather than answer differently from torchvision.
"""
from __future__ import annotations

import math
import types
from enum import Enum

NAMES = ("torchvision", "torchvision.transforms", "torchvision.transforms.functional")


class InterpolationMode(Enum):
    """torchvision's interpolation names (the values are its strings)."""
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def normalize(tensor, mean: list[float], std: list[float], inplace: bool = False):
    """(tensor - mean) / std per channel of a float (..., C, H, W) tensor."""
    import torch

    if not tensor.is_floating_point():
        raise TypeError(f"Input tensor should be a float tensor. Got {tensor.dtype}.")
    if tensor.ndim < 3:
        raise ValueError(f"Expected tensor to be a tensor image of size (..., C, H, W). Got tensor.size() = {tensor.size()}")
    mean = torch.as_tensor(mean, dtype=tensor.dtype, device=tensor.device)
    std = torch.as_tensor(std, dtype=tensor.dtype, device=tensor.device)
    if (std == 0).any():
        raise ValueError(f"std evaluated to zero after conversion to {tensor.dtype}, leading to division by zero.")
    mean, std = (v.view(-1, 1, 1) if v.ndim == 1 else v for v in (mean, std))
    out = tensor if inplace else tensor.clone()
    return out.sub_(mean).div_(std)


def rotate(img, angle: float, interpolation: InterpolationMode = InterpolationMode.NEAREST,
           expand: bool = False, center=None, fill=None):
    """`img` (..., C, H, W) turned `angle` degrees counter-clockwise about its centre, sampled at
    pixel centres (nearest or bilinear); what falls outside is zero, or `fill` (a number or one
    per channel)."""
    import torch

    if not isinstance(angle, (int, float)):
        raise TypeError("Argument angle should be int or float")
    if interpolation not in (InterpolationMode.NEAREST, InterpolationMode.BILINEAR):
        raise ValueError(f"Interpolation mode '{interpolation}' is unsupported with Tensor input")
    if expand or center is not None:
        raise NotImplementedError("ldm's torchvision stand-in rotates about the centre, without expand")
    shape = img.shape
    batch = img.reshape(-1, *shape[-3:])
    dtype = img.dtype if img.is_floating_point() else torch.float32
    grid = _rotation_grid(math.radians(angle), shape[-1], shape[-2], dtype, img.device).expand(len(batch), -1, -1, -1)
    return _sampled(batch.to(dtype), grid, interpolation.value, fill).to(img.dtype).reshape(shape)


def _rotation_grid(turn: float, w: int, h: int, dtype, device):
    """For each output pixel centre, where it comes from in grid_sample's [-1, 1] coordinates:
    the inverse rotation, about the image centre, in pixel units."""
    import torch

    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype, device=device) - (h - 1) / 2,
                            torch.arange(w, dtype=dtype, device=device) - (w - 1) / 2, indexing="ij")
    cos, sin = math.cos(turn), math.sin(turn)
    # y grows downwards, so a counter-clockwise turn on screen reads the source at (R^-1) p
    source_x = cos * xs - sin * ys
    source_y = sin * xs + cos * ys
    return torch.stack((source_x / (w / 2), source_y / (h / 2)), dim=-1).unsqueeze(0)


def _sampled(batch, grid, mode: str, fill):
    import torch
    import torch.nn.functional as F

    if fill is None:
        return F.grid_sample(batch, grid, mode=mode, padding_mode="zeros", align_corners=False)
    # a channel of ones says how much of each output pixel came from inside the image
    ones = torch.ones_like(batch[:, :1])
    out = F.grid_sample(torch.cat((batch, ones), 1), grid, mode=mode, padding_mode="zeros", align_corners=False)
    inside, out = out[:, -1:], out[:, :-1]
    values = [float(v) for v in fill] if isinstance(fill, (list, tuple)) else [float(fill)]
    colour = torch.tensor(values, dtype=out.dtype, device=out.device).view(1, -1, 1, 1).expand_as(out)
    if mode == "nearest":
        return torch.where(inside.expand_as(out) < 0.5, colour, out)
    return out * inside + (1 - inside) * colour


def modules() -> dict[str, types.ModuleType]:
    """torchvision, torchvision.transforms and its functional module, holding this module's functions."""
    made = {name: types.ModuleType(name, "ldm's stand-in (ldm_cli/torchvision_standin.py)") for name in NAMES}
    functional = made["torchvision.transforms.functional"]
    functional.InterpolationMode, functional.normalize, functional.rotate = InterpolationMode, normalize, rotate
    made["torchvision.transforms"].functional = functional
    made["torchvision.transforms"].InterpolationMode = InterpolationMode
    made["torchvision"].transforms = made["torchvision.transforms"]
    for name in NAMES[:2]:
        made[name].__path__ = []  # packages, so that their submodules import
    return made
