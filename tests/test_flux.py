"""FLUX.1 dev and schnell against diffusers' own FLUX pipelines: the same weights, prompt, seed,
scheduler, steps, guidance and size give the same image within 2/255 per pixel. Tiny dev and
schnell models, loaded from diffusers folders."""
import re

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ldm_cli import img2img, inpaint, loading, pipeline, schedulers
from ldm_cli.cli import app
from ldm_cli.errors import LdmError
from ldm_cli.families import flux
from ldm_cli.settings import Settings
from tests import flow_parity
from tests.flow_parity import as_pixels, close, load_pairs, pixels

FLOW_SIGMAS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
# Built from diffusers' classes directly, independently of ldm's scheduler table.
THEIR_SCHEDULERS = {"euler": ("FlowMatchEulerDiscreteScheduler", {}),
                    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", **FLOW_SIGMAS})}


@pytest.fixture(scope="module")
def models(flux_dev_folder, flux_schnell_folder):
    from diffusers import FluxPipeline

    return load_pairs(FluxPipeline, {"dev": flux_dev_folder, "schnell": flux_schnell_folder})


def their_scheduler(pipe, name, **extra):
    return flow_parity.their_scheduler(pipe, THEIR_SCHEDULERS, name, **extra)


def settings(model, **kw) -> Settings:
    base = dict(prompt="a red fox in snow", steps=3, seed=1234, scheduler="euler", width=64, height=64)
    return Settings(**{**base, **kw}).resolve(model.defaults, model.native_size)


def generator(s: Settings) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(s.seed)


def theirs_txt2img(pipe, s: Settings, **kw) -> np.ndarray:
    pipe.scheduler = their_scheduler(pipe, s.scheduler)
    return as_pixels(pipe(s.prompt, negative_prompt=s.negative or None, true_cfg_scale=s.cfg,
                          num_inference_steps=s.steps, guidance_scale=s.guidance or 0.0, height=s.height,
                          width=s.width, generator=generator(s), output_type="np", **kw).images[0])


@pytest.mark.parametrize("variant, name, kw", [
    ("dev", "euler", {}), ("schnell", "euler", {}), ("dev", "dpmpp_2m", {}),
    ("dev", "euler", {"cfg": 2.5, "negative": "blurry"}),  # real CFG on top: diffusers' true_cfg_scale
    ("dev", "euler", {"width": 96, "height": 64, "guidance": 5.0}),
])
def test_txt2img_matches_diffusers(models, variant, name, kw):
    ours, theirs = models[variant]
    s = settings(ours, scheduler=name, **kw)
    assert close(pixels(pipeline.text_to_image(ours, [s])[0]), theirs_txt2img(theirs, s))


def test_models_are_told_apart_and_recommend_flux_settings(models):
    dev, schnell = models["dev"][0], models["schnell"][0]
    assert (dev.family.name, dev.family.flow, dev.size_multiple, dev.native_size) == ("flux", True, 16, (1024, 1024))
    assert (dev.options["variant"], schnell.options["variant"]) == ("dev", "schnell")
    assert {k: dev.defaults[k] for k in ("steps", "cfg", "guidance", "scheduler", "shift", "max_sequence_length")} == {
        "steps": 28, "cfg": 1.0, "guidance": 3.5, "scheduler": "euler", "shift": None, "max_sequence_length": 512}
    assert (schnell.defaults["steps"], schnell.defaults["shift"], "guidance" in schnell.defaults) == (4, 1.0, False)


def test_guidance_reaches_dev_and_is_dropped_for_schnell(models):
    dev, schnell = models["dev"][0], models["schnell"][0]
    s = settings(dev, steps=2)
    assert s.guidance == 3.5
    base = pixels(pipeline.text_to_image(dev, [s])[0])
    assert np.abs(base - pixels(pipeline.text_to_image(dev, [s.merged(guidance=8.0)])[0])).max() > 2
    assert settings(schnell, guidance=8.0).guidance is None  # never recorded for a model without it


def test_dev_shift_follows_the_image_size_as_diffusers_computes_it(models):
    ours, theirs = models["dev"]
    for width, height in [(64, 64), (256, 128)]:
        s = settings(ours, width=width, height=height, steps=4)
        mine = pipeline.make_scheduler(ours, [s]).sigmas
        theirs.scheduler = their_scheduler(theirs, "euler")
        theirs(s.prompt, num_inference_steps=4, height=height, width=width, output_type="latent")
        assert torch.allclose(mine, theirs.scheduler.sigmas, atol=1e-6)
    small, large = (pipeline.make_scheduler(ours, [settings(ours, width=w, height=w, steps=4)]).sigmas
                    for w in (64, 1024))
    assert bool((large[1:-1] > small[1:-1]).all())  # a larger image is shifted towards noise


def test_shift_overrides_the_size_dependent_one(models):
    ours, _ = models["dev"]
    s = settings(ours, shift=2.0, steps=4)
    sigmas = pipeline.make_scheduler(ours, [s]).sigmas[:-1]
    spaced = torch.tensor(flux.sigmas(4), dtype=torch.float32)
    assert torch.allclose(sigmas, 2.0 * spaced / (1 + spaced), atol=1e-6)


def test_heun_runs_on_the_k_diffusion_path_over_fluxs_own_spacing(models):
    """diffusers' flow-matching Heun cannot take FLUX's spacing; k-diffusion's Heun walks it."""
    ours, _ = models["schnell"]
    s = settings(ours, scheduler="heun")
    pipeline.check_inputs(ours, [s])
    run = pipeline.make_scheduler(ours, [s])
    euler = pipeline.make_scheduler(ours, [s.merged(scheduler="euler")])
    assert run.sampler == "heun" and torch.equal(run.sigmas, euler.sigmas)


def picture() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8))


