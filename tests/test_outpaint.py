"""outpaint: the canvas grows by the margins, the new border is inpainted and the original
picture is kept exactly where the blurred mask does not reach."""
import json

import numpy as np
import pytest
from PIL import Image

from ldm_cli import inpaint
from ldm_cli.errors import LdmError
from tests.test_img2img import cli, picture, pixels, png_files


def test_extend_places_the_image_and_masks_exactly_the_new_border():
    image = picture(40, 24)
    canvas, mask = inpaint.extend(image, 8, 4, 0, 12)
    assert canvas.size == mask.size == (48, 40)
    px, level = pixels(canvas), np.asarray(mask)
    assert np.array_equal(px[4:28, 8:48], pixels(image))
    assert (level[4:28, 8:48] == 0).all()
    assert (level[:4] == 255).all() and (level[28:] == 255).all() and (level[:, :8] == 255).all()
    # the border repeats the image's edge pixels
    assert np.array_equal(px[4:28, 0], pixels(image)[:, 0]) and np.array_equal(px[39, 8:], pixels(image)[-1])


@pytest.mark.parametrize("margins, message", [((0, 0, 0, 0), "nothing to outpaint"), ((8, -8, 0, 0), "0 or more")])
def test_extend_refuses_empty_or_negative_margins(margins, message):
    with pytest.raises(LdmError, match=message):
        inpaint.extend(picture(), *margins)


def test_margins_past_the_size_limit_are_refused_before_the_canvas_is_made():
    with pytest.raises(LdmError, match="the outpainted canvas would be 100064x64"):
        inpaint.extend(Image.new("RGB", (64, 64)), 100_000, 0, 0, 0)


