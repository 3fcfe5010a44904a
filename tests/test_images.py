import os

import numpy as np
import pytest
from PIL import Image

from ldm_cli import images
from ldm_cli.errors import LdmError


def picture():
    return Image.new("RGB", (8, 8), (200, 10, 10))


def test_names_are_numbered_and_never_overwrite(tmp_path):
    (tmp_path / "00007-1.png").write_bytes(b"someone else's")
    first = images.save_png(picture(), tmp_path, "42", {"parameters": "x"})
    second = images.save_png(picture(), tmp_path, "42", {"parameters": "y"})
    assert (first.name, second.name) == ("00008-42.png", "00009-42.png")
    assert (tmp_path / "00007-1.png").read_bytes() == b"someone else's"
    assert images.read_text_chunks(second) == {"parameters": "y"}


def test_a_taken_name_moves_on_instead_of_overwriting(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "_next_number", lambda folder: 3)
    (tmp_path / "00003-5.png").write_bytes(b"keep me")
    saved = images.save_png(picture(), tmp_path, "5", {})
    assert saved.name == "00004-5.png"
    assert (tmp_path / "00003-5.png").read_bytes() == b"keep me"


def test_a_failed_write_leaves_nothing(tmp_path, monkeypatch):
    def broken(self, fp, format=None, **kw):
        fp.write(b"\x89PNG half")
        raise KeyboardInterrupt

    monkeypatch.setattr(Image.Image, "save", broken)
    with pytest.raises(KeyboardInterrupt):
        images.save_png(picture(), tmp_path, "1", {})
    assert os.listdir(tmp_path) == []


def test_unwritable_folder_is_a_user_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(LdmError, match="cannot write to output folder"):
        images.check_writable(blocker / "sub")


@pytest.mark.parametrize("content", [b"", b"not a png at all", b"\x89PNG\r\n\x1a\n\x00\x00"])
def test_unreadable_images_are_user_errors(tmp_path, content):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    with pytest.raises(LdmError, match="not a readable image"):
        images.read_text_chunks(bad)


# -- reading pictures and masks: every mode becomes 8 bits, scaled, never clipped ---------------------
RAMP16 = np.linspace(0, 65535, 32 * 16).round().astype(np.uint16).reshape(16, 32)


def expected_8bit(values: np.ndarray, white: float) -> np.ndarray:
    return np.rint(values.astype(np.float64) * 255 / white).astype(np.uint8)


def saved(tmp_path, image: Image.Image, name: str, **kw):
    path = tmp_path / name
    image.save(path, **kw)
    return path


@pytest.mark.parametrize("name, make, white", [
    ("g16.png", lambda: Image.fromarray(RAMP16), 65535),  # I;16: the almost-white PNG
    ("g16.tif", lambda: Image.fromarray(RAMP16), 65535),
    ("g16b.tif", lambda: Image.frombytes("I;16B", (32, 16), RAMP16.astype(">u2").tobytes()), 65535),
    ("i32.tif", lambda: Image.fromarray(RAMP16.astype(np.int32)), 65535),  # 32-bit holding 16-bit values
    ("i8.tif", lambda: Image.fromarray((RAMP16 >> 8).astype(np.int32)), 255),  # 32-bit holding 8-bit values
    ("f.tif", lambda: Image.fromarray((RAMP16 / 65535).astype(np.float32)), 1.0),  # float fractions
])
def test_deep_grey_is_scaled_to_8_bits_in_pictures_and_masks(tmp_path, name, make, white):
    source = make()
    path = saved(tmp_path, source, name)
    want = expected_8bit(np.asarray(source), white)
    picture_px, mask_px = np.asarray(images.load_image(path)), np.asarray(images.load_image(path, "L"))
    assert picture_px.shape == (16, 32, 3) and mask_px.shape == (16, 32)
    assert np.abs(picture_px.astype(int) - want[..., None]).max() <= 1
    assert np.abs(mask_px.astype(int) - want).max() <= 1
    assert (mask_px == 255).mean() < 0.01 and (mask_px < 128).mean() > 0.45  # not the 99.5% white


def test_a_16_bit_mask_keeps_its_black_half(tmp_path):
    half = np.zeros((16, 32), np.uint16)
    half[:, 16:] = 65535
    mask = np.asarray(images.load_image(saved(tmp_path, Image.fromarray(half), "m16.png"), "L"))
    assert (mask[:, :16] == 0).all() and (mask[:, 16:] == 255).all()


