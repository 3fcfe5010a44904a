"""SD3 and SD3.5 (MMDiT, flow matching, three text encoders) against diffusers' own pipelines:
the same weights, prompt, seed, scheduler, steps, cfg and size give the same image within 2/255
per pixel. Tiny SD3 and SD3.5-medium-like models, loaded from diffusers folders."""
import re
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ldm_cli import img2img, inpaint, loading, pipeline, schedulers
from ldm_cli.strength import steps_run
from ldm_cli.cli import app
from ldm_cli.families import sd3
from ldm_cli.settings import Settings
from tests import flow_parity
from tests.flow_parity import as_pixels, close, load_pairs, pixels

FLOW_SIGMAS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "flow_shift": 3.0}
# Built from diffusers' classes directly, independently of ldm's scheduler table.
THEIR_SCHEDULERS = {"euler": ("FlowMatchEulerDiscreteScheduler", {}), "heun": ("FlowMatchHeunDiscreteScheduler", {}),
                    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", **FLOW_SIGMAS})}


@pytest.fixture(scope="module")
def models(sd3_folder, sd35_medium_folder):
    from diffusers import StableDiffusion3Pipeline

    return load_pairs(StableDiffusion3Pipeline, {"sd3": sd3_folder, "sd35-medium": sd35_medium_folder})


def their_scheduler(pipe, name, **extra):
    return flow_parity.their_scheduler(pipe, THEIR_SCHEDULERS, name, **extra)


def settings(model, **kw) -> Settings:
    base = dict(prompt="a red fox in snow", negative="blurry", steps=3, cfg=6.5, seed=1234, scheduler="euler")
    return Settings(**{**base, **kw}).resolve(model.defaults, model.native_size)


def theirs_txt2img(pipe, s: Settings, **kw) -> np.ndarray:
    pipe.scheduler = their_scheduler(pipe, s.scheduler)
    return as_pixels(pipe(s.prompt, negative_prompt=s.negative, num_inference_steps=s.steps, guidance_scale=s.cfg,
                          height=s.height, width=s.width, generator=torch.Generator("cpu").manual_seed(s.seed),
                          output_type="np", **kw).images[0])


@pytest.mark.parametrize("variant", ["sd3", "sd35-medium"])
@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m"])
def test_txt2img_matches_diffusers(models, variant, name):
    ours, theirs = models[variant]
    s = settings(ours, scheduler=name)
    assert close(pixels(pipeline.text_to_image(ours, [s])[0]), theirs_txt2img(theirs, s))


def test_models_are_told_apart_and_recommend_sd3_settings(models):
    assert [models[v][0].options["variant"] for v in models] == ["sd3", "sd35-medium"]
    ours = models["sd3"][0]
    assert (ours.family.name, ours.family.flow, ours.size_multiple) == ("sd3", True, 16)
    assert {k: ours.defaults[k] for k in ("steps", "cfg", "scheduler", "shift")} == {
        "steps": 28, "cfg": 7.0, "scheduler": "euler", "shift": 3.0}
    assert (sd3.defaults(turbo=True)["steps"], sd3.defaults(turbo=True)["cfg"]) == (4, 1.0)


def test_prompt_and_t5_change_the_image(models):
    """The conditioning reaches the image: another prompt, or no T5, draws something else."""
    ours, _ = models["sd3"]
    s = settings(ours, steps=2)
    base = pixels(pipeline.text_to_image(ours, [s])[0])
    for other in (s.merged(prompt="a blue house"), s.merged(no_t5=True)):
        assert np.abs(base - pixels(pipeline.text_to_image(ours, [other])[0])).max() > 2


def test_no_t5_equals_diffusers_without_text_encoder_3(models):
    from diffusers import StableDiffusion3Pipeline

    ours, theirs = models["sd35-medium"]
    without = StableDiffusion3Pipeline(**{**theirs.components, "text_encoder_3": None, "tokenizer_3": None})
    without.set_progress_bar_config(disable=True)
    without.original_scheduler_config = theirs.original_scheduler_config
    s = settings(ours, no_t5=True)
    assert close(pixels(pipeline.text_to_image(ours, [s])[0]), theirs_txt2img(without, s))


def test_folder_without_t5_runs_without_it(models, sd3_folder, tmp_path, capsys):
    folder = tmp_path / "sd3-no-t5"
    shutil.copytree(sd3_folder, folder, ignore=shutil.ignore_patterns("text_encoder_3", "tokenizer_3"))
    model = loading.load(str(folder))
    assert "running without T5" in capsys.readouterr().err
    assert model.text_encoders[2] is None
    s = settings(model, steps=2)
    assert s.no_t5 is True  # recorded, so a replay with T5 present draws the same image
    full = models["sd3"][0]
    assert np.array_equal(pixels(pipeline.text_to_image(model, [s])[0]),
                          pixels(pipeline.text_to_image(full, [s])[0]))


def test_long_prompt_is_cut_as_diffusers_cuts_it(models, capsys):
    ours, theirs = models["sd3"]
    s = settings(ours, prompt="a red fox in deep snow under a pale winter sky, oil painting", max_sequence_length=8)
    mine = pixels(pipeline.text_to_image(ours, [s])[0])
    [line] = [x for x in capsys.readouterr().err.splitlines() if "T5 tokens" in x]
    assert "--max-sequence-length 8" in line and "cut off" in line
    assert close(mine, theirs_txt2img(theirs, s, max_sequence_length=8))


def test_shift_overrides_the_models(models):
    ours, theirs = models["sd3"]
    s = settings(ours, shift=1.5, steps=2)
    mine = pixels(pipeline.text_to_image(ours, [s])[0])
    theirs.scheduler = their_scheduler(theirs, "euler", shift=1.5)
    ref = theirs(s.prompt, negative_prompt=s.negative, num_inference_steps=2, guidance_scale=s.cfg, height=64, width=64,
                 generator=torch.Generator("cpu").manual_seed(s.seed), output_type="np").images[0]
    assert close(mine, (ref * 255).round().astype(np.int16))
    # a tiny random model's velocity hardly depends on sigma, so the schedule is what is compared
    shifted, plain = (pipeline.make_scheduler(ours, [s.merged(shift=x)]).sigmas for x in (1.5, 3.0))
    assert torch.equal(shifted, theirs.scheduler.sigmas) and not torch.allclose(shifted, plain)


def picture() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8))


