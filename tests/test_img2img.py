"""img2img: the image is encoded, noised to the timestep strength selects and denoised over the
remaining steps, as diffusers' img2img pipelines do (parity within 2/255); strength 1 is
text-to-image at the image's size, strength 0 the image through the VAE; the CLI records the
strength and the init image's hash and refuses bad input in one line."""
import functools
import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from typer.testing import CliRunner

from ldm_cli import img2img, loading, pipeline, schedulers, strength, vae
from ldm_cli.cli import app
from ldm_cli.settings import Settings

PIPELINES = {"sd1": "StableDiffusionImg2ImgPipeline", "sd2": "StableDiffusionImg2ImgPipeline",
             "sdxl": "StableDiffusionXLImg2ImgPipeline"}


# -- helpers shared with the inpaint and outpaint tests -------------------------------------------
def picture(width: int = 64, height: int = 64) -> Image.Image:
    """A gradient with grain and a green disc: something a VAE and a blend can visibly get wrong."""
    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, width)[None, :, None] * np.ones((height, 1, 3)) * [1, 0.5, 0.2]
    image = Image.fromarray((ramp + rng.normal(0, 20, (height, width, 3))).clip(0, 255).astype(np.uint8))
    ImageDraw.Draw(image).ellipse((width // 6, height // 5, width * 2 // 3, height * 2 // 3), fill=(30, 200, 90))
    return image


def settings(model, **overrides) -> Settings:
    base = dict(prompt="a red fox in snow", negative="blurry", steps=4, cfg=6.5, seed=1234, scheduler="ddim",
                schedule="default", width=64, height=64)
    return Settings(**{**base, **overrides}).resolve({}, model.native_size)


def diffusers_scheduler(pipe, name: str):
    """Built straight from diffusers' classes, independently of ldm's scheduler table."""
    import diffusers

    extra = {"dpmpp_2m": {"algorithm_type": "dpmsolver++"}}.get(name, {})
    return getattr(diffusers, schedulers.SCHEDULERS[name].cls).from_config(pipe.saved_scheduler_config, **extra)


def load_diffusers(cls_name: str, folder):
    import diffusers

    pipe = getattr(diffusers, cls_name).from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.saved_scheduler_config = pipe.scheduler.config  # the model's own, before a test swaps the scheduler
    return pipe


def run_diffusers(pipe, s: Settings, **kwargs) -> np.ndarray:
    pipe.scheduler = diffusers_scheduler(pipe, s.scheduler)
    out = pipe(s.prompt, negative_prompt=s.negative or None, num_inference_steps=s.steps, guidance_scale=s.cfg,
               strength=s.strength, generator=torch.Generator("cpu").manual_seed(s.seed), output_type="np", **kwargs)
    return (out.images[0] * 255).round().astype(np.int16)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def png_files(folder) -> list:
    return sorted(folder.glob("*.png")) if folder.exists() else []


# -- fixtures ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def folders(sd1_folder, sd2_folder, sdxl_folder):
    return {"sd1": sd1_folder, "sd2": sd2_folder, "sdxl": sdxl_folder}


@pytest.fixture(scope="module")
def ours(folders):
    # on the CPU in fp32, like the diffusers pipelines they are compared with
    return functools.cache(lambda name: loading.load(str(folders[name]), loading.LoadOptions(device="cpu")))


@pytest.fixture(scope="module")
def theirs(folders):
    return functools.cache(lambda cls_name, name: load_diffusers(cls_name, folders[name]))


# -- strength and timesteps -------------------------------------------------------------------------
@pytest.mark.parametrize("name, steps, amount, expected", [
    ("ddim", 40, 0.75, 30), ("euler", 10, 0.5, 5), ("heun", 10, 0.3, 3), ("dpmpp_2m", 4, 1.0, 4), ("ddim", 4, 0.0, 0)])
def test_strength_keeps_the_last_steps(name, steps, amount, expected):
    from tests.tiny_models import SCHEDULER

    s = Settings(steps=steps, strength=amount, scheduler=name, schedule="default")
    scheduler = schedulers.build(name, "default", SCHEDULER)
    scheduler.set_timesteps(steps)
    timesteps = strength.strength_timesteps(scheduler, s)
    assert strength.steps_run(s) == expected
    assert len(timesteps) == len(scheduler.timesteps) - (steps - expected) * scheduler.order
    assert torch.equal(timesteps, scheduler.timesteps[len(scheduler.timesteps) - len(timesteps):])
    if hasattr(scheduler, "set_begin_index"):  # DDIM has no begin index to set
        assert scheduler.begin_index == (steps - expected) * scheduler.order


def test_defaults_give_a_strength_and_drop_mask_settings_from_an_inpainted_png():
    s = img2img.with_defaults(Settings(prompt="a fox", mask_blur=4, only_masked=True, padding=8))
    assert s.to_dict() == {"prompt": "a fox", "negative": "", "strength": 0.75}
    assert img2img.with_defaults(Settings(strength=0.3)).strength == 0.3


# -- parity with diffusers ----------------------------------------------------------------------------
@pytest.mark.parametrize("family, name, strength", [
    ("sd1", "euler_a", 0.75), ("sd2", "dpmpp_2m", 0.75), ("sdxl", "ddim", 0.5)])
def test_matches_diffusers(ours, theirs, family, name, strength):
    model = ours(family)
    s = settings(model, scheduler=name, strength=strength, negative="" if family == "sdxl" else "blurry")
    mine = pixels(img2img.image_to_image(model, [s], [picture()])[0])
    ref = run_diffusers(theirs(PIPELINES[family], family), s, image=picture())
    assert mine.shape == ref.shape == (64, 64, 3)
    assert mine.std() > 1
    assert np.abs(mine - ref).max() <= 2


def test_strength_one_is_text_to_image_at_the_image_size(ours):
    model = ours("sd1")
    s = settings(model, strength=1.0, width=64, height=48)
    steps = []
    mine = img2img.image_to_image(model, [s], [picture(64, 48)], on_step=lambda: steps.append(1))[0]
    assert mine.size == (64, 48)
    assert np.array_equal(pixels(mine), pixels(pipeline.text_to_image(model, [s])[0]))
    assert len(steps) == s.steps


def test_strength_zero_returns_the_image_through_the_vae(ours):
    model = ours("sd1")
    s = settings(model, strength=0.0)
    steps = []
    mine = img2img.image_to_image(model, [s], [picture()], on_step=lambda: steps.append(1))[0]
    latents = vae.encode(model, vae.to_tensor([picture()]), pipeline.generators_for([s]))
    assert steps == []
    assert np.array_equal(pixels(mine), pixels(vae.decode(model, latents)[0]))


def test_a_batch_equals_each_image_alone(ours):
    model = ours("sd1")
    group = [settings(model, strength=0.6, seed=seed, scheduler="euler_a") for seed in (3, 4)]
    together = img2img.image_to_image(model, group, [picture()] * 2)
    for s, image in zip(group, together):
        alone = img2img.image_to_image(model, [s], [picture()])[0]
        assert np.abs(pixels(image) - pixels(alone)).max() <= 2
    assert np.abs(pixels(together[0]) - pixels(together[1])).max() > 10


# -- the command line ----------------------------------------------------------------------------------
def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_saves_images_at_the_image_size_with_strength_and_init_image_hash(sd1_folder, tmp_path):
    source = tmp_path / "odd.png"
    picture(70, 52).save(source)
    result = cli("img2img", source, "a red fox", "--model", sd1_folder, "--steps", 2, "--seed", 5, "-n", 2,
                 "--json", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:10]
    assert [r["seed"] for r in records] == [5, 6]
    assert all(r["strength"] == 0.75 and r["init_image_hash"] == digest for r in records)
    assert (records[0]["width"], records[0]["height"]) == (64, 48)  # rounded down to multiples of 8 ...
    assert "70x52" in result.stderr and "64x48" in result.stderr  # ... and said so
    with Image.open(records[0]["path"]) as saved:
        assert saved.size == (64, 48)
        assert "Denoising strength: 0.75" in saved.text["parameters"]
        assert f"Init image hash: {digest}" in saved.text["parameters"]


def bad_inputs(tmp_path):
    good = tmp_path / "good.png"
    picture().save(good)
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    return {
        "missing file": ([tmp_path / "nope.png", "a fox"], "no such file"),
        "not an image": ([text, "a fox"], "not a readable image"),
        "a folder": ([tmp_path, "a fox"], "is a folder, not a file"),
        "strength above 1": ([good, "a fox", "--strength", 1.5], "--strength must be between 0 and 1"),
        "strength below 0": ([good, "a fox", "--strength", -0.1], "--strength must be between 0 and 1"),
    }


@pytest.mark.parametrize("case", ["missing file", "not an image", "a folder", "strength above 1", "strength below 0"])
def test_cli_bad_input_is_one_line_exit_2_and_no_file(sd1_folder, tmp_path, case):
    args, message = bad_inputs(tmp_path)[case]
    out = tmp_path / "out"
    result = cli("img2img", *args, "--model", sd1_folder, "--steps", 2, "-o", out)
    assert result.exit_code == 2
    assert result.stderr.startswith("ldm: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert png_files(out) == []