def test_cli_paints_the_new_border_and_keeps_the_picture(sd1_folder, tmp_path):
    source = tmp_path / "in.png"
    picture(48, 40).save(source)
    result = cli("outpaint", source, "a red fox", "--left", 16, "--bottom", 8, "--model", sd1_folder,
                 "--steps", 2, "--seed", 9, "--json", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert (record["width"], record["height"], record["strength"], record["mask_blur"]) == (64, 48, 1.0, 4)
    canvas, mask = inpaint.extend(picture(48, 40), 16, 0, 0, 8)
    kept = np.asarray(inpaint.blurred(mask, 4)) == 0
    with Image.open(record["path"]) as saved:
        out = pixels(saved)
    assert out.shape == (48, 64, 3)
    assert kept[:40, 16:].sum() > 0.5 * 40 * 48 and not kept[:, :16].any() and not kept[40:].any()
    assert np.array_equal(out[kept], pixels(canvas)[kept])  # the original picture, where the blur does not reach
    assert np.abs(out[:, :12] - pixels(canvas)[:, :12]).mean() > 10  # the border painted, not the edge fill


def test_cli_without_margins_is_one_line_exit_2_and_no_file(sd1_folder, tmp_path):
    source = tmp_path / "in.png"
    picture().save(source)
    out = tmp_path / "out"
    result = cli("outpaint", source, "a fox", "--model", sd1_folder, "-o", out)
    assert result.exit_code == 2
    assert result.stderr.startswith("ldm: error: nothing to outpaint") and result.stderr.count("\n") == 1
    assert png_files(out) == []


# -- the canvas is never distorted: margins grow to multiples of 8, a size scales it as a whole --------
@pytest.mark.parametrize("size, asked, grown", [
    ((64, 64), (5, 0, 0, 0), (8, 0, 0, 0)),  # the issue's --left 5: 69 wide was squashed to 64
    ((64, 64), (16, 8, 0, 24), (16, 8, 0, 24)),  # already fits: unchanged
    ((64, 64), (1, 0, 1, 0), (4, 0, 4, 0)),  # both asked: they share the growth
    ((70, 52), (16, 0, 0, 0), (18, 2, 0, 2)),  # the picture itself is not a multiple of 8
])
def test_grown_margins(size, asked, grown):
    assert inpaint.grown_margins(size, asked) == grown


def test_grown_margins_fit_and_only_grow_a_little():
    rng = np.random.default_rng(3)
    for _ in range(300):
        size, asked = tuple(rng.integers(8, 100, 2)), tuple(rng.integers(0, 30, 4) * rng.integers(0, 2, 4))
        if not any(asked):
            continue
        grown = inpaint.grown_margins(size, asked)
        (width, height), (asked_width, asked_height) = inpaint.canvas_size(size, grown), inpaint.canvas_size(size, asked)
        assert width % 8 == 0 and height % 8 == 0
        assert all(g >= a for g, a in zip(grown, asked))
        assert width - asked_width < 8 and height - asked_height < 8


def test_grown_margins_still_refuse_nothing_to_outpaint():
    with pytest.raises(LdmError, match="nothing to outpaint"):
        inpaint.grown_margins((70, 52), (0, 0, 0, 0))  # growth must not invent a border to paint


@pytest.mark.parametrize("width, height, size", [(None, None, (80, 64)), (160, None, (160, 128)),
                                                 (None, 32, (40, 32)), (128, None, (128, 104)),
                                                 (120, 96, (120, 96)), (128, 104, (128, 104))])
def test_canvas_render_size_keeps_the_canvas_shape(width, height, size):
    assert inpaint.canvas_render_size((80, 64), width, height) == size


@pytest.mark.parametrize("width, height", [(128, 128), (64, 64), (160, 120)])
def test_canvas_render_size_refuses_another_shape(width, height):
    with pytest.raises(LdmError, match=rf"a {width}x{height} render would stretch the 80x64 canvas"):
        inpaint.canvas_render_size((80, 64), width, height)


def test_cli_rounds_a_margin_up_and_says_so_instead_of_squashing(sd1_folder, tmp_path):
    source = tmp_path / "in.png"
    picture().save(source)
    result = cli("outpaint", source, "a fox", "--left", 5, "--model", sd1_folder, "--steps", 2, "--seed", 3,
                 "--json", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    notes = [line for line in result.stderr.splitlines() if line.startswith("ldm: ")]
    assert notes == ["ldm: outpaint margins grown so each side of the canvas is a multiple of 8 "
                     "(as the model needs): --left 8 (asked 5)"]
    canvas, mask = inpaint.extend(picture(), 8, 0, 0, 0)
    kept = np.asarray(inpaint.blurred(mask, 4)) == 0
    with Image.open(json.loads(result.stdout)["path"]) as saved:
        out = pixels(saved)
    assert out.shape == (64, 72, 3) and kept.sum() > 0.7 * 64 * 64
    assert np.array_equal(out[kept], pixels(canvas)[kept])  # the picture unmoved and unsquashed


def test_cli_scales_the_whole_canvas_to_a_width(sd1_folder, tmp_path):
    source = tmp_path / "in.png"
    picture().save(source)
    result = cli("outpaint", source, "a fox", "--left", 16, "-W", 160, "--model", sd1_folder, "--steps", 2,
                 "--json", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert "the extended canvas is 80x64; resizing it to 160x128" in result.stderr
    canvas, mask = inpaint.extend(picture(), 16, 0, 0, 0)
    scaled = canvas.resize((160, 128), Image.Resampling.LANCZOS)  # both sides by 2: the picture keeps its shape
    kept = np.asarray(inpaint.blurred(mask.resize((160, 128), Image.Resampling.LANCZOS), 4)) == 0
    with Image.open(json.loads(result.stdout)["path"]) as saved:
        out = pixels(saved)
    assert out.shape == (128, 160, 3) and kept.sum() > 0.6 * 128 * 128
    assert np.array_equal(out[kept], pixels(scaled)[kept])


def test_cli_refuses_a_size_that_would_stretch_the_canvas(sd1_folder, tmp_path):
    source = tmp_path / "in.png"
    picture().save(source)
    out = tmp_path / "out"
    result = cli("outpaint", source, "a fox", "--left", 16, "-W", 128, "-H", 128, "--model", sd1_folder, "-o", out)
    assert result.exit_code == 2
    assert result.stderr.startswith("ldm: error: a 128x128 render would stretch the 80x64 canvas")
    assert result.stderr.count("\n") == 1 and "--width 128: 128x104" in result.stderr
    assert png_files(out) == []