# strength 0.7 of 3 steps: diffusers' flow pipelines run all 3 (int(3 - 2.1) = 0 skipped), its SD ones 2
@pytest.mark.parametrize("name, strength, steps", [("euler", 0.7, 3), ("heun", 0.5, 4)])
def test_img2img_matches_diffusers(models, name, strength, steps):
    from diffusers import StableDiffusion3Img2ImgPipeline

    ours, theirs = models["sd3"]
    s = settings(ours, scheduler=name, strength=strength, steps=steps)
    mine = pixels(img2img.image_to_image(ours, [s], [picture()])[0])
    pipe = StableDiffusion3Img2ImgPipeline(**{**theirs.components, "scheduler": their_scheduler(theirs, name)})
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(s.prompt, image=picture(), negative_prompt=s.negative, strength=strength, num_inference_steps=steps,
               guidance_scale=s.cfg, generator=torch.Generator("cpu").manual_seed(s.seed), output_type="np").images[0]
    assert steps_run(s, ours.family) == {0.7: 3, 0.5: 2}[strength]
    assert close(mine, (ref * 255).round().astype(np.int16))


@pytest.mark.parametrize("strength", [1.0, 0.8])
def test_inpaint_matches_diffusers(models, strength):
    """diffusers' SD3 inpainting decodes without the VAE's shift_factor (0.42.1); its latents are
    compared, decoded as its other SD3 pipelines decode them."""
    from diffusers import StableDiffusion3InpaintPipeline

    ours, theirs = models["sd3"]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    s = settings(ours, strength=strength, mask_blur=0, only_masked=False)
    mine = pixels(inpaint.inpaint(ours, [s], [picture()], [mask])[0])
    pipe = StableDiffusion3InpaintPipeline(**{**theirs.components, "scheduler": their_scheduler(theirs, "euler")})
    pipe.set_progress_bar_config(disable=True)
    latents = pipe(s.prompt, image=picture(), mask_image=mask, negative_prompt=s.negative, strength=strength,
                   num_inference_steps=s.steps, guidance_scale=s.cfg, height=64, width=64,
                   generator=torch.Generator("cpu").manual_seed(s.seed), output_type="latent").images
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor)[0]
    ref = (pipe.image_processor.postprocess(decoded, output_type="np")[0] * 255).round().astype(np.int16)
    assert close(mine[:, :32], ref[:, :32])
    assert np.array_equal(mine[:, 32:], pixels(picture())[:, 32:])  # kept exactly


def test_metadata_in_forges_layout_round_trips(models):
    ours, _ = models["sd3"]
    s = settings(ours, cfg=7.0, max_sequence_length=77, no_t5=True).merged(
        model_name="sd3.5_medium", modules="ae, clip_l, t5xxl_fp16")
    text = s.to_infotext("0.1.0")
    assert "Sampler: Euler, Schedule type: Simple, CFG scale: 7, Seed: 1234" in text
    assert "Model: sd3.5_medium, Module 1: ae, Module 2: clip_l, Module 3: t5xxl_fp16" in text
    assert "Shift: 3, Max sequence length: 77, No T5: True" in text
    back = Settings.from_infotext(text)
    assert (back.scheduler, back.schedule, back.shift, back.max_sequence_length, back.no_t5, back.modules) == (
        "euler", "default", 3.0, 77, True, "ae, clip_l, t5xxl_fp16")


