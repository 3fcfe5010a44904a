"""An image through an upscaling model in overlapping tiles, blended with feathered edges, so the
model's memory is bounded by the tile rather than the image; a tile the GPU cannot hold is
halved and the image started again.

Tiles are `tile` input pixels a side and overlap their neighbours by at least `overlap`; the last
row and column sit against the image's edge. In the output each tile's weight rises linearly
across the overlap on every side that has a neighbour, and the tiles' outputs are averaged by
weight, so no seam shows where a tile's border (which the model saw without context) meets
the next. An image no larger than a tile is one call, exactly the model's whole-image output.
"""
from __future__ import annotations

from typing import Callable

from ldm_cli.errors import LdmError
from ldm_cli.limits import MIN_TILE
from ldm_cli.notes import note


def starts(length: int, tile: int, overlap: int) -> list[int]:
    """Where tiles begin along one side: every `tile - overlap` pixels, the last against the edge."""
    if length <= tile:
        return [0]
    return [*range(0, length - tile, tile - overlap), length - tile]


def count(size: tuple[int, int], tile: int, overlap: int) -> int:
    """Tiles for an image of `size` (width, height)."""
    return len(starts(size[0], tile, overlap)) * len(starts(size[1], tile, overlap))


def _ramp(length: int, ramp: int, before: bool, after: bool):
    """Weights along one side of a tile: rising over `ramp` pixels at a side with a neighbour."""
    import torch

    weights = torch.ones(length)
    rise = (torch.arange(ramp, dtype=torch.float32) + 0.5) / ramp  # never 0: every pixel counts
    if ramp and before:
        weights[:ramp] = torch.minimum(weights[:ramp], rise)
    if ramp and after:
        weights[-ramp:] = torch.minimum(weights[-ramp:], rise.flip(0))
    return weights


def run(apply: Callable, image, scale: int, tile: int, overlap: int, on_tile: Callable[[], None] = lambda: None):
    """apply() over `image` (1, C, H, W) in tiles, blended; the output (1, C', H*scale, W*scale)
    is float32 on the CPU."""
    import torch

    height, width = image.shape[-2:]
    rows, columns = starts(height, tile, overlap), starts(width, tile, overlap)
    if len(rows) == len(columns) == 1:
        out = apply(image).float().cpu()
        on_tile()
        return out
    th, tw = min(tile, height), min(tile, width)
    total = weight = None
    for y in rows:
        for x in columns:
            piece = apply(image[..., y:y + th, x:x + tw]).float().cpu()
            if total is None:
                total = torch.zeros(1, piece.shape[1], height * scale, width * scale)
                weight = torch.zeros(1, 1, height * scale, width * scale)
            ramp = overlap * scale
            feather = _ramp(th * scale, ramp, y > 0, y < rows[-1])[:, None] * _ramp(tw * scale, ramp, x > 0, x < columns[-1])
            where = (..., slice(y * scale, (y + th) * scale), slice(x * scale, (x + tw) * scale))
            total[where] += piece * feather
            weight[where] += feather
            on_tile()
    return total / weight


def run_halving(apply: Callable, image, scale: int, tile: int, overlap: int,
                on_tile: Callable[[], None] = lambda: None, on_halved: Callable[[int], None] = lambda more: None):
    """(run()'s output, the tile it ran with): the tile halved (and the image started again) each
    time the device runs out of memory; on_halved(tiles to run beyond those planned) lets a
    progress bar follow."""
    import torch

    size = (image.shape[-1], image.shape[-2])
    while True:
        done = [0]

        def counted() -> None:
            done[0] += 1
            on_tile()
        try:
            return run(apply, image, scale, tile, overlap, counted), tile
        except torch.OutOfMemoryError:
            if tile // 2 < MIN_TILE:
                raise LdmError(f"out of memory upscaling even with {tile}-pixel tiles; use --device cpu") from None
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            planned_left = count(size, tile, overlap) - done[0]
            tile //= 2
            overlap = min(overlap, tile // 2)
            note(f"out of memory: upscaling again with {tile}-pixel tiles")
            on_halved(count(size, tile, overlap) - planned_left)