def test_img2img_matches_diffusers(models):
    from diffusers import FluxImg2ImgPipeline

    ours, theirs = models["dev"]
    s = settings(ours, strength=0.6, steps=4)
    mine = pixels(img2img.image_to_image(ours, [s], [picture()])[0])
    pipe = FluxImg2ImgPipeline(**{**theirs.components, "scheduler": their_scheduler(theirs, "euler")})
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(s.prompt, image=picture(), strength=0.6, num_inference_steps=4, guidance_scale=s.guidance,
               height=64, width=64, generator=generator(s), output_type="np").images[0]
    assert close(mine, as_pixels(ref))


@pytest.mark.parametrize("strength", [1.0, 0.8])
def test_inpaint_matches_diffusers(models, strength):
    from diffusers import FluxInpaintPipeline

    ours, theirs = models["schnell"]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    s = settings(ours, strength=strength, mask_blur=0, only_masked=False, steps=3)
    mine = pixels(inpaint.inpaint(ours, [s], [picture()], [mask])[0])
    pipe = FluxInpaintPipeline(**{**theirs.components, "scheduler": their_scheduler(theirs, "euler")})
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(s.prompt, image=picture(), mask_image=mask, strength=strength, num_inference_steps=3,
               guidance_scale=0.0, height=64, width=64, generator=generator(s), output_type="np").images[0]
    assert close(mine[:, :32], as_pixels(ref)[:, :32])
    assert np.array_equal(mine[:, 32:], pixels(picture())[:, 32:])  # kept exactly


def test_an_image_in_a_batch_is_the_image_alone(models):
    ours, _ = models["dev"]
    group = [settings(ours, steps=2, prompt="a red fox", seed=1), settings(ours, steps=2, prompt="a blue house", seed=2)]
    together = pipeline.text_to_image(ours, group)
    for s, image in zip(group, together):
        assert close(pixels(image), pixels(pipeline.text_to_image(ours, [s])[0]))


def test_pack_is_diffusers_packing_and_unpack_its_inverse():
    from diffusers import FluxPipeline

    latents = torch.randn(2, 16, 6, 10)
    packed = flux.pack(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 2, 16, 6, 10))
    assert torch.equal(flux.unpack(packed, 6, 10), latents)
    assert torch.equal(flux.image_ids(6, 10, torch.device("cpu"), torch.float32),
                       FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32))


def test_metadata_in_forges_layout_round_trips(models):
    ours, _ = models["dev"]
    text = settings(ours, guidance=4.5).to_infotext("0.1.0")
    assert "Sampler: Euler, Schedule type: Simple, CFG scale: 1, Distilled CFG Scale: 4.5, Seed: 1234" in text
    assert "Shift" not in text  # dev's shift is computed from the size, not recorded
    back = Settings.from_infotext(text)
    assert (back.guidance, back.cfg, back.shift) == (4.5, 1.0, None)


