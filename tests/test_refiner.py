"""SDXL's refiner: the base to the switch point, the refiner from the same latents, equals
diffusers' StableDiffusionXLPipeline(denoising_end) + StableDiffusionXLImg2ImgPipeline(denoising_start)
within 2/255; its A1111 fields are written, read and replayed; each misuse is one line."""
import json

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ldm_cli import loading, pipeline, refiner
from ldm_cli.cli import app
from ldm_cli.settings import Settings


@pytest.fixture(scope="module")
def base(sdxl_folder, sdxl_refiner_folder):
    model = loading.load(str(sdxl_folder), loading.LoadOptions(device="cpu"))
    model.refiner = loading.load(str(sdxl_refiner_folder), loading.LoadOptions(device="cpu"))
    return model


def pixels(image) -> np.ndarray:
    return np.asarray(image).astype(np.int16)


def diffusers_pair(sdxl_folder, sdxl_refiner_folder, s: Settings, scheduler: str) -> np.ndarray:
    import diffusers

    pipes = [diffusers.DiffusionPipeline.from_pretrained(f, dtype=torch.float32, local_files_only=True)
             for f in (sdxl_folder, sdxl_refiner_folder)]
    for pipe in pipes:
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    # None: diffusers zeroes an absent negative (the base), as ldm zeroes an empty one
    common = dict(negative_prompt=s.negative or None, num_inference_steps=s.steps, guidance_scale=s.cfg,
                  generator=torch.Generator("cpu").manual_seed(s.seed))
    latents = pipes[0](s.prompt, height=s.height, width=s.width, denoising_end=s.refiner_switch_at,
                       output_type="latent", **common).images
    common["generator"] = torch.Generator("cpu").manual_seed(s.seed)
    out = pipes[1](s.prompt, image=latents, denoising_start=s.refiner_switch_at, output_type="np", **common).images[0]
    return (out * 255).round().astype(np.int16)


@pytest.mark.parametrize("scheduler, cls, switch, negative", [("euler", "EulerDiscreteScheduler", 0.8, "blurry"),
                                                              ("ddim", "DDIMScheduler", 0.5, "")])
def test_matches_diffusers_base_and_refiner(base, sdxl_folder, sdxl_refiner_folder, scheduler, cls, switch, negative):
    s = Settings(prompt="a red fox in snow", negative=negative, steps=10, cfg=6.5, seed=1234, scheduler=scheduler,
                 refiner=str(sdxl_refiner_folder), refiner_switch_at=switch).resolve({}, base.native_size)
    mine = pixels(pipeline.text_to_image(base, [s])[0])
    ref = diffusers_pair(sdxl_folder, sdxl_refiner_folder, s, cls)
    alone = pixels(pipeline.text_to_image(base, [s.merged(refiner="")])[0])
    assert mine.std() > 1  # a real image, not a flat one that would match anything
    assert np.abs(mine - ref).max() <= 2
    assert np.abs(mine - alone).max() > 2  # the refiner ran


def test_switch_point_is_diffusers_cutoff():
    """Of leading timesteps 901 ... 1 (10 steps of 1000), 0.8 keeps those at or above 200."""
    timesteps = torch.arange(901, 0, -100)
    assert refiner.switch_index(timesteps, 0.8, 1000) == 8
    assert refiner.switch_index(timesteps, 0.5, 1000) == 5
    assert refiner.switch_index(timesteps, 0.01, 1000) == 0


def test_refiner_encodes_clip_g_alone_with_aesthetic_scores(base):
    s = Settings(prompt="a fox", width=64, height=64)
    pos = base.refiner.family.encode(base.refiner, ["a fox"], s, False)
    neg = base.refiner.family.encode(base.refiner, [""], s, True)
    assert pos["encoder_hidden_states"].shape[-1] == base.refiner.denoiser.config.cross_attention_dim == 32
    assert pos["time_ids"].tolist() == [[64, 64, 0, 0, 6.0]] and neg["time_ids"].tolist() == [[64, 64, 0, 0, 2.5]]
    assert neg["encoder_hidden_states"].abs().sum() > 0  # the refiner does not zero an empty negative


def test_infotext_round_trip():
    s = Settings(prompt="a fox", steps=20, refiner_name="sd_xl_refiner_1.0", refiner_hash="7440042bbd",
                 refiner_switch_at=0.8)
    text = s.to_infotext("test")
    assert "Refiner: sd_xl_refiner_1.0 [7440042bbd], Refiner switch at: 0.8" in text
    back = Settings.from_infotext(text)
    assert (back.refiner_name, back.refiner_hash, back.refiner_switch_at) == ("sd_xl_refiner_1.0", "7440042bbd", 0.8)


