"""--rng nv (CUDA's Philox noise on the CPU, as A1111 draws it), --clip-skip, and how both are
recorded, read back from A1111's and ldm's PNGs, and refused when wrong."""
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ldm_cli import images, philox, pipeline, prompts_file, render
from ldm_cli.cli import app
from ldm_cli.errors import LdmError
from ldm_cli.settings import Settings

# torch.randn(3, 4, device="cuda") after torch.manual_seed(0), as A1111's rng_philox documents it
CUDA_SEED_0 = [[-0.92466259, -0.42534415, -2.6438457, 0.14518388],
               [-0.12086647, -0.57972564, -0.62285122, -0.32838709],
               [-1.07454231, -0.36314407, -1.67105067, 2.26550497]]


def test_philox_gives_cudas_numbers():
    got = philox.randn(0, (3, 4))
    assert got.dtype == torch.float32 and got.shape == (3, 4)
    assert np.allclose(got.numpy(), CUDA_SEED_0, atol=5e-7)


def test_philox_draws_are_normal_and_seeded():
    a, b = philox.randn(1234, (4, 64, 64)), philox.randn(1234, (4, 64, 64))
    assert torch.equal(a, b)
    assert not torch.allclose(a, philox.randn(1235, (4, 64, 64)))
    assert not torch.allclose(a, philox.randn(1234, (4, 64, 64), offset=1))
    big = philox.randn(7, (200_000,))
    assert abs(big.mean().item()) < 0.01 and abs(big.std().item() - 1) < 0.01
    assert torch.equal(philox.randn(5, (2, 3)).flatten(), philox.randn(5, (6,)))  # element i is counter i


def test_initial_noise_per_image_source():
    model = SimpleNamespace(vae_scale_factor=8, latent_channels=4, device=torch.device("cpu"), dtype=torch.float32)
    group = [Settings(seed=3, width=64, height=64, rng="nv"), Settings(seed=4, width=64, height=64, rng="cpu")]
    noise = pipeline.initial_noise(model, group, pipeline.generators_for(group))
    assert torch.equal(noise[0], philox.randn(3, (4, 8, 8)))
    assert torch.equal(noise[1], torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(4))[0])


A1111_TEXT = ("a fox\nNegative prompt: blurry\nSteps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, "
              "Seed: 1, Size: 512x512, Model: v1-5, Clip skip: 2, Version: v1.10.1")


def test_a1111_images_without_an_rng_entry_drew_gpu_noise():
    s = Settings.from_infotext(A1111_TEXT)
    assert (s.rng, s.clip_skip) == ("nv", 2)
    assert Settings.from_infotext(A1111_TEXT.replace("Version", "RNG: CPU, Version")).rng is None  # CPU noise
    assert Settings.from_infotext(A1111_TEXT.replace("Version", "RNG: NV, Version")).rng == "nv"
    with pytest.raises(LdmError, match="must be CPU, NV or GPU"):
        Settings.from_infotext(A1111_TEXT.replace("Version", "RNG: Perlin, Version"))


def test_ldm_records_both_and_reads_them_back():
    s = Settings(prompt="a fox", steps=20, seed=1, clip_skip=2, rng="nv").resolve({}, (64, 64))
    text = s.to_infotext("1.0")
    assert "Clip skip: 2" in text and "RNG: NV" in text
    back = Settings.from_infotext(text)
    assert (back.clip_skip, back.rng) == (2, "nv")
    plain = Settings(prompt="a fox", steps=20, seed=1).resolve({}, (64, 64))
    assert plain.rng is None and "RNG: CPU" in plain.to_infotext("1.0") and "Clip skip" not in plain.to_infotext("1.0")
    older = plain.to_infotext("0.1").replace(", RNG: CPU", "")  # ldm's images before --rng: CPU noise
    assert Settings.from_infotext(older).rng is None


def test_a_png_replays_as_recorded(tmp_path):
    ours = Settings(prompt="a fox", steps=2, seed=1, rng="nv", clip_skip=2).resolve({}, (64, 64))
    path = images.save_png(images.Image.new("RGB", (64, 64)), tmp_path, "1", render.metadata(ours))
    assert (render.settings_from_png(path).rng, render.settings_from_png(path).clip_skip) == ("nv", 2)
    older = json.loads(ours.to_json())
    del older["rng"]  # a PNG ldm wrote before --rng existed
    path = images.save_png(images.Image.new("RGB", (64, 64)), tmp_path, "2", {"ldm": json.dumps(older)})
    assert render.settings_from_png(path).resolve({}, (64, 64)).rng is None  # None: CPU noise


@pytest.mark.parametrize("args, words", [
    (["--rng", "gpu"], "--rng must be cpu or nv (got 'gpu')"),
    (["--clip-skip", "13"], "--clip-skip must be between 1 and 12 (got 13)"),
    (["--clip-skip", "0"], "--clip-skip must be between 1 and 12 (got 0)"),
])
def test_bad_flags_are_one_line_errors(args, words, tmp_path):
    result = CliRunner().invoke(app, ["generate", "a fox", "--out", str(tmp_path), *args])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"ldm: error: {words}"


def test_flags_render_record_and_replay(sd1_folder, tmp_path):
    runner = CliRunner()
    first = runner.invoke(app, ["generate", "a (red:1.2) fox [a|b]", "--model", str(sd1_folder), "--steps", "2",
                                "--seed", "5", "--rng", "nv", "--clip-skip", "2", "--out", str(tmp_path / "a"), "--json"])
    assert first.exit_code == 0, first.output
    row = json.loads(first.stdout)
    assert (row["rng"], row["clip_skip"]) == ("nv", 2)
    text = images.read_text_chunks(Path(row["path"]))["parameters"]
    assert "Clip skip: 2" in text and "RNG: NV" in text
    again = runner.invoke(app, ["generate", "--from-png", row["path"], "--model", str(sd1_folder),
                                "--out", str(tmp_path / "b"), "--json"])
    assert again.exit_code == 0, again.output
    replay = json.loads(again.stdout)
    assert (replay["rng"], replay["clip_skip"]) == ("nv", 2)
    assert np.array_equal(np.asarray(images.Image.open(row["path"])), np.asarray(images.Image.open(replay["path"])))
    cpu = runner.invoke(app, ["generate", "--from-png", row["path"], "--model", str(sd1_folder), "--rng", "cpu",
                              "--out", str(tmp_path / "c"), "--json"])
    other = np.asarray(images.Image.open(json.loads(cpu.stdout)["path"])).astype(int)
    assert np.abs(other - np.asarray(images.Image.open(row["path"])).astype(int)).max() > 10


def test_prompt_file_keys(tmp_path):
    (tmp_path / "p.txt").write_text('--prompt "a fox" --clip_skip 2 --rng nv\n--prompt x --clip_skip 20\n')
    with pytest.raises(LdmError, match="clip_skip must be between 1 and 12"):
        prompts_file.read(tmp_path / "p.txt", Settings())
    (tmp_path / "p.jsonl").write_text('{"prompt": "a fox", "clip_skip": 2, "rng": "nv"}\n')
    [job] = prompts_file.read(tmp_path / "p.jsonl", Settings())
    assert (job.settings.clip_skip, job.settings.rng) == (2, "nv")
