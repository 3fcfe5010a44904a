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
