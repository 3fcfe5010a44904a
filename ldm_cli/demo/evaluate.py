"""Score an image against the prompt it was made from, attribute by attribute.

Measured, not learned: the background is the border's median colour; the foreground is what
differs from it, and the shape is its largest connected part; colour is read from hue and
brightness, position from the shape's centroid, size from its area, shape from which drawn
template best overlaps its mask. A speck elsewhere (a fifth of the shape's area or less) is
ignored; a second object any larger leaves the shape unread.
"""
from __future__ import annotations

import colorsys
import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from ldm_cli.demo import scenes

ROUGH_CONTRAST = 50.0  # RGB distance from the background that surely belongs to the foreground
SPECK = 0.2  # a second region up to this share of the shape's area is noise, not an object
EDGE = 2  # pixels of soft edge kept around the shape's half-covered core


def parse(prompt: str) -> dict[str, str]:
    """The attributes a prompt names: {"shape": "circle", "background": "blue", ...}."""
    text = prompt.lower()
    found = {}
    background = re.search(r"(\w+) background", text)
    if background and background.group(1) in scenes.BACKGROUNDS:
        found["background"] = background.group(1)
        text = text.replace(background.group(0), " ")
    words = re.findall(r"[a-z]+", text)
    for attribute, names in (("shape", scenes.SHAPES), ("color", scenes.COLORS),
                             ("position", scenes.POSITIONS), ("size", scenes.SIZES)):
        named = [w for w in words if w in names]
        if named:
            found[attribute] = named[0]
    return found


def color_name(rgb: np.ndarray) -> str:
    """Name an RGB colour by brightness (white, gray, black) or, when saturated, by hue."""
    h, s, v = colorsys.rgb_to_hsv(*(float(c) / 255 for c in rgb))
    if v < 0.3:
        return "black"
    if s < 0.25:
        return "white" if v > 0.75 else "gray"
    for name, upper in (("red", 15), ("orange", 42), ("yellow", 75), ("green", 175), ("blue", 250), ("purple", 325)):
        if h * 360 < upper:
            return name
    return "red"


@dataclass
class Reading:
    """What an image shows, as measured."""
    background: str
    color: str | None = None
    shape: str | None = None
    position: str | None = None
    size: str | None = None

    def get(self, attribute: str) -> str | None:
        return getattr(self, attribute)


def border_color(pixels: np.ndarray) -> np.ndarray:
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    return np.median(border, axis=0)


def foreground(pixels: np.ndarray, background: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(coverage, colour): how far each pixel is from the background towards the foreground's
    colour (0..1); a pixel at least half-way there belongs to the shape."""
    rough = np.linalg.norm(pixels - background, axis=-1) > ROUGH_CONTRAST
    if rough.sum() < 4:
        return None
    color = np.median(pixels[rough], axis=0)
    axis = color - background
    coverage = ((pixels - background) @ axis) / (axis @ axis)
    return coverage.clip(0, 1), color


def position_name(mask: np.ndarray) -> str:
    ys, xs = np.nonzero(mask)
    n = mask.shape[0]
    cx, cy = xs.mean() + 0.5, ys.mean() + 0.5
    dx, dy = cx - n / 2, cy - n / 2
    if max(abs(dx), abs(dy)) < n / 6:
        return "center"
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "top" if dy < 0 else "bottom"


def template(shape: str, box: tuple[float, ...], n: int) -> np.ndarray:
    """How much of each pixel a shape drawn in `box` covers (0..1), drawn as the generator draws."""
    k = scenes.SUPERSAMPLE
    image = Image.new("L", (n * k, n * k), 0)
    scenes.draw_shape(ImageDraw.Draw(image), shape, tuple(v * k for v in box), 255)
    return np.asarray(image.resize((n, n), Image.Resampling.BOX), dtype=np.float64) / 255


def extent(profile: np.ndarray) -> tuple[float, float]:
    """Sub-pixel start and end of a shape along one axis, from its per-row (or column) coverage."""
    inside = np.nonzero(profile > 0.1)[0]
    first, last = inside[0], inside[-1]
    return first + 1 - profile[first], last + profile[last]


def shape_name(coverage: np.ndarray) -> str:
    """The shape whose template, drawn in the shape's bounding box, overlaps it best (soft IoU)."""
    (x0, x1), (y0, y1) = extent(coverage.max(axis=0)), extent(coverage.max(axis=1))
    box = (x0, y0, x1, y1)
    def iou(shape: str) -> float:
        t = template(shape, box, coverage.shape[0])
        return np.minimum(t, coverage).sum() / np.maximum(t, coverage).sum()
    return max(scenes.SHAPES, key=iou)


def size_split() -> float:
    """The area between the largest small shape and the smallest large one (geometric mean)."""
    n, jitter = scenes.SIZE, 0.5
    def area(shape: str, half: float) -> int:
        return int((template(shape, (n / 2 - half, n / 2 - half, n / 2 + half, n / 2 + half), n) > 0.5).sum())
    small = max(area(s, scenes.SIZES["small"] + jitter) for s in scenes.SHAPES)
    large = min(area(s, scenes.SIZES["large"] - jitter) for s in scenes.SHAPES)
    return (small * large) ** 0.5


SIZE_SPLIT = size_split()


def largest_part(coverage: np.ndarray) -> tuple[np.ndarray, bool]:
    """(the coverage of the largest connected half-covered region with its soft edge, whether
    it is alone: no other region has more than SPECK of its area)."""
    from scipy import ndimage

    labels, count = ndimage.label(coverage > 0.5)
    areas = np.bincount(labels.ravel())[1:]
    largest = labels == 1 + int(np.argmax(areas))
    alone = count == 1 or np.sort(areas)[-2] <= SPECK * areas.max()
    return coverage * ndimage.binary_dilation(largest, iterations=EDGE), alone


def read(image: Image.Image) -> Reading:
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    background = border_color(pixels)
    reading = Reading(background=color_name(background))
    found = foreground(pixels, background)
    if found is None or not (found[0] > 0.5).any():
        return reading  # no shape: every foreground attribute fails
    coverage, color = found
    coverage, alone = largest_part(coverage)
    mask = coverage > 0.5
    reading.color = color_name(color)
    reading.shape = shape_name(coverage) if alone else None
    reading.position = position_name(mask)
    reading.size = "small" if mask.sum() < SIZE_SPLIT else "large"
    return reading


def score(image: Image.Image, prompt: str) -> dict[str, bool]:
    """For each attribute the prompt names: does the image show it?"""
    reading = read(image)
    return {attribute: reading.get(attribute) == value for attribute, value in parse(prompt).items()}