@pytest.mark.parametrize("values", [np.full((8, 8), -1.0), np.full((8, 8), 7e4), np.full((8, 8), np.nan)])
def test_deep_values_outside_16_bits_are_refused(tmp_path, values):
    path = saved(tmp_path, Image.fromarray(values.astype(np.float32)), "f.tif")
    with pytest.raises(LdmError, match="outside 0-65535.*save it as an 8- or 16-bit image"):
        images.load_image(path)


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (16, 8), (200, 0, 0, 255))
    rgba.paste((0, 0, 0, 0), (0, 0, 8, 8))  # transparent black: must not come out black
    rgba.paste((0, 0, 200, 128), (8, 0, 12, 8))  # half transparent blue
    px = np.asarray(images.load_image(saved(tmp_path, rgba, "a.png"))).astype(int)
    assert (px[:, :8] == 255).all()
    assert np.abs(px[0, 8] - [127, 127, 227]).max() <= 1
    assert (px[:, 12:] == [200, 0, 0]).all()


def test_palette_and_grey_transparency_read_as_white(tmp_path):
    palette = Image.new("P", (8, 8), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30])
    palette.paste(0, (0, 0, 4, 8))
    palette.info["transparency"] = 0
    px = np.asarray(images.load_image(saved(tmp_path, palette, "p.png", transparency=0)))
    assert (px[:, :4] == 255).all() and (px[:, 4:] == [10, 200, 30]).all()
    grey = Image.new("LA", (8, 8), (40, 0))
    grey.paste((40, 255), (4, 0, 8, 8))
    px = np.asarray(images.load_image(saved(tmp_path, grey, "la.png")))
    assert (px[:, :4] == 255).all() and (px[:, 4:] == 40).all()


@pytest.mark.parametrize("mode, name, colour", [("CMYK", "c.tif", (10, 200, 30)), ("1", "b.png", (255, 255, 255)),
                                                ("YCbCr", "y.tif", (10, 200, 30)), ("LAB", "lab.tif", (10, 200, 30))])
def test_other_modes_read_as_their_colours(tmp_path, mode, name, colour):
    rgb = Image.new("RGB", (8, 8), colour)
    if mode == "LAB":
        from PIL import ImageCms

        source = ImageCms.profileToProfile(rgb, ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"),
                                           outputMode="LAB")
    else:
        source = rgb.convert(mode)
    px = np.asarray(images.load_image(saved(tmp_path, source, name))).astype(int)
    assert np.abs(px - colour).max() <= (12 if mode == "LAB" else 3)  # LAB: 8-bit a/b quantisation


def test_a_mask_with_transparency_is_its_opacity(tmp_path):
    strokes = Image.new("RGBA", (16, 8), (255, 255, 255, 0))  # transparent white: kept, not repainted
    strokes.paste((0, 0, 0, 255), (0, 0, 4, 8))  # opaque black brush: repainted, whatever its colour
    strokes.paste((255, 0, 0, 128), (4, 0, 8, 8))
    mask = np.asarray(images.load_image(saved(tmp_path, strokes, "m.png"), "L"))
    assert (mask[:, :4] == 255).all() and (mask[:, 4:8] == 128).all() and (mask[:, 8:] == 0).all()


def test_an_opaque_mask_with_alpha_is_its_grey_levels(tmp_path):
    opaque = Image.new("RGBA", (8, 8), (0, 0, 0, 255))
    opaque.paste((255, 255, 255, 255), (4, 0, 8, 8))
    mask = np.asarray(images.load_image(saved(tmp_path, opaque, "m.png"), "L"))
    assert (mask[:, :4] == 0).all() and (mask[:, 4:] == 255).all()


@pytest.mark.parametrize("name", ["turned.jpg", "turned.png"])
def test_exif_orientation_is_applied_and_image_size_agrees(tmp_path, name):
    stored = Image.new("RGB", (40, 16), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 8, 8))  # top left as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # shown turned 90 degrees clockwise
    path = saved(tmp_path, stored, name, exif=exif)
    upright = images.load_image(path)
    assert upright.size == images.image_size(path) == (16, 40)
    px = np.asarray(upright).astype(int)
    assert np.abs(px[2, 13] - [255, 0, 0]).max() < 40 and np.abs(px[2, 2] - [0, 0, 255]).max() < 40  # now top right


# -- tiny images are refused, big enlargements said -------------------------------------------------
@pytest.mark.parametrize("size", [(1, 1), (7, 64), (64, 4)])
def test_check_min_size_refuses_below_the_vae_factor(size):
    with pytest.raises(LdmError, match=rf"'x.png' is {size[0]}x{size[1]}: too small to start from \(at least 8"):
        images.check_min_size(size, "'x.png'")


def test_check_min_size_passes_from_the_vae_factor_up():
    images.check_min_size((8, 8), "x")
    images.check_min_size((8, 4000), "x")


def test_enlargement_is_said_only_above_4x():
    assert images.enlargement((64, 64), (256, 256)) == ""
    assert images.enlargement((16, 16), (512, 512)) == " (32x larger: little detail to start from)"
    assert "5x" in images.enlargement((100, 8), (100, 40))  # the larger factor of the two sides


