"""inpaint: inside the mask the result equals diffusers' inpaint pipelines (dedicated 9-channel
models and the latent blend for ordinary ones) within 2/255; where the blurred mask is black the
original pixels are kept byte for byte; --only-masked renders the mask's surroundings and pastes
them back; the metadata and the command line's errors."""
import functools
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from ldm_cli import images, img2img, inpaint, loading
from ldm_cli.errors import LdmError
from ldm_cli.settings import Settings
from tests.test_img2img import cli, load_diffusers, picture, pixels, png_files, run_diffusers, settings

PIPELINES = {"sd1": "StableDiffusionInpaintPipeline", "sd1-inpaint": "StableDiffusionInpaintPipeline",
             "sd2": "StableDiffusionInpaintPipeline", "sdxl": "StableDiffusionXLInpaintPipeline",
             "sdxl-inpaint": "StableDiffusionXLInpaintPipeline"}
BUILTIN = Path(loading.BUILTIN)


def box_mask(size=(64, 64), box=(16, 16, 47, 47)) -> Image.Image:
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return mask


@pytest.fixture(scope="module")
def folders(sd1_folder, sd1_inpaint_folder, sd2_folder, sdxl_folder, sdxl_inpaint_folder):
    return {"sd1": sd1_folder, "sd1-inpaint": sd1_inpaint_folder, "sd2": sd2_folder, "sdxl": sdxl_folder,
            "sdxl-inpaint": sdxl_inpaint_folder}


@pytest.fixture(scope="module")
def ours(folders):
    # on the CPU in fp32, like the diffusers pipelines they are compared with
    return functools.cache(lambda name: loading.load(str(folders[name]), loading.LoadOptions(device="cpu")))


@pytest.fixture(scope="module")
def theirs(folders):
    return functools.cache(lambda name: load_diffusers(PIPELINES[name], folders[name]))


# -- parity, and what is kept ------------------------------------------------------------------------
@pytest.mark.parametrize("name, scheduler, strength, blur", [
    ("sd1", "euler_a", 0.75, 4), ("sd1-inpaint", "euler_a", 0.75, 4), ("sd2", "ddim", 1.0, 0),
    ("sdxl", "euler_a", 1.0, 2), ("sdxl-inpaint", "ddim", 1.0, 0)])
def test_matches_diffusers_inside_and_keeps_the_original_outside(ours, theirs, name, scheduler, strength, blur):
    model = ours(name)
    assert model.is_inpainting == name.endswith("inpaint")
    s = settings(model, scheduler=scheduler, strength=strength, mask_blur=blur, only_masked=False,
                 negative="" if name.startswith("sdxl") else "blurry")
    mine = pixels(inpaint.inpaint(model, [s], [picture()], [box_mask()])[0])
    soft = inpaint.blurred(box_mask(), blur)  # what the model is shown, binarised at one half
    ref = run_diffusers(theirs(name), s, image=picture(), mask_image=soft, height=64, width=64)
    level = np.asarray(soft)
    inside, outside, edge = level >= 128, level == 0, (level > 0) & (level < 128)
    assert np.abs(mine - ref)[inside].max() <= 2
    assert np.array_equal(mine[outside], pixels(picture())[outside])
    assert np.abs(mine - pixels(picture()))[inside].mean() > 10  # repainted, not copied
    if blur:  # the blurred edge lies between the original and the model's picture
        low, high = np.minimum(ref, pixels(picture())), np.maximum(ref, pixels(picture()))
        assert ((mine[edge] >= low[edge] - 3) & (mine[edge] <= high[edge] + 3)).all()


@pytest.mark.parametrize("content", ["latent noise", "latent nothing"])
def test_latent_masked_content_is_what_the_repainted_part_starts_from(ours, content, monkeypatch):
    """A1111's masked content: before noising, the repainted part's latents are the seed's first
    noise (latent noise) or zeros (latent nothing); the kept part's are the image's."""
    from ldm_cli import pipeline, strength, vae

    model = ours("sd1")
    s = settings(model, scheduler="euler", strength=0.6, mask_blur=0, only_masked=False, masked_content=content)
    started = []
    add_noise = strength.add_noise
    monkeypatch.setattr(strength, "add_noise", lambda m, g, sch, latents, *a: started.append(latents) or add_noise(m, g, sch, latents, *a))
    mine = pixels(inpaint.inpaint(model, [s], [picture()], [box_mask()])[0])
    plain = pixels(inpaint.inpaint(model, [s.merged(masked_content="original")], [picture()], [box_mask()])[0])
    image_latents = vae.encode(model, vae.to_tensor([picture()]), pipeline.generators_for([s]))
    inside = inpaint.mask_tensor([box_mask()])[:, :, ::8, ::8].expand_as(image_latents).bool()
    fill = 0 * image_latents if content == "latent nothing" else pipeline.initial_noise(model, [s], pipeline.generators_for([s]))
    assert torch.equal(started[0][~inside], image_latents[~inside])
    assert torch.equal(started[0][inside], fill[inside])
    outside = np.asarray(box_mask()) == 0
    assert np.array_equal(mine[outside], pixels(picture())[outside]) and np.abs(mine - plain).max() > 2


