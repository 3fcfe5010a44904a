"""Hires fix: A1111 1.10's second pass (upscale, then N steps from the tail of an
int(N / min(D, 0.999))-step schedule, noise from a fresh generator at the new size) equals a
reference built from diffusers' pipelines with those rules (within 2/255); its sizes follow
A1111's; its infotext fields round-trip and replay; every bad flag is one line."""
import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ldm_cli import hires, hires_plan, loading, philox
from ldm_cli.cli import app
from ldm_cli.settings import Settings
from tests import upscaler_files
from tests.test_img2img import diffusers_scheduler, load_diffusers, pixels
from tests.test_upscaling import spandrels_output

PIPELINES = {"sd1": ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"),
             "sdxl": ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")}


@pytest.fixture(scope="module")
def folders(sd1_folder, sdxl_folder):
    return {"sd1": sd1_folder, "sdxl": sdxl_folder}


@pytest.fixture(scope="module")
def ours(folders):
    return functools.cache(lambda name: loading.load(str(folders[name]), loading.LoadOptions(device="cpu")))


@pytest.fixture(scope="module")
def theirs(folders):
    return functools.cache(lambda cls_name, name: load_diffusers(cls_name, folders[name]))


def settings(model, **overrides) -> Settings:
    base = dict(prompt="a red fox in snow", negative="blurry", steps=4, cfg=6.5, seed=1234, scheduler="euler",
                schedule="default", width=64, height=64, hires_scale=2.0, hires_steps=3, strength=0.6)
    return Settings(**{**base, **overrides}).resolve({}, model.native_size)


# -- the reference: diffusers' pipelines, A1111's rules ------------------------------------------------
def first_pass(pipe, s: Settings) -> torch.Tensor:
    pipe.scheduler = diffusers_scheduler(pipe, s.scheduler)
    noise = philox.randn(s.seed, (4, s.height // 8, s.width // 8))[None] if s.rng == "nv" else None
    return pipe(s.prompt, negative_prompt=s.negative or None, num_inference_steps=s.steps, guidance_scale=s.cfg,
                width=s.width, height=s.height, generator=torch.Generator().manual_seed(s.seed), latents=noise,
                output_type="latent").images


def upscale(pipe, s: Settings, latents: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A1111's upscale: torch's interpolate on the latents, or the decoded image truncated to
    8 bits, resized by PIL and encoded with the VAE's mean."""
    if s.hires_upscaler in hires_plan.LATENT_MODES:
        mode, antialias = hires_plan.LATENT_MODES[s.hires_upscaler]
        return torch.nn.functional.interpolate(latents, size=(size[1] // 8, size[0] // 8), mode=mode, antialias=antialias)
    vae, factor = pipe.vae, pipe.vae.config.scaling_factor
    with torch.no_grad():
        decoded = vae.decode(latents / factor).sample
    array = ((decoded / 2 + 0.5).clamp(0, 1) * 255)[0].permute(1, 2, 0).numpy().astype(np.uint8)
    if s.hires_upscaler.endswith(".safetensors"):  # a model: spandrel's own output, then Lanczos to the size
        image = Image.fromarray(spandrels_output(s.hires_upscaler, Image.fromarray(array))).resize(size, Image.LANCZOS)
    else:
        resample = {"Lanczos": Image.LANCZOS, "Nearest": Image.NEAREST}.get(s.hires_upscaler, Image.LANCZOS)
        image = Image.fromarray(array).resize(size, resample=resample)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
    with torch.no_grad():
        return vae.encode(tensor).latent_dist.mean * factor


def second_pass(pipe, s: Settings, latents: torch.Tensor, monkeypatch) -> np.ndarray:
    """N of int(N / D) steps: diffusers keeps int(total * strength) steps, so ask for N + 1/2."""
    total, kept = int(s.hires_steps / min(s.strength, 0.999)), s.hires_steps
    pipe.scheduler = diffusers_scheduler(pipe, s.hires_scheduler or s.scheduler)
    if s.rng == "nv":
        module = __import__(type(pipe).__module__, fromlist=["randn_tensor"])
        monkeypatch.setattr(module, "randn_tensor", lambda shape, **_: philox.randn(s.seed, shape[1:])[None])
    out = pipe(s.hires_prompt or s.prompt, negative_prompt=(s.hires_negative or s.negative) or None, image=latents,
               strength=min(1.0, (kept + 0.5) / total), num_inference_steps=total,
               guidance_scale=s.hires_cfg if s.hires_cfg is not None else s.cfg,
               generator=torch.Generator().manual_seed(s.seed), output_type="np")
    return (out.images[0] * 255).round().astype(np.int16)


def reference(theirs, family: str, s: Settings, monkeypatch) -> np.ndarray:
    text, image = PIPELINES[family]
    base = theirs(text, family)
    latents = first_pass(base, s)
    up = upscale(base, s, latents, hires_plan.upscaled_size(s))
    w, h = hires_plan.final_size(s)
    left, top = (up.shape[3] - w // 8) // 2, (up.shape[2] - h // 8) // 2
    up = up[:, :, top:top + h // 8, left:left + w // 8]
    return second_pass(theirs(image, family), s, up, monkeypatch)


@pytest.mark.parametrize("upscaler", list(hires_plan.LATENT_MODES))
def test_each_latent_mode_matches_the_reference_sd1(ours, theirs, upscaler, monkeypatch):
    model = ours("sd1")
    s = settings(model, hires_upscaler=upscaler)
    mine = pixels(hires.text_to_image(model, [s])[0])
    ref = reference(theirs, "sd1", s, monkeypatch)
    assert mine.shape == ref.shape == (128, 128, 3)
    assert mine.std() > 1
    assert np.abs(mine - ref).max() <= 2


@pytest.mark.parametrize("family, overrides", [
    ("sd1", dict(hires_upscaler="Lanczos")),
    ("sd1", dict(hires_upscaler="Nearest", scheduler="dpmpp_2m")),
    ("sd1", dict(hires_scale=None, hires_width=96, hires_height=56, hires_upscaler="Latent (bicubic)")),
    ("sd1", dict(rng="nv", hires_prompt="a grey wolf", hires_cfg=4.0, strength=1.0)),
    ("sd1", dict(rng="nv", hires_upscaler="Lanczos", hires_scheduler="ddim", hires_schedule="default")),
    ("sdxl", dict(negative="")),
    ("sdxl", dict(negative="", hires_upscaler="Lanczos", rng="nv")),
])
def test_matches_the_reference(ours, theirs, family, overrides, monkeypatch):
    model = ours(family)
    s = settings(model, **overrides)
    mine = pixels(hires.text_to_image(model, [s])[0])
    ref = reference(theirs, family, s, monkeypatch)
    assert mine.shape == ref.shape == (*reversed(hires_plan.final_size(s)), 3)
    assert mine.std() > 1
    assert np.abs(mine - ref).max() <= 2


@pytest.mark.parametrize("scale", [2.0, 1.5])  # the 2x model's output as it is, and resized down
def test_an_upscaler_model_matches_the_reference(ours, theirs, scale, tmp_path, monkeypatch):
    model = ours("sd1")
    path = upscaler_files.save(upscaler_files.compact(), tmp_path / "2x-compact.safetensors")
    s = settings(model, hires_upscaler=str(path), hires_scale=scale)
    mine = pixels(hires.text_to_image(model, [s])[0])
    ref = reference(theirs, "sd1", s, monkeypatch)
    assert mine.shape == ref.shape and mine.std() > 1
    assert np.abs(mine - ref).max() <= 2
    lanczos = pixels(hires.text_to_image(model, [s.merged(hires_upscaler="Lanczos")])[0])
    assert np.abs(mine - lanczos).max() > 2  # the model did something


def test_a_batch_is_each_image_alone(ours):
    model = ours("sd1")
    group = [settings(model, seed=seed, hires_upscaler="Lanczos") for seed in (7, 8)]
    together = hires.text_to_image(model, group)
    alone = [hires.text_to_image(model, [s])[0] for s in group]
    for a, b in zip(together, alone):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1


# -- A1111's sizes and steps ------------------------------------------------------------------------
@pytest.mark.parametrize("size, hires, upscaled, final, crop", [
    ((512, 512), dict(hires_scale=2.0), (1024, 1024), (1024, 1024), (0, 0, 0, 0)),
    ((512, 768), dict(hires_scale=1.5), (768, 1152), (768, 1152), (0, 0, 0, 0)),
    ((512, 512), dict(hires_scale=1.3), (665, 665), (664, 664), (0, 0, 0, 0)),
    ((512, 768), dict(hires_width=1024, hires_height=0), (1024, 1536), (1024, 1536), (0, 0, 0, 0)),
    ((512, 768), dict(hires_width=0, hires_height=1024), (682, 1024), (680, 1024), (0, 0, 0, 0)),
    # cover 1024x1024 from 2:3: the width sets the scale, 512 rows too many are cut, 32 latent rows each side
    ((512, 768), dict(hires_width=1024, hires_height=1024), (1024, 1536), (1024, 1024), (0, 32, 0, 32)),
    ((768, 512), dict(hires_width=1000, hires_height=600), (1000, 666), (1000, 600), (0, 4, 0, 4)),
])
def test_sizes_follow_a1111(size, hires, upscaled, final, crop):
    s = Settings(width=size[0], height=size[1], **hires)
    assert hires_plan.upscaled_size(s) == upscaled
    assert hires_plan.final_size(s) == final
    assert hires_plan.crop(s, 8) == crop


@pytest.mark.parametrize("steps, hires_steps, strength, total, kept", [
    (20, 0, 0.7, 28, 20), (20, 10, 0.5, 20, 10), (30, 15, 1.0, 15, 15), (20, 7, 0.33, 21, 7)])
def test_second_pass_steps_follow_a1111(steps, hires_steps, strength, total, kept):
    assert hires_plan.steps(Settings(steps=steps, hires_steps=hires_steps, strength=strength)) == (total, kept)


# -- metadata -----------------------------------------------------------------------------------------
A1111_TEXT = ("a castle\nNegative prompt: fog\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
              "Seed: 42, Size: 512x768, Model hash: 6ce0161689, Model: v1-5, Denoising strength: 0.45, "
              "Hires prompt: a stone castle, Hires upscale: 1.5, Hires steps: 12, Hires upscaler: Latent (bicubic), "
              "Version: v1.10.0")


def test_a1111_infotext_turns_hires_on():
    s = Settings.from_infotext(A1111_TEXT)
    assert (s.hires_scale, s.hires_steps, s.hires_upscaler, s.strength, s.hires_prompt) == (
        1.5, 12, "Latent (bicubic)", 0.45, "a stone castle")
    forge = Settings.from_infotext(A1111_TEXT.replace("Hires upscale: 1.5", "Hires resize: 1024x0, Hires CFG Scale: 3.5")
                                   .replace("Version: v1.10.0", "Hires sampler: Euler a, Version: f2.0.1"))
    assert (forge.hires_scale, forge.hires_width, forge.hires_height, forge.hires_cfg) == (None, 1024, 0, 3.5)
    # "Euler a" keeps A1111's first-pass Karras (ldm's k-diffusion path runs it, as A1111's does)
    assert (forge.hires_scheduler, hires_plan.second_pass(forge).schedule) == ("euler_a", "karras")
    assert hires_plan.second_pass(forge.merged(hires_scheduler="euler")).schedule == "karras"
    alone = Settings.from_infotext(A1111_TEXT.replace("Hires upscale: 1.5, ", ""))
    assert alone.hires_scale == hires_plan.DEFAULT_SCALE  # A1111's default with an upscaler recorded
    off = Settings.from_infotext(A1111_TEXT.replace("Denoising strength: 0.45, ", ""))
    assert not hires_plan.enabled(off) and off.hires_upscaler is None  # A1111: no strength, no hires


def test_infotext_round_trips_in_a1111_order():
    s = Settings(prompt="a fox", negative="blur", steps=20, cfg=7, seed=3, width=512, height=512, scheduler="euler",
                 schedule="default", strength=0.55, hires_scale=2.0, hires_steps=10, hires_upscaler="Lanczos",
                 hires_scheduler="ddim", hires_schedule="karras", hires_prompt="a big fox", hires_cfg=5.0)
    text = s.to_infotext("0")
    keys = [part.split(":")[0].strip() for part in text.splitlines()[-1].split(", ")]
    hires_keys = [k for k in keys if k.startswith("Hires") or k == "Denoising strength"]
    assert hires_keys == ["Denoising strength", "Hires sampler", "Hires prompt", "Hires CFG Scale", "Hires upscale",
                          "Hires steps", "Hires upscaler", "Hires schedule type"]
    back = Settings.from_infotext(text)
    for field in ("strength", "hires_scale", "hires_steps", "hires_upscaler", "hires_scheduler", "hires_schedule",
                  "hires_prompt", "hires_cfg"):
        assert getattr(back, field) == getattr(s, field), field


def test_sd_parsers_reads_the_fields(tmp_path):
    from sd_parsers import ParserManager

    s = Settings(prompt="a fox", steps=20, cfg=7, seed=3, width=64, height=64, scheduler="euler", schedule="default",
                 strength=0.5, hires_width=128, hires_height=96, hires_upscaler="Latent (nearest-exact)")
    from PIL.PngImagePlugin import PngInfo

    chunks = PngInfo()
    chunks.add_text("parameters", s.to_infotext("0"))
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png", pnginfo=chunks)
    info = ParserManager().parse(tmp_path / "a.png")
    assert info.metadata["Hires resize"] == "128x96"
    assert info.metadata["Hires upscaler"] == "Latent (nearest-exact)"
    assert info.metadata["Denoising strength"] == "0.5"


# -- the command line -----------------------------------------------------------------------------------
def run(args, tmp_path):
    return CliRunner().invoke(app, ["generate", "a fox", "-o", str(tmp_path / "out"), "--steps", "2", "-W", "64",
                                    "-H", "64", *args])


def test_generate_records_and_replays(sd1_folder, tmp_path):
    result = run(["--model", str(sd1_folder), "--hires-scale", "1.5", "--hires-upscaler", "latent (ANTIALIASED)",
                  "--hires-steps", "2", "--hires-strength", "0.5", "--seed", "5", "--json"], tmp_path)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[-1])
    assert Image.open(record["path"]).size == (96, 96)
    assert "Denoising strength: 0.5, RNG: CPU, Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent (antialiased)" \
        in Image.open(record["path"]).info["parameters"]
    again = CliRunner().invoke(app, ["generate", "--from-png", record["path"], "-o", str(tmp_path / "again"), "--json"])
    assert again.exit_code == 0, again.output
    replayed = json.loads(again.stdout.splitlines()[-1])["path"]
    assert np.array_equal(np.asarray(Image.open(replayed)), np.asarray(Image.open(record["path"])))


@pytest.mark.parametrize("args, message", [
    (["--hires-steps", "3"], "--hires-steps applies to hires fix; add --hires-scale X or --hires-resize WxH"),
    (["--hires-strength", "0.5"], "--hires-strength applies to hires fix"),
    (["--hires-scale", "0.5"], "--hires-scale must be between 1 and 8 (got 0.5)"),
    (["--hires-scale", "2", "--hires-resize", "128x128"], "give --hires-scale or --hires-resize, not both"),
    (["--hires-scale", "2", "--hires-upscaler", "4x-UltraSharp"], "no upscaler model named '4x-UltraSharp'"),
    (["--hires-resize", "100x128"], "--hires-resize must be a multiple of 8 (got 100); try 96"),
    (["--hires-resize", "wide"], "--hires-resize must be WIDTHxHEIGHT"),
    (["--hires-scale", "2", "--hires-strength", "0"], "--hires-strength must be above 0"),
    (["--hires-scale", "2", "--hires-strength", "0.01", "--hires-steps", "100"], "take a 10000-step schedule"),
    (["--hires-scale", "2", "--hires-scheduler", "nonsense"], "nonsense"),
])
def test_bad_flags_are_one_line(args, message, tmp_path):
    result = run(args, tmp_path)
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldm: error: ") and message in lines[0], result.stderr
    assert not (tmp_path / "out").exists()


# -- prompts files ----------------------------------------------------------------------------------------
def test_batch_lines_take_a1111_hires_keys(sd1_folder, tmp_path):
    """An A1111 option line and an API payload (JSONL) render what `generate` does with the flags."""
    (tmp_path / "p.txt").write_text('--prompt "a fox" --steps 2 --width 64 --height 64 --seed 9 --enable_hr true '
                                    '--hr_scale 1.5 --hr_upscaler Lanczos --hr_second_pass_steps 2 --denoising_strength 0.5\n')
    (tmp_path / "p.jsonl").write_text(json.dumps(dict(
        prompt="a fox", steps=2, width=64, height=64, seed=9, enable_hr=True, hr_scale=2, hr_resize_x=96,
        hr_resize_y=0, hr_upscaler="Lanczos", hr_second_pass_steps=2, denoising_strength=0.5,
        hr_sampler_name="Use same sampler", hr_prompt="")) + "\n")
    for name in ("p.txt", "p.jsonl"):
        result = CliRunner().invoke(app, ["batch", str(tmp_path / name), "--model", str(sd1_folder), "-o",
                                          str(tmp_path / name.replace(".", "_")), "--json"])
        assert result.exit_code == 0, result.output
    line, payload = (sorted((tmp_path / f).glob("*.png"))[0] for f in ("p_txt", "p_jsonl"))
    assert Image.open(line).size == (96, 96) and Image.open(payload).size == (96, 96)
    flags = run(["--model", str(sd1_folder), "--seed", "9", "--hires-scale", "1.5", "--hires-upscaler", "Lanczos",
                 "--hires-steps", "2", "--hires-strength", "0.5", "--json"], tmp_path)
    made = json.loads(flags.stdout.splitlines()[-1])["path"]
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(line)))
    assert np.array_equal(np.asarray(Image.open(made)), np.asarray(Image.open(payload)))  # 96x0 from 64x64 is 1.5


@pytest.mark.parametrize("line, message", [
    ('--prompt "a" --hr_scale 2', "--hr_scale applies to hires fix; add --enable_hr true"),
    ('--prompt "a" --denoising_strength 0.5', "--denoising_strength applies to img2img and inpaint lines"),
    ('--prompt "a" --enable_hr true --hr_upscaler "Latent (sharp)"', "no upscaler model named 'Latent (sharp)'"),
])
def test_bad_batch_lines_are_one_line(line, message, tmp_path):
    (tmp_path / "p.txt").write_text(line + "\n")
    result = CliRunner().invoke(app, ["batch", str(tmp_path / "p.txt"), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.startswith("ldm: error: 1 bad line") and f"p.txt:1: {message}" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


# -- ControlNets, LoRAs, every family ---------------------------------------------------------------------
def test_controlnet_matches_diffusers_controlnet_pipelines(ours, sd1_folder, tmp_path):
    """The first pass by the ControlNet pipeline, the second by its img2img pipeline with the
    control image fitted to the hires size."""
    from diffusers import ControlNetModel, StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetPipeline

    from ldm_cli import control, control_units
    from ldm_cli.loading import controlnet as controlnet_loading
    from tests.test_controlnet import pattern, tiny_controlnet

    model = ours("sd1")
    tiny_controlnet(model.denoiser, 11).save_pretrained(tmp_path / "net")
    pattern(3, (64, 64)).save(tmp_path / "control.png")
    unit = control_units.ControlUnit(str(tmp_path / "net"), str(tmp_path / "control.png"), 0.8, 0.0, 1.0)
    s = settings(model, scheduler="ddim", hires_upscaler="Latent (bicubic)")
    model.controls = [(unit, controlnet_loading.load(unit.controlnet, model))]
    try:
        mine = pixels(hires.text_to_image(model, [s])[0])
    finally:
        model.controls = []
    net = ControlNetModel.from_pretrained(tmp_path / "net")
    text = StableDiffusionControlNetPipeline.from_pretrained(sd1_folder, controlnet=net, local_files_only=True)
    text.saved_scheduler_config = text.scheduler.config
    text.set_progress_bar_config(disable=True)
    image = StableDiffusionControlNetImg2ImgPipeline(**text.components)
    image.saved_scheduler_config = text.saved_scheduler_config
    image.set_progress_bar_config(disable=True)
    picture = Image.open(tmp_path / "control.png").convert("RGB")
    text.scheduler = diffusers_scheduler(text, s.scheduler)
    latents = text(s.prompt, negative_prompt=s.negative, image=picture, num_inference_steps=s.steps,
                   guidance_scale=s.cfg, width=64, height=64, controlnet_conditioning_scale=0.8,
                   generator=torch.Generator().manual_seed(s.seed), output_type="latent").images
    up = upscale(text, s, latents, (128, 128))
    image.scheduler = diffusers_scheduler(image, s.scheduler)
    total, kept = int(s.hires_steps / min(s.strength, 0.999)), s.hires_steps  # A1111's rule, not ldm's code
    ref = image(s.prompt, negative_prompt=s.negative, image=up, control_image=control.crop_and_resize(picture, 128, 128),
                strength=(kept + 0.5) / total, num_inference_steps=total, guidance_scale=s.cfg,
                controlnet_conditioning_scale=0.8, generator=torch.Generator().manual_seed(s.seed),
                output_type="np").images[0]
    ref = (ref * 255).round().astype(np.int16)
    assert mine.shape == ref.shape == (128, 128, 3)
    assert np.abs(mine - ref).max() <= 2


def test_a_lora_follows_each_pass_prompt(sd1_folder, tmp_path):
    """--lora tags both prompts and replays from the PNG; a hires prompt without the tag runs its
    pass without the LoRA, as A1111's hires pass activates its own prompt's networks."""
    from tests.test_networks_run import sd1_lora

    lora = sd1_lora(tmp_path / "fox.safetensors", scale=3.0)
    common = ["--model", str(sd1_folder), "--seed", "4", "--hires-scale", "1.5", "--hires-steps", "2", "--json"]
    both = run([*common, "--lora", str(lora), "--hires-prompt", "a fox, sharp"], tmp_path)
    assert both.exit_code == 0, both.output
    made = json.loads(both.stdout.splitlines()[-1])["path"]
    text = Image.open(made).info["parameters"]
    assert "Hires prompt: a fox, sharp<lora:fox:1>" in text.replace('"', "") and "Lora hashes: " in text
    again = CliRunner().invoke(app, ["generate", "--from-png", made, "-o", str(tmp_path / "again"), "--json",
                                     "--lora-dir", str(tmp_path)])
    assert again.exit_code == 0, again.output
    assert np.array_equal(pixels(Image.open(json.loads(again.stdout.splitlines()[-1])["path"])), pixels(Image.open(made)))
    first_only = CliRunner().invoke(app, ["generate", "a fox <lora:fox:1>", "--lora-dir", str(tmp_path), "-o",
                                          str(tmp_path / "first"), "--steps", "2", "-W", "64", "-H", "64", *common[:-1],
                                          "--hires-prompt", "a fox, sharp", "--json"])
    assert first_only.exit_code == 0, first_only.output
    other = pixels(Image.open(json.loads(first_only.stdout.splitlines()[-1])["path"]))
    assert np.abs(other - pixels(Image.open(made))).max() > 5


@pytest.mark.parametrize("fixture", ["sd3_folder", "flux_schnell_folder", "chroma_folder", "zimage_turbo_folder",
                                     "flux2_klein_folder", "qwen_image_folder"])
def test_every_family_runs_it(fixture, request):
    """The flow-matching families: the hires size, the same image twice, and a second pass that
    changes the upscaled first pass."""
    model = loading.load(str(request.getfixturevalue(fixture)), loading.LoadOptions(device="cpu"))
    s = Settings(prompt="a fox", steps=2, seed=3, width=64, height=64, hires_scale=1.5, hires_steps=2,
                 strength=0.6).resolve(model.defaults, model.native_size, model.train_timesteps)
    hires.check(model, s)
    one, two = (pixels(hires.text_to_image(model, [s])[0]) for _ in range(2))
    assert one.shape == (96, 96, 3) and np.array_equal(one, two)
    first = hires.pipeline.text_to_image(model, [s])[0].resize((96, 96), Image.LANCZOS)
    assert np.abs(one - pixels(first)).max() > 5


@pytest.mark.parametrize("upscaler", ["Latent", "Lanczos"])
def test_sd3_matches_its_pipelines(sd3_folder, upscaler):
    """A flow family: the SD3 pipeline to latents, the upscale, SD3's img2img pipeline keeping N
    of int(N / D) steps (it keeps total - int(total - total * strength): ask for N - 1/4)."""
    from diffusers import StableDiffusion3Img2ImgPipeline, StableDiffusion3Pipeline

    from tests.flow_parity import as_pixels, close, load_pairs
    from tests.test_sd3 import their_scheduler

    ours, theirs = load_pairs(StableDiffusion3Pipeline, {"sd3": sd3_folder})["sd3"]
    s = Settings(prompt="a red fox in snow", negative="blurry", steps=3, cfg=6.5, seed=1234, scheduler="euler",
                 width=64, height=64, hires_scale=1.5, hires_steps=2, strength=0.6,
                 hires_upscaler=upscaler).resolve(ours.defaults, ours.native_size)
    mine = pixels(hires.text_to_image(ours, [s])[0])
    theirs.scheduler = their_scheduler(theirs, "euler")
    latents = theirs(s.prompt, negative_prompt=s.negative, num_inference_steps=s.steps, guidance_scale=s.cfg,
                     height=64, width=64, generator=torch.Generator().manual_seed(s.seed), output_type="latent").images
    if upscaler == "Latent":
        up = torch.nn.functional.interpolate(latents, size=(12, 12), mode="bilinear")
    else:
        vae = theirs.vae
        with torch.no_grad():
            decoded = vae.decode(latents / vae.config.scaling_factor + vae.config.shift_factor).sample
        array = ((decoded / 2 + 0.5).clamp(0, 1) * 255)[0].permute(1, 2, 0).numpy().astype(np.uint8)
        image = Image.fromarray(array).resize((96, 96), resample=Image.LANCZOS)
        tensor = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)[None] * 2 - 1
        with torch.no_grad():
            mean = vae.encode(tensor).latent_dist.mean
        up = (mean - vae.config.shift_factor) * vae.config.scaling_factor
    total, kept = int(s.hires_steps / min(s.strength, 0.999)), s.hires_steps  # A1111's rule, not ldm's code
    pipe = StableDiffusion3Img2ImgPipeline(**{**theirs.components, "scheduler": their_scheduler(theirs, "euler")})
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(s.prompt, image=up, negative_prompt=s.negative, strength=(kept - 0.25) / total, num_inference_steps=total,
               guidance_scale=s.cfg, generator=torch.Generator().manual_seed(s.seed), output_type="np").images[0]
    assert mine.shape == (96, 96, 3)
    assert close(mine, as_pixels(ref))


def test_an_a1111_png_replays_with_its_hires_pass(sd1_folder, tmp_path):
    from PIL.PngImagePlugin import PngInfo

    chunks = PngInfo()
    chunks.add_text("parameters", "a fox\nNegative prompt: blur\nSteps: 2, Sampler: Euler, Schedule type: Automatic, "
                                  "CFG scale: 7, Seed: 11, Size: 64x64, Model: v1-5, Denoising strength: 0.5, "
                                  "Hires upscale: 1.5, Hires steps: 2, Hires upscaler: Latent (nearest), Version: v1.10.0")
    Image.new("RGB", (96, 96)).save(tmp_path / "a1111.png", pnginfo=chunks)
    replay = CliRunner().invoke(app, ["generate", "--from-png", str(tmp_path / "a1111.png"), "--model", str(sd1_folder),
                                      "--rng", "cpu", "-o", str(tmp_path / "replay"), "--json"])
    assert replay.exit_code == 0, replay.output
    flags = run(["--model", str(sd1_folder), "--negative", "blur", "--scheduler", "euler", "--schedule", "default",
                 "--cfg", "7", "--seed", "11", "--hires-scale", "1.5", "--hires-steps", "2", "--hires-strength", "0.5",
                 "--hires-upscaler", "Latent (nearest)", "--json"], tmp_path)
    assert flags.exit_code == 0, flags.output
    paths = [json.loads(r.stdout.splitlines()[-1])["path"] for r in (replay, flags)]
    assert Image.open(paths[0]).size == (96, 96)
    assert np.array_equal(*(np.asarray(Image.open(p)) for p in paths))


def test_a_hires_sampler_without_the_first_schedule_runs_its_own_and_says_so():
    s = Settings(prompt="a fox", steps=20, cfg=7, seed=3, width=64, height=64, scheduler="dpmpp_2m", schedule="karras",
                 strength=0.5, hires_scale=2.0, hires_scheduler="ddim")  # diffusers' DDIM has no Karras
    s.validate()
    assert hires_plan.second_pass(s).schedule == "default"
    text = s.to_infotext("0")
    assert "Hires sampler: DDIM" in text and "Hires schedule type: Automatic" in text
    assert hires_plan.second_pass(Settings.from_infotext(text)).schedule == "default"


def test_flux_dev_matches_its_pipelines(flux_dev_folder):
    """FLUX dev: its shift follows the hires size's tokens, in diffusers' img2img pipeline too."""
    from diffusers import FluxImg2ImgPipeline, FluxPipeline

    from tests.flow_parity import as_pixels, close, load_pairs
    from tests.test_flux import their_scheduler

    ours, theirs = load_pairs(FluxPipeline, {"dev": flux_dev_folder})["dev"]
    s = Settings(prompt="a red fox in snow", steps=3, seed=1234, scheduler="euler", width=64, height=64,
                 hires_scale=1.5, hires_steps=2, strength=0.6).resolve(ours.defaults, ours.native_size)
    mine = pixels(hires.text_to_image(ours, [s])[0])
    theirs.scheduler = their_scheduler(theirs, "euler")
    packed = theirs(s.prompt, num_inference_steps=s.steps, guidance_scale=s.guidance, height=64, width=64,
                    generator=torch.Generator().manual_seed(s.seed), output_type="latent").images
    latents = FluxPipeline._unpack_latents(packed, 64, 64, theirs.vae_scale_factor)
    up = torch.nn.functional.interpolate(latents, size=(12, 12), mode="bilinear")
    total, kept = int(s.hires_steps / min(s.strength, 0.999)), s.hires_steps  # A1111's rule, not ldm's code
    pipe = FluxImg2ImgPipeline(**{**theirs.components, "scheduler": their_scheduler(theirs, "euler")})
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(s.prompt, image=up, strength=(kept - 0.25) / total, num_inference_steps=total, guidance_scale=s.guidance,
               height=96, width=96, generator=torch.Generator().manual_seed(s.seed), output_type="np").images[0]
    assert mine.shape == (96, 96, 3)
    assert close(mine, as_pixels(ref))