def test_cli_records_and_replays(sdxl_folder, sdxl_refiner_folder, tmp_path, monkeypatch):
    result = CliRunner().invoke(app, ["generate", "a fox", "--model", str(sdxl_folder), "--refiner",
                                      str(sdxl_refiner_folder), "--refiner-switch-at", "0.6", "--steps", "5",
                                      "--scheduler", "euler", "--seed", "3", "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout.strip().splitlines()[-1])
    from PIL import Image

    parameters = Image.open(record["path"]).text["parameters"]
    assert "Refiner: tiny-sdxl-refiner [" in parameters and "Refiner switch at: 0.6" in parameters
    # the refiner moved away: found by its recorded name in the models folder, as a model is
    moved = tmp_path / "models" / "tiny-sdxl-refiner"
    moved.parent.mkdir()
    moved.symlink_to(sdxl_refiner_folder, target_is_directory=True)
    a1111 = tmp_path / "a1111.png"
    Image.open(record["path"]).save(a1111, pnginfo=_only_parameters(parameters))
    again = CliRunner().invoke(app, ["generate", "--from-png", str(a1111), "--model", str(sdxl_folder),
                                     "--models-dir", str(tmp_path / "models"), "-o", str(tmp_path / "again"), "--json"])
    assert again.exit_code == 0, again.stderr
    replay = json.loads(again.stdout.strip().splitlines()[-1])
    assert replay["refiner_switch_at"] == 0.6 and replay["refiner_name"] == "tiny-sdxl-refiner"
    assert np.array_equal(pixels(Image.open(replay["path"]).convert("RGB")),
                          pixels(Image.open(record["path"]).convert("RGB")))


def _only_parameters(text: str):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)  # A1111's record alone: the refiner by name and hash
    return info


@pytest.mark.parametrize("args, message", [
    (["--refiner-switch-at", "0"], "--refiner-switch-at must be between 0 and 1, both excluded"),
    (["--refiner-switch-at", "1"], "--refiner-switch-at must be between 0 and 1, both excluded"),
    (["--refiner-switch-at", "1.5"], "--refiner-switch-at must be between 0 and 1"),
    (["--hires-scale", "2"], "--refiner does not combine with hires fix"),
])
def test_bad_switch_is_one_line(sdxl_folder, sdxl_refiner_folder, tmp_path, args, message):
    _refused(["--model", str(sdxl_folder), "--refiner", str(sdxl_refiner_folder), *args], tmp_path, message)


def test_a_k_diffusion_sampler_with_the_refiner_is_one_line(sdxl_folder, sdxl_refiner_folder, tmp_path):
    _refused(["--model", str(sdxl_folder), "--refiner", str(sdxl_refiner_folder), "--scheduler", "DPM++ 2S a"],
             tmp_path, "--refiner runs with diffusers' samplers")


def test_switch_without_refiner_is_one_line(sdxl_folder, tmp_path):
    _refused(["--model", str(sdxl_folder), "--refiner-switch-at", "0.7"], tmp_path, "add --refiner PATH")


def test_refiner_on_a_non_sdxl_model_is_one_line(sd1_folder, sdxl_refiner_folder, tmp_path):
    _refused(["--model", str(sd1_folder), "--refiner", str(sdxl_refiner_folder)], tmp_path,
             "--refiner finishes an SDXL base model's images, but tiny-sd1 is a Stable Diffusion 1.x model")


def test_a_base_given_as_refiner_is_one_line(sdxl_folder, tmp_path):
    _refused(["--model", str(sdxl_folder), "--refiner", str(sdxl_folder)], tmp_path,
             "--refiner tiny-sdxl is not an SDXL refiner")


def test_a_refiner_as_the_base_is_one_line(sdxl_refiner_folder, tmp_path):
    _refused(["--model", str(sdxl_refiner_folder), "--refiner", str(sdxl_refiner_folder)], tmp_path,
             "but tiny-sdxl-refiner is an SDXL refiner")


def _refused(args: list[str], tmp_path, message: str) -> None:
    result = CliRunner().invoke(app, ["generate", "a fox", "--steps", "2", "-W", "64", "-H", "64",
                                      "-o", str(tmp_path / "out"), *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldm: error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_prompt_file_keys_render_what_the_flags_do(sdxl_folder, sdxl_refiner_folder, tmp_path):
    """A1111's API keys (refiner_checkpoint, refiner_switch_at) on a line, beside a line without."""
    args = ["--steps", "4", "--scheduler", "euler", "--seed", "5", "-W", "64", "-H", "64"]
    flags = CliRunner().invoke(app, ["generate", "a fox", "--model", str(sdxl_folder), "--refiner",
                                     str(sdxl_refiner_folder), "--refiner-switch-at", "0.5", *args,
                                     "-o", str(tmp_path / "flags"), "--json"])
    assert flags.exit_code == 0, flags.stderr
    (tmp_path / "p.jsonl").write_text(json.dumps(dict(prompt="a fox", refiner_checkpoint=str(sdxl_refiner_folder),
                                                      refiner_switch_at=0.5)) + "\n" + json.dumps(dict(prompt="a fox")) + "\n")
    result = CliRunner().invoke(app, ["batch", str(tmp_path / "p.jsonl"), "--model", str(sdxl_folder), *args,
                                      "-o", str(tmp_path / "out"), "--json"])
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.strip().splitlines()]
    refined = next(r for r in records if r.get("refiner_name"))
    plain = next(r for r in records if not r.get("refiner_name"))
    from PIL import Image

    made = pixels(Image.open(json.loads(flags.stdout.strip().splitlines()[-1])["path"]).convert("RGB"))
    assert np.array_equal(pixels(Image.open(refined["path"]).convert("RGB")), made)
    assert not np.array_equal(pixels(Image.open(plain["path"]).convert("RGB")), made)
    assert "Refiner" not in Image.open(plain["path"]).text["parameters"]


@pytest.mark.parametrize("line, message", [
    ({"refiner_switch_at": 0.5}, "--refiner_switch_at applies to a refiner; add --refiner_checkpoint"),
    ({"refiner_checkpoint": "r", "init_image": "i.png"}, "--refiner_checkpoint applies to text-to-image lines"),
    ({"refiner_checkpoint": "nowhere"}, "--refiner_checkpoint: no such file or folder"),
])
def test_bad_prompt_file_refiner_is_one_line(sdxl_folder, tmp_path, line, message):
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "a fox", **line}) + "\n")
    result = CliRunner().invoke(app, ["batch", str(tmp_path / "p.jsonl"), "--model", str(sdxl_folder),
                                      "-o", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.startswith("ldm: error: 1 bad line") and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()


def test_img2img_from_a_refined_png_leaves_the_refiner_out(sdxl_folder, sdxl_refiner_folder, tmp_path):
    made = CliRunner().invoke(app, ["generate", "a fox", "--model", str(sdxl_folder), "--refiner",
                                    str(sdxl_refiner_folder), "--steps", "2", "-o", str(tmp_path / "a"), "--json"])
    path = json.loads(made.stdout.strip().splitlines()[-1])["path"]
    again = CliRunner().invoke(app, ["img2img", path, "--from-png", path, "-o", str(tmp_path / "b"), "--json"])
    assert again.exit_code == 0, again.stderr
    assert "refiner_name" not in json.loads(again.stdout.strip().splitlines()[-1])


def test_a_single_file_refiner_is_one_line(sdxl_folder, tmp_path):
    """The original sd_xl_refiner_1.0 layout (OpenCLIP-G under conditioner.embedders.0) is not read yet."""
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
               "model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3),
               "conditioner.embedders.0.model.token_embedding.weight": torch.zeros(10, 8)},
              str(tmp_path / "sd_xl_refiner_1.0.safetensors"))
    _refused(["--model", str(sdxl_folder), "--refiner", str(tmp_path / "sd_xl_refiner_1.0.safetensors")], tmp_path,
             "is an SDXL refiner's single file, which ldm does not read yet; pass the refiner's diffusers folder")