def cli(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def test_cli_records_guidance_and_replays_it(flux_dev_folder, tmp_path):
    first = cli("generate", "a red fox", "--model", flux_dev_folder, "--steps", 2, "--seed", 3, "--guidance", 5,
                "-W", 64, "-H", 64, "--negative", "blurry", "--out", tmp_path / "a")
    assert first.exit_code == 0, first.output
    [note] = [line for line in first.stderr.splitlines() if "negative prompt" in line]
    assert note.startswith("ldm: the negative prompt is unused at --cfg 1")
    [png] = (tmp_path / "a").glob("*.png")
    assert "CFG scale: 1, Distilled CFG Scale: 5," in Image.open(png).text["parameters"]
    again = cli("generate", "--from-png", png, "--out", tmp_path / "b")
    assert again.exit_code == 0, again.output
    [replay] = (tmp_path / "b").glob("*.png")
    assert np.array_equal(pixels(Image.open(png)), pixels(Image.open(replay)))


def test_size_not_a_multiple_of_16_is_refused(models):
    ours, _ = models["dev"]
    with pytest.raises(LdmError, match=re.escape("--width must be a multiple of 16 for this model (got 72); try 64")):
        pipeline.check_inputs(ours, [settings(ours, width=72)])


def test_outpaint_grows_margins_to_16(flux_schnell_folder, tmp_path):
    image = tmp_path / "in.png"
    picture().resize((48, 48)).save(image)
    result = cli("outpaint", image, "a fox", "--left", 8, "--model", flux_schnell_folder, "--steps", 1,
                 "--out", tmp_path / "o")
    assert result.exit_code == 0, result.output
    [png] = (tmp_path / "o").glob("*.png")
    assert Image.open(png).size == (64, 48)


def test_flux_schedulers_need_its_config():
    config = {"num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}
    for name in [n for n, spec in schedulers.FLOW_SCHEDULERS.items() if not spec.shift_only]:
        scheduler = schedulers.build(name, "default", config, flow=True)
        schedulers.set_timesteps(scheduler, 4, "cpu", config, 4096, flux.sigmas)
        assert scheduler.sigmas[0] > 0.99 and scheduler.sigmas[-1] == 0


# -- memory: offload, float8 storage, VAE tiling (on the CPU: the same hooks, the CPU as their device)
def load_with(folder, **options):
    from ldm_cli.loading import LoadOptions

    return loading.load(str(folder), LoadOptions(device="cpu", **options))


@pytest.mark.parametrize("options", [{"offload": "model"}, {"offload": "sequential"}])
def test_offload_draws_the_same_image(models, flux_dev_folder, options):
    plain, _ = models["dev"]
    ours = load_with(flux_dev_folder, **options)
    assert all(hasattr(m, "_hf_hook") for m in (ours.denoiser, *ours.text_encoders))  # accelerate's hooks
    if options["offload"] == "sequential":  # weights stream: the module itself holds none
        assert {p.device.type for p in ours.denoiser.parameters()} == {"meta"}
    s = settings(plain, steps=2)
    assert np.array_equal(pixels(pipeline.text_to_image(ours, [s])[0]), pixels(pipeline.text_to_image(plain, [s])[0]))


def test_fp8_weights_match_diffusers_layerwise_casting(models, flux_dev_folder):
    from diffusers.hooks import apply_layerwise_casting

    ours = load_with(flux_dev_folder, weights="fp8", offload="model")
    assert ours.dtype == torch.float32  # computed in the model's dtype
    stored = {n: p.dtype for n, p in ours.denoiser.named_parameters() if p.ndim == 2}
    assert stored["transformer_blocks.0.norm1.linear.weight"] == torch.float8_e4m3fn  # adaLN too: half the memory
    assert stored["proj_out.weight"] == torch.float32
    s = settings(ours, steps=2)
    mine = pixels(pipeline.text_to_image(ours, [s])[0])
    _, theirs = models["dev"]
    pipe = type(theirs).from_pretrained(flux_dev_folder, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    skipped = ("pos_embed", "patch_embed", "^proj_in$", "^proj_out$")  # diffusers' defaults less "norm"
    apply_layerwise_casting(pipe.transformer, torch.float8_e4m3fn, torch.float32, skipped)
    apply_layerwise_casting(pipe.text_encoder_2, torch.float8_e4m3fn, torch.float32, (*skipped, "wo"))
    # FluxPipeline would cast the prompt to T5's stored dtype: its T5 states are computed here, by the same T5
    ids = pipe.tokenizer_2([s.prompt], padding="max_length", max_length=512, truncation=True, return_tensors="pt")
    with torch.no_grad():
        embeds, pooled = pipe.text_encoder_2(ids.input_ids)[0], pipe._get_clip_prompt_embeds(s.prompt, device="cpu")
    ref = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, num_inference_steps=2, guidance_scale=s.guidance,
               height=64, width=64, generator=generator(s), output_type="np").images[0]
    assert close(mine, as_pixels(ref))
    assert np.abs(mine - pixels(pipeline.text_to_image(models["dev"][0], [s])[0])).max() > 0  # it did store float8


def test_vae_tiling_matches_diffusers_tiled_vae(models, flux_schnell_folder):
    ours = load_with(flux_schnell_folder, vae_tiling=True)
    _, theirs = models["schnell"]
    s = settings(ours, width=160, height=128, steps=2)
    mine = pixels(pipeline.text_to_image(ours, [s])[0])
    theirs.vae.enable_tiling()
    try:
        assert close(mine, theirs_txt2img(theirs, s))
    finally:
        theirs.vae.disable_tiling()
    assert not close(mine, pixels(pipeline.text_to_image(models["schnell"][0], [s])[0]))  # tiles were blended


@pytest.mark.parametrize("flags, message", [
    (["--offload", "disk"], "unknown --offload 'disk'; choose none, model or sequential"),
    (["--weights", "int4"], "unknown --weights 'int4'; choose fp8 (or leave it out for the model's dtype)"),
    (["--offload", "model", "--compile"], "--compile does not combine with --offload"),
])
def test_bad_memory_flags_are_one_line(flux_schnell_folder, tmp_path, flags, message):
    result = cli("generate", "a fox", "--model", flux_schnell_folder, *flags, "--out", tmp_path)
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("ldm: error: " + message)
    assert not list(tmp_path.rglob("*.png"))


def test_a_folder_without_t5_is_refused_as_a_file_without_it_is(flux_schnell_folder, tmp_path):
    import shutil

    folder = tmp_path / "no-t5"
    shutil.copytree(flux_schnell_folder, folder, ignore=shutil.ignore_patterns("text_encoder_2"))
    result = cli("generate", "a fox", "--model", folder, "--out", tmp_path / "out")
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line == ("ldm: error: no-t5 has no T5-XXL text encoder (text_encoder_2/), which FLUX needs; "
                    "add the release's text_encoder_2/ and tokenizer_2/ folders to it")
    assert not (tmp_path / "out").exists()


def test_no_t5_is_sd3s_and_dropped_for_flux(models):
    s = Settings(prompt="a fox", no_t5=True).resolve(models["dev"][0].defaults, (64, 64))
    assert s.no_t5 is None and "No T5" not in s.to_infotext("x")


def test_prompts_file_lines_take_guidance(tmp_path):
    from ldm_cli import prompts_file

    path = tmp_path / "prompts.txt"
    path.write_text('--prompt "a fox" --guidance 4.5\n--prompt "a house" --distilled_cfg_scale 2\n')
    assert [job.settings.guidance for job in prompts_file.read(path, Settings(), 1)] == [4.5, 2.0]
    assert pipeline.batch_key(Settings(guidance=4.5)) != pipeline.batch_key(Settings(guidance=2.0))


def test_a_decode_that_would_not_fit_is_tiled(monkeypatch, capsys):
    """The estimate (CUDA only, so faked here): 1200 values a pixel, 2048x2048 in bf16 is 9.4 GiB."""
    from types import SimpleNamespace

    from ldm_cli import memory

    class Vae:
        use_tiling = False

        def enable_tiling(self):
            self.use_tiling = True

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device: (8 * 2**30, 80 * 2**30))
    big, small = Vae(), Vae()
    for vae, side in [(big, 256), (small, 128)]:
        memory.tile_if_needed(vae, SimpleNamespace(device=torch.device("cuda"), shape=(1, 16, side, side)), 8,
                              torch.bfloat16)
    assert (big.use_tiling, small.use_tiling) == (True, False)
    assert "decoding 2048x2048 needs about 9.4 GB, more than the 8.0 GB free" in capsys.readouterr().err
