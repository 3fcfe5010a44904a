"""The correctness bar: same weights, prompt, seed, scheduler, steps, cfg and size give the image
diffusers' own pipeline gives, within 2/255 per pixel."""
import numpy as np
import pytest
import torch

from ldm_cli import loading, pipeline, schedulers
from ldm_cli.settings import Settings

CASES = [("ddim", "default"), ("euler_a", "default"), ("dpmpp_2m", "karras"), ("unipc", "default")]


@pytest.fixture(scope="module")
def models(sd1_folder, sd2_folder, sdxl_folder):
    from diffusers import DiffusionPipeline

    out = {}
    for name, folder in [("sd1", sd1_folder), ("sd2", sd2_folder), ("sdxl", sdxl_folder)]:
        theirs = DiffusionPipeline.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
        theirs.set_progress_bar_config(disable=True)
        theirs.original_scheduler_config = theirs.scheduler.config
        out[name] = (loading.load(str(folder)), theirs)
    return out


def diffusers_scheduler(pipe, name, schedule):
    """Built directly from diffusers' classes, independently of ldm's scheduler table."""
    import diffusers

    extra = {"ddim": {}, "euler_a": {}, "unipc": {}, "dpmpp_2m": {"algorithm_type": "dpmsolver++"}}[name]
    if schedule == "karras":
        extra["use_karras_sigmas"] = True
    cls = getattr(diffusers, schedulers.SCHEDULERS[name].cls)
    return cls.from_config(pipe.original_scheduler_config, **extra)


def as_uint8(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
@pytest.mark.parametrize("name, schedule", CASES)
def test_matches_diffusers(models, family, name, schedule):
    ours, theirs = models[family]
    s = Settings(prompt="a red fox in snow", negative="blurry" if family != "sdxl" else "", steps=3, cfg=6.5,
                 seed=1234, scheduler=name, schedule=schedule).resolve({}, ours.native_size)
    mine = as_uint8(pipeline.text_to_image(ours, [s])[0])
    theirs.scheduler = diffusers_scheduler(theirs, name, schedule)
    ref = theirs(s.prompt, negative_prompt=s.negative or None, num_inference_steps=3, guidance_scale=6.5,
                 height=64, width=64, generator=torch.Generator("cpu").manual_seed(1234), output_type="np").images[0]
    ref = (ref * 255).round().astype(np.int16)
    assert mine.shape == ref.shape == (64, 64, 3)
    assert mine.std() > 1  # a real image, not a flat one that would match anything
    assert np.abs(mine - ref).max() <= 2


def test_sdxl_negative_prompt_changes_the_image_and_matches(models):
    ours, theirs = models["sdxl"]
    s = Settings(prompt="a fox", negative="snow", steps=2, cfg=5.0, seed=7, scheduler="ddim").resolve({}, ours.native_size)
    mine = as_uint8(pipeline.text_to_image(ours, [s])[0])
    plain = as_uint8(pipeline.text_to_image(ours, [s.merged(negative="")])[0])
    theirs.scheduler = diffusers_scheduler(theirs, "ddim", "default")
    ref = theirs("a fox", negative_prompt="snow", num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
                 generator=torch.Generator("cpu").manual_seed(7), output_type="np").images[0]
    assert np.abs(mine - (ref * 255).round()).max() <= 2
    assert np.abs(mine - plain).max() > 0