def test_the_base_s_part_files_are_not_the_refiner_s(base, sdxl_refiner_folder, tmp_path):
    """--text-encoder and --vae replace a single-file base's parts; the refiner's folder loads its
    own (a folder given --text-encoder is refused, so they must not reach it)."""
    import copy

    from ldm_cli.loading import LoadOptions

    clip = tmp_path / "clip_g.safetensors"
    clip.write_bytes(b"")  # never read: the base's part, not the refiner's
    model = copy.copy(base)
    refiner.attach(model, str(sdxl_refiner_folder), LoadOptions(device="cpu", text_encoders=[str(clip)],
                                                                vae=str(clip)))
    assert model.refiner.options["variant"] == "refiner" and len(model.refiner.text_encoders) == 1



def test_prompt_schedules_count_the_whole_run(base, sdxl_refiner_folder, monkeypatch):
    """The refiner's steps are numbered from the switch (5 to 9 of 10 at 0.5), so a prompt edit
    ([a:b:N]) or AND schedule goes on where the base left it rather than starting over."""
    from ldm_cli import guidance

    asked, calls = [], guidance.Guidance.calls
    monkeypatch.setattr(guidance.Guidance, "calls", lambda self, step: asked.append(step) or calls(self, step))
    s = Settings(prompt="[a cat:a fox:0.7]", steps=10, cfg=6.5, seed=2, scheduler="euler",
                 refiner=str(sdxl_refiner_folder), refiner_switch_at=0.5).resolve({}, base.native_size)
    pipeline.text_to_image(base, [s])
    assert asked == list(range(10))


def test_offloaded_run_equals_the_plain_one(sdxl_folder, sdxl_refiner_folder, tmp_path):
    """--offload model: each U-Net set aside after its steps (memory.set_aside); the image is the same."""
    args = ["generate", "a fox", "--model", str(sdxl_folder), "--refiner", str(sdxl_refiner_folder), "--steps", "4",
            "--seed", "1", "--json"]
    runs = [CliRunner().invoke(app, [*args, *extra, "-o", str(tmp_path / name)])
            for name, extra in (("plain", []), ("offload", ["--offload", "model"]))]
    assert all(r.exit_code == 0 for r in runs), runs[1].stderr
    from PIL import Image

    paths = [json.loads(r.stdout.strip().splitlines()[-1])["path"] for r in runs]
    assert np.array_equal(*(pixels(Image.open(p).convert("RGB")) for p in paths))
