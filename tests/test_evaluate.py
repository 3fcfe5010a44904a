import random

import pytest
from PIL import Image, ImageDraw

from ldm_cli.demo import evaluate, scenes


def test_scores_every_attribute_right_on_generator_images():
    rng = random.Random(123)
    for i in range(400):
        scene = scenes.random_scene(rng, held_out=i % 4 == 0)
        reading = evaluate.read(scenes.draw(scene, rng))
        for attribute in scenes.ATTRIBUTES:
            assert reading.get(attribute) == getattr(scene, attribute), (scene, reading)


def test_score_against_a_prompt():
    rng = random.Random(5)
    scene = scenes.Scene("square", "blue", "right", "large", "white")
    image = scenes.draw(scene, rng)
    assert evaluate.score(image, "a large blue square on the right, white background") == dict.fromkeys(
        ("background", "shape", "color", "position", "size"), True)
    assert evaluate.score(image, "red circle, left") == {"shape": False, "color": False, "position": False}


@pytest.mark.parametrize("prompt, expected", [
    ("a red circle", {"shape": "circle", "color": "red"}),
    ("blue background, small white cross, top", {"background": "blue", "color": "white", "shape": "cross",
                                                 "size": "small", "position": "top"}),
    ("a photo of a dog", {}),
])
def test_parse(prompt, expected):
    assert evaluate.parse(prompt) == expected


def test_blank_image_fails_the_foreground_attributes():
    image = Image.new("RGB", (64, 64), scenes.BACKGROUNDS["gray"])
    assert evaluate.score(image, "a small red circle, gray background") == {
        "background": True, "shape": False, "color": False, "size": False}


def test_off_centre_shape_reads_by_its_centroid():
    image = Image.new("RGB", (64, 64), (0, 0, 0))
    ImageDraw.Draw(image).rectangle((2, 40, 14, 52), fill=(250, 250, 250))
    reading = evaluate.read(image)
    assert (reading.position, reading.color, reading.shape) == ("left", "white", "square")


@pytest.mark.parametrize("rgb, name", [((215, 35, 35), "red"), ((245, 140, 20), "orange"),
                                       ((40, 90, 220), "blue"), ((128, 128, 128), "gray"), ((10, 10, 10), "black")])
def test_color_names(rgb, name):
    assert evaluate.color_name(rgb) == name


def _square_on_white(extra=None):
    image = Image.new("RGB", (64, 64), scenes.BACKGROUNDS["white"])
    draw = ImageDraw.Draw(image)
    draw.rectangle((26, 26, 37, 37), fill=scenes.COLORS["red"])
    if extra:
        draw.rectangle(extra, fill=scenes.COLORS["red"])
    return image


def test_a_speck_elsewhere_does_not_change_the_shape():
    # one stray dark pixel in a corner used to stretch the shape's box over the whole image
    image = _square_on_white((1, 1, 2, 2))
    reading = evaluate.read(image)
    assert (reading.shape, reading.position, reading.size) == ("square", "center", "small")


def test_a_second_object_leaves_the_shape_unread():
    reading = evaluate.read(_square_on_white((4, 4, 12, 12)))
    assert reading.shape is None and reading.color == "red"
    assert evaluate.read(_square_on_white()).shape == "square"
