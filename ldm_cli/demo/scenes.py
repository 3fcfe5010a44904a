"""The built-in model's world: one flat shape on a plain background, drawn from a seed, and the
captions that describe it.

Some colour-shape pairs and some caption wordings never appear in training ("held out"), so
the quality gate can tell what the model generalises from what it memorised.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

SIZE = 64  # pixels per side
SUPERSAMPLE = 4  # drawn 4x larger then box-filtered: anti-aliased edges, like a photo of a shape
SHAPES = ("circle", "square", "triangle", "cross")
COLORS = {
    "red": (215, 35, 35), "orange": (245, 140, 20), "yellow": (235, 215, 30), "green": (40, 170, 60),
    "blue": (40, 90, 220), "purple": (140, 60, 200), "white": (245, 245, 245), "black": (15, 15, 15),
}
BACKGROUNDS = {"white": (245, 245, 245), "black": (15, 15, 15), "gray": (128, 128, 128), "blue": (40, 90, 220)}
# the shape's centre, as fractions of the image: the middle of that third
POSITIONS = {"left": (1 / 6, 1 / 2), "right": (5 / 6, 1 / 2), "top": (1 / 2, 1 / 6),
             "bottom": (1 / 2, 5 / 6), "center": (1 / 2, 1 / 2)}
SIZES = {"small": 5.5, "large": 11.5}  # half the side of the shape's bounding box, in pixels
ATTRIBUTES = ("shape", "color", "position", "size", "background")
HELD_OUT_PAIRS = frozenset({("red", "triangle"), ("green", "square"), ("blue", "cross"), ("yellow", "circle")})
MIN_CONTRAST = 100  # RGB distance under which a shape does not read on its background
JITTER = 3.0  # pixels the centre may move; colours move by up to 8 per channel


@dataclass(frozen=True)
class Scene:
    shape: str
    color: str
    position: str
    size: str
    background: str

    @property
    def held_out(self) -> bool:
        return (self.color, self.shape) in HELD_OUT_PAIRS


def contrast(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5


def readable(color: str, background: str) -> bool:
    return contrast(COLORS[color], BACKGROUNDS[background]) >= MIN_CONTRAST


def random_scene(rng: random.Random, held_out: bool = False) -> Scene:
    """A scene whose colour-shape pair is seen in training (or held out, if asked)."""
    while True:
        scene = Scene(rng.choice(SHAPES), rng.choice(list(COLORS)), rng.choice(list(POSITIONS)),
                      rng.choice(list(SIZES)), rng.choice(list(BACKGROUNDS)))
        if scene.held_out == held_out and readable(scene.color, scene.background):
            return scene


def shape_box(scene: Scene, rng: random.Random) -> tuple[float, float, float, float]:
    """The shape's bounding box (x0, y0, x1, y1): centred on its position, jittered, inside the image."""
    h = SIZES[scene.size] + rng.uniform(-0.5, 0.5)
    fx, fy = POSITIONS[scene.position]
    cx, cy = (f * SIZE + rng.uniform(-JITTER, JITTER) for f in (fx, fy))
    if scene.shape == "triangle":
        cy -= h / 3  # the triangle's centroid, not its box's centre, sits on the position
    cx, cy = (min(max(c, h + 1), SIZE - 1 - h) for c in (cx, cy))
    return cx - h, cy - h, cx + h, cy + h


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[float, ...], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    else:  # cross: two bars 40% as thick as the box
        t = (x1 - x0) * 0.2
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        draw.rectangle((x0, cy - t, x1, cy + t), fill=fill)
        draw.rectangle((cx - t, y0, cx + t, y1), fill=fill)


def jittered(rgb: tuple[int, int, int], rng: random.Random) -> tuple[int, ...]:
    return tuple(min(255, max(0, c + rng.randint(-8, 8))) for c in rgb)


def draw(scene: Scene, rng: random.Random) -> Image.Image:
    big = SIZE * SUPERSAMPLE
    image = Image.new("RGB", (big, big), jittered(BACKGROUNDS[scene.background], rng))
    box = tuple(v * SUPERSAMPLE for v in shape_box(scene, rng))
    draw_shape(ImageDraw.Draw(image), scene.shape, box, jittered(COLORS[scene.color], rng))
    return image.resize((SIZE, SIZE), Image.Resampling.BOX)


# --- captions ---------------------------------------------------------------------------------
PHRASES = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
           "center": "in the center"}
# A wording orders the parts of a caption: o = "[size] [colour] shape", O = "a [size] [colour] shape",
# c = "[colour] shape" with the size as its own tag, p/P = position as a tag/phrase, b/B = background
# as "x background"/"on a x background". Tag wordings join parts with commas.
SEEN_WORDINGS = ("O P, b", "O P B", "O, p, b", "c, s, p, b", "p, o, b", "o P, b", "b, O P", "c, p, s, b")
HELD_OUT_WORDINGS = ("O B P", "s, b, p, c", "p, O B")


def part(code: str, scene: Scene, keep: set[str]) -> str:
    size = scene.size if "size" in keep else None
    color = scene.color if "color" in keep else None
    words = {
        "o": [size, color, scene.shape], "O": ["a", size, color, scene.shape], "c": [color, scene.shape],
        "s": [size], "p": [scene.position if "position" in keep else None],
        "P": [PHRASES[scene.position] if "position" in keep else None],
        "b": [f"{scene.background} background" if "background" in keep else None],
        "B": [f"on a {scene.background} background" if "background" in keep else None],
    }[code]
    return " ".join(w for w in words if w)


def caption(scene: Scene, wording: str, keep: set[str]) -> str:
    """The scene described in `wording`, naming only the attributes in `keep` (the shape always)."""
    text = " ".join(part(c, scene, keep) if c.isalpha() else c for c in wording.replace(",", " , ").split())
    pieces = (" ".join(p.split()) for p in text.split(","))
    return ", ".join(p for p in pieces if p)