def test_masked_content_fill_paints_the_repainted_part_from_around_it():
    image = Image.new("RGB", (64, 32), (200, 30, 10))
    image.paste((10, 20, 220), (32, 0, 64, 32))
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (32, 0, 64, 32))  # the blue half repainted: only red is around it
    out = np.asarray(inpaint.filled(image, mask))
    assert np.array_equal(out[:, :32], np.asarray(image)[:, :32])  # kept pixels exactly
    assert np.abs(out[:, 32:].astype(int) - [200, 30, 10]).max() <= 1


def test_img2img_with_an_inpainting_model_repaints_all_of_the_image(ours, theirs):
    """A 9-channel model needs a mask: img2img gives it an all-white one, as diffusers' inpaint pipeline would."""
    model = ours("sd1-inpaint")
    s = settings(model, strength=0.75, scheduler="euler_a")
    mine = pixels(img2img.image_to_image(model, [s], [picture()])[0])
    ref = run_diffusers(theirs("sd1-inpaint"), s, image=picture(), mask_image=Image.new("L", (64, 64), 255),
                        height=64, width=64)
    assert np.abs(mine - ref).max() <= 2


def test_only_masked_renders_the_surroundings_and_pastes_them_back(ours):
    model = ours("sd1")
    image, mask = picture(128, 96), box_mask((128, 96), (80, 30, 95, 45))
    s = settings(model, strength=1.0, mask_blur=2, only_masked=True, padding=8)
    result = pixels(inpaint.inpaint(model, [s], [image], [mask])[0])
    level = np.asarray(inpaint.blurred(mask, 2))
    assert result.shape == (96, 128, 3)
    assert np.array_equal(result[level == 0], pixels(image)[level == 0])
    assert np.abs(result - pixels(image))[level >= 128].mean() > 10


# -- masks and regions ----------------------------------------------------------------------------------
@pytest.mark.parametrize("size, box, padding, aspect", [
    ((128, 96), (80, 30, 95, 45), 8, 1.0), ((64, 64), (0, 0, 10, 40), 4, 1.0), ((200, 100), (10, 40, 30, 50), 0, 2.0),
    ((64, 64), (20, 20, 40, 40), 100, 1.0), ((96, 64), (40, 10, 50, 60), 2, 1.5)])
def test_crop_box_holds_the_mask_and_padding_at_the_render_aspect(size, box, padding, aspect):
    mask = box_mask(size, box)
    x1, y1, x2, y2 = inpaint.crop_box(mask, padding, aspect)
    bx1, by1, bx2, by2 = mask.getbbox()
    assert 0 <= x1 <= max(bx1 - padding, 0) and 0 <= y1 <= max(by1 - padding, 0)
    assert min(bx2 + padding, size[0]) <= x2 <= size[0] and min(by2 + padding, size[1]) <= y2 <= size[1]
    w, h = x2 - x1, y2 - y1
    assert abs(w - h * aspect) <= 1 or w == size[0] or h == size[1]


def test_a_mask_of_another_size_is_scaled_to_the_image():
    s = Settings(width=64, height=64, mask_blur=0, only_masked=False)
    region = inpaint.prepare(s, picture(), box_mask((128, 128), (32, 32, 95, 95)))
    assert region.mask.size == (64, 64)
    level = np.asarray(region.mask) >= 128
    assert level[20:44, 20:44].all() and not level[:12].any() and not level[:, 52:].any()


@pytest.mark.parametrize("mask, message", [
    (Image.new("L", (64, 64), 0), "is empty"), (Image.new("L", (64, 64), 100), "is empty"),
    (box_mask((64, 32)), "different aspect ratio"), (box_mask((100, 64)), "different aspect ratio")])
def test_bad_masks_are_refused(mask, message):
    with pytest.raises(LdmError, match=message):
        inpaint.check_mask(mask, (64, 64))


def test_masks_of_the_same_shape_but_rounded_size_are_accepted():
    inpaint.check_mask(box_mask((65, 64)), (64, 64))
    inpaint.check_mask(box_mask((640, 481)), (64, 48))


# -- the command line ------------------------------------------------------------------------------------
@pytest.fixture
def files(tmp_path):
    image, mask = tmp_path / "in.png", tmp_path / "mask.png"
    picture().save(image)
    box_mask().save(mask)
    return image, mask