def tiny_case(tmp_path, command: str) -> list:
    """The arguments of `command` with one input 4x4 pixels (for inpaint, the mask)."""
    good, tiny = tmp_path / "good.png", tmp_path / "tiny.png"
    Image.new("RGB", (64, 64), (90, 90, 200)).save(good)
    Image.new("L", (4, 4), 255).save(tiny)
    return {"img2img": [tiny, "a fox"], "inpaint": [good, tiny, "a fox"],
            "outpaint": [tiny, "a fox", "--left", 16]}[command]


@pytest.mark.parametrize("command", ["img2img", "inpaint", "outpaint"])
def test_cli_refuses_a_tiny_image_or_mask_in_one_line_before_loading(sd1_folder, tmp_path, command):
    from tests.test_img2img import cli, png_files

    out = tmp_path / "out"
    result = cli(command, *tiny_case(tmp_path, command), "--model", sd1_folder, "--steps", 1, "-o", out)
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("ldm: error: ") and "tiny.png' is 4x4: too small to start from" in result.stderr
    assert ("the mask" in result.stderr) == (command == "inpaint")
    assert png_files(out) == [] and not out.exists()


def test_cli_says_a_big_enlargement(sd1_folder, tmp_path):
    from tests.test_img2img import cli

    small = tmp_path / "small.png"
    Image.new("RGB", (8, 8), (90, 90, 200)).save(small)
    result = cli("img2img", small, "a fox", "-W", 64, "-H", 64, "--model", sd1_folder, "--steps", 1, "-o", tmp_path)
    assert result.exit_code == 0, result.stderr
    assert "is 8x8; resizing it to 64x64 (8x larger: little detail to start from)" in result.stderr


def test_prompt_file_lines_refuse_tiny_images_up_front(tmp_path):
    from ldm_cli import prompts_file
    from ldm_cli.settings import Settings

    Image.new("RGB", (64, 64)).save(tmp_path / "good.png")
    Image.new("RGB", (2, 64)).save(tmp_path / "thin.png")
    Image.new("L", (4, 4), 255).save(tmp_path / "dot.png")
    (tmp_path / "p.txt").write_text("--prompt x --init_image thin.png\n--prompt y --init_image good.png --mask dot.png\n")
    with pytest.raises(LdmError) as e:
        prompts_file.read(tmp_path / "p.txt", Settings())
    first, second = str(e.value).split("\n")[-2:]
    assert first.startswith(f"{tmp_path / 'p.txt'}:1: --init_image ") and "thin.png' is 2x64: too small" in first
    assert second.startswith(f"{tmp_path / 'p.txt'}:2: --mask ") and "dot.png' is 4x4: too small" in second


def test_prompt_file_masks_are_checked_against_the_upright_image(tmp_path):
    from ldm_cli import prompts_file
    from ldm_cli.settings import Settings

    exif = Image.Exif()
    exif[0x0112] = 6  # stored 96x64, shown 64x96
    Image.new("RGB", (96, 64)).save(tmp_path / "photo.jpg", exif=exif)
    mask = Image.new("L", (64, 96), 0)
    mask.paste(255, (0, 0, 32, 32))
    mask.save(tmp_path / "mask.png")
    (tmp_path / "p.txt").write_text("--prompt x --init_image photo.jpg --mask mask.png\n")
    [job] = prompts_file.read(tmp_path / "p.txt", Settings())
    assert job.mask == tmp_path / "mask.png"


def test_an_image_past_the_pixel_limit_is_refused_before_decoding(tmp_path, monkeypatch):
    """Every image ldm opens (init images, masks, control images, PNGs for info and --from-png)
    may have 4 times the largest render's pixels: LDM_MAX_PIXELS 64x64 lets 128x128 through."""
    monkeypatch.setenv("LDM_MAX_PIXELS", "64x64")
    Image.new("RGB", (128, 128)).save(tmp_path / "ok.png")
    Image.new("RGB", (129, 128)).save(tmp_path / "big.png")
    assert images.load_image(tmp_path / "ok.png").size == images.image_size(tmp_path / "ok.png") == (128, 128)
    for read in (images.load_image, images.image_size, images.read_text_chunks):
        with pytest.raises(LdmError, match="'.*big.png' has more than 16,384 pixels"):
            read(tmp_path / "big.png")


def test_the_cli_refuses_a_huge_image_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from ldm_cli.cli import app

    huge, out = str(tmp_path / "huge.png"), str(tmp_path / "o")
    Image.new("1", (9000, 8000)).save(huge)  # 72 M pixels, a few KB
    for args in (["info", huge], ["img2img", huge, "a fox", "--out", out], ["generate", "--from-png", huge, "--out", out]):
        result = CliRunner().invoke(app, args)
        assert result.exit_code == 2 and "has more than 67,108,864 pixels" in result.stderr, result.output
        assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "o").exists()