def test_settings_of_other_families_are_dropped():
    s = Settings(prompt="a", shift=2.0, no_t5=True).resolve({}, (64, 64))
    assert (s.shift, s.max_sequence_length, s.no_t5) == (None, None, None)
    assert "Shift" not in s.to_infotext("0.1.0")


def cli(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def test_from_png_replays_flow_settings(sd3_folder, tmp_path):
    first = cli("generate", "a red fox", "--model", sd3_folder, "--steps", 2, "--seed", 3, "--shift", 2.5,
                "--max-sequence-length", 16, "--no-t5", "--out", tmp_path / "a")
    assert first.exit_code == 0, first.output
    [png] = (tmp_path / "a").glob("*.png")
    assert "Shift: 2.5, Max sequence length: 16, No T5: True" in Image.open(png).text["parameters"]
    again = cli("generate", "--from-png", png, "--out", tmp_path / "b")
    assert again.exit_code == 0, again.output
    [replay] = (tmp_path / "b").glob("*.png")
    assert np.array_equal(pixels(Image.open(png)), pixels(Image.open(replay)))
    assert Image.open(replay).text["parameters"] == Image.open(png).text["parameters"]


def test_non_flow_scheduler_refused_in_one_line_writing_nothing(sd3_folder, tmp_path):
    result = cli("generate", "a fox", "--model", sd3_folder, "--steps", 1, "--scheduler", "ddim", "--out", tmp_path / "o")
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line == ("ldm: error: scheduler 'ddim' does not work with flow-matching models such as SD3; "
                    f"use one of: {', '.join(schedulers.flow_names())}")
    assert "dpmpp_2m_sde" in line and "unipc" in line and "ddim" not in line.split("use one of")[1]
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize("kw, message", [
    ({"scheduler": "unipc", "schedule": "karras"}, "scheduler 'unipc' has no karras schedule for flow-matching models"),
    ({"scheduler": "euler_a", "schedule": "align_your_steps"}, "the align_your_steps schedule is NVIDIA's tables"),
    ({"width": 72}, "--width must be a multiple of 16 for this model (got 72); try 64"),
])
def test_refused_before_anything_runs(models, kw, message):
    from ldm_cli.errors import LdmError

    ours, _ = models["sd3"]
    with pytest.raises(LdmError, match=re.escape(message)):
        pipeline.check_inputs(ours, [settings(ours, **kw)])


def test_an_image_in_a_batch_is_the_image_alone(models):
    ours, _ = models["sd35-medium"]
    group = [settings(ours, steps=2, prompt="a red fox", seed=1), settings(ours, steps=2, prompt="a blue house", seed=2)]
    together = pipeline.text_to_image(ours, group)
    for s, image in zip(group, together):
        assert close(pixels(image), pixels(pipeline.text_to_image(ours, [s])[0]))


@pytest.mark.parametrize("name", ["euler", "heun", "dpmpp_2m", "unipc"])
def test_flow_schedulers_build_with_every_schedule_they_list(name):
    from ldm_cli import schedulers

    config = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    for schedule in ("default", *schedulers.FLOW_SCHEDULERS[name].schedules):
        scheduler = schedulers.build(name, schedule, config, flow=True, shift=2.0)
        scheduler.set_timesteps(4)
        sigmas = scheduler.sigmas
        assert 0.5 < sigmas[0] <= 1 and sigmas[-1] == 0 and bool((sigmas[:-1] >= sigmas[1:]).all())


@pytest.mark.parametrize("command", ["img2img", "outpaint"])
def test_image_sizes_round_to_sd3s_multiple_of_16(sd3_folder, tmp_path, command):
    """An image whose sides are multiples of 8 but not 16 renders (never refused) at the nearest
    size SD3 takes: img2img rounds down, outpaint grows its margins."""
    image = tmp_path / "in.png"
    picture().resize((72, 56)).save(image)
    extra = ["--left", 8] if command == "outpaint" else []
    result = cli(command, image, "a fox", *extra, "--model", sd3_folder, "--steps", 1, "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    [png] = (tmp_path / "o").glob("*.png")
    assert Image.open(png).size == {"img2img": (64, 48), "outpaint": (80, 64)}[command]
    assert "multiple of 16" in result.stderr if command == "outpaint" else "resizing it to 64x48" in result.stderr