def test_cli_records_the_mask_settings_and_keeps_the_unmasked_pixels(sd1_folder, files, tmp_path):
    image, _ = files
    mask = tmp_path / "big-mask.png"
    big = box_mask((128, 128), (32, 32, 95, 95))  # another size, the same shape: scaled to the image
    big.save(mask)
    result = cli("inpaint", image, mask, "a red fox", "--model", sd1_folder, "--steps", 2, "--seed", 3, "--json",
                 "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert (record["strength"], record["mask_blur"], record["only_masked"]) == (1.0, 4, False)
    level = np.asarray(inpaint.blurred(images.resized(big, 64, 64), 4))
    with Image.open(record["path"]) as saved:
        text = saved.text["parameters"]
        assert saved.size == (64, 64)
        assert (level == 0).sum() > 500 and np.array_equal(pixels(saved)[level == 0], pixels(picture())[level == 0])
    assert "Denoising strength: 1," in text and "Mask blur: 4" in text and "Init image hash: " in text


def test_only_masked_is_recorded_as_the_inpaint_area_with_its_padding():
    text = inpaint.with_defaults(Settings(prompt="a fox", steps=2, cfg=7, seed=1, width=64, height=64,
                                          scheduler="ddim", only_masked=True)).to_infotext("test")
    assert "Inpaint area: Only masked" in text and "Masked area padding: 32" in text
    assert "Denoising strength: 1," in text and "Mask blur: 4" in text


def bad_inputs(image: Path, mask: Path, tmp_path: Path) -> dict:
    empty, wide, text = tmp_path / "empty.png", tmp_path / "wide.png", tmp_path / "mask.txt"
    Image.new("L", (64, 64), 0).save(empty)
    box_mask((128, 64)).save(wide)
    text.write_text("white is repainted")
    return {
        "missing image": ([tmp_path / "nope.png", mask], "no such file"),
        "missing mask": ([image, tmp_path / "nope.png"], "no such file"),
        "mask not an image": ([image, text], "not a readable image"),
        "empty mask": ([image, empty], "is empty"),
        "mask of another aspect": ([image, wide], "different aspect ratio"),
        "strength above 1": ([image, mask, "--strength", 2], "--strength must be between 0 and 1"),
        "negative blur": ([image, mask, "--mask-blur", -1], "Invalid value for '--mask-blur': -1 is not in the range x>=0."),
        "unknown masked content": ([image, mask, "--masked-content", "latent fog"],
                                   "--masked-content must be one of fill, original, latent noise, latent nothing"),
    }


@pytest.mark.parametrize("case", ["missing image", "missing mask", "mask not an image", "empty mask",
                                  "mask of another aspect", "strength above 1", "negative blur",
                                  "unknown masked content"])
def test_cli_bad_input_is_one_line_exit_2_and_no_file(sd1_folder, files, tmp_path, case):
    args, message = bad_inputs(*files, tmp_path)[case]
    out = tmp_path / "out"
    result = cli("inpaint", *args, "a fox", "--model", sd1_folder, "--steps", 2, "-o", out)
    assert result.exit_code == 2
    assert result.stderr.startswith("ldm: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert png_files(out) == []


# -- the built-in model --------------------------------------------------------------------------------------
def around_the_shape(image: Image.Image, margin: int) -> Image.Image:
    """A white rectangle over whatever differs from the background, plus a margin."""
    px = np.asarray(image, dtype=np.float64)
    ys, xs = np.nonzero(np.linalg.norm(px - px[0, 0], axis=-1) > 50)
    return box_mask(image.size, (xs.min() - margin, ys.min() - margin, xs.max() + margin, ys.max() + margin))


@pytest.mark.slow
@pytest.mark.skipif(not BUILTIN.exists(), reason="the built-in model is not trained yet")
def test_builtin_model_repaints_a_masked_square_as_a_circle_of_the_prompted_colour():
    from ldm_cli.demo import evaluate, scenes

    model = loading.load(None)
    image = scenes.draw(scenes.Scene("square", "red", "center", "large", "white"), random.Random(0))
    mask = around_the_shape(image, model.vae_scale_factor)  # no kept latent cell shows the square
    s = Settings(prompt="a large blue circle in the center, white background", strength=1.0, mask_blur=2,
                 only_masked=False, seed=0).resolve(model.defaults, model.native_size)
    group = [s.merged(seed=seed) for seed in range(6)]
    readings = [evaluate.read(result) for result in inpaint.inpaint(model, group, [image] * 6, [mask] * 6)]
    assert sum(r.color == "blue" and r.shape == "circle" for r in readings) >= 4, readings
