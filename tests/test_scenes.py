import random

import numpy as np

from ldm_cli.demo import scenes


def test_same_seed_same_scene_and_pixels():
    a, b = random.Random(7), random.Random(7)
    sa, sb = scenes.random_scene(a), scenes.random_scene(b)
    assert sa == sb
    assert np.array_equal(np.asarray(scenes.draw(sa, a)), np.asarray(scenes.draw(sb, b)))


def test_images_are_64px_rgb():
    image = scenes.draw(scenes.random_scene(random.Random(0)), random.Random(0))
    assert image.size == (64, 64) and image.mode == "RGB"


def test_held_out_pairs_never_drawn_for_training():
    rng = random.Random(1)
    seen = [scenes.random_scene(rng) for _ in range(500)]
    held = [scenes.random_scene(rng, held_out=True) for _ in range(50)]
    assert not any(s.held_out for s in seen)
    assert all((s.color, s.shape) in scenes.HELD_OUT_PAIRS for s in held)


def test_shapes_read_on_their_background():
    rng = random.Random(2)
    for _ in range(300):
        s = scenes.random_scene(rng)
        assert scenes.contrast(scenes.COLORS[s.color], scenes.BACKGROUNDS[s.background]) >= scenes.MIN_CONTRAST


def test_full_caption_names_every_attribute_in_each_wording():
    scene = scenes.Scene("cross", "orange", "left", "large", "gray")
    for wording in scenes.SEEN_WORDINGS + scenes.HELD_OUT_WORDINGS:
        text = scenes.caption(scene, wording, set(scenes.ATTRIBUTES))
        for word in ("cross", "orange", "left", "large", "gray background"):
            assert word in text, (wording, text)
        assert "  " not in text and not text.startswith(",") and not text.endswith(",")


def test_left_out_attributes_are_not_named():
    scene = scenes.Scene("circle", "red", "top", "small", "black")
    text = scenes.caption(scene, "O P, b", {"shape", "color"})
    assert text == "a red circle"


def test_held_out_wordings_are_new_orders():
    assert not set(scenes.SEEN_WORDINGS) & set(scenes.HELD_OUT_WORDINGS)


def test_caption_examples_from_the_issue():
    scene = scenes.Scene("circle", "red", "left", "large", "white")
    assert scenes.caption(scene, "O P, b", set(scenes.ATTRIBUTES)) == "a large red circle on the left, white background"
    assert scenes.caption(scenes.Scene("circle", "red", "top", "small", "white"), "c, s, p, b",
                          {"shape", "color", "size", "position"}) == "red circle, small, top"
