"""Few-step models at their settings: --preset, and a checkpoint's or LoRA's own metadata saying
what it is (ModelSpec's texts, kohya's ss_ names), always said on stderr, flags given winning."""
import json

import pytest
from PIL import Image
from typer.testing import CliRunner

from ldm_cli import presets
from ldm_cli.cli import app
from tests import lora_files, original_layout, tiny_models

LIGHTNING = {"cfg": 1.0, "scheduler": "euler", "schedule": "sgm_uniform"}


def run(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def row(result) -> dict:
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("metadata, expected", [
    ({"modelspec.title": "SDXL Lightning 4-step LoRA"}, ("lightning", 4)),
    ({"ss_output_name": "Hyper-SDXL-8steps-lora"}, ("hyper", 8)),
    ({"modelspec.title": "lcm-lora-sdv1-5"}, ("lcm", 6)),
    ({"modelspec.description": "SD-Turbo, 1 step", "modelspec.title": "sd turbo"}, ("turbo", 1)),
    ({"modelspec.title": "Juggernaut XL", "ss_output_name": "lightningbolt"}, None),
    ({"ss_sd_model_name": "sdxl_lightning_4step"}, None),  # the base it was trained on says nothing of it
    ({"modelspec.title": "Lightning, 200 steps of training"}, ("lightning", 8)),  # no few-step count
])
def test_what_metadata_names(metadata, expected):
    found = presets.from_metadata(metadata)
    assert (None if found is None else (found[0], found[1]["steps"])) == expected


def test_a_preset_fills_what_is_not_given_and_says_so(sd1_folder, tmp_path):
    result = run("generate", "a fox", "--model", sd1_folder, "--preset", "Lightning", "--steps", "2", "--seed", "1",
                 "--out", tmp_path, "--json")
    assert row(result) | LIGHTNING == row(result) and row(result)["steps"] == 2
    assert result.stderr.strip() == "ldm: preset lightning: --cfg 1 --scheduler euler --schedule sgm_uniform"
    assert "Steps: 2, Sampler: Euler, Schedule type: SGM Uniform, CFG scale: 1," in Image.open(row(result)["path"]).text["parameters"]


def test_an_unknown_preset_is_one_line(sd1_folder, tmp_path):
    result = run("generate", "a fox", "--model", sd1_folder, "--preset", "lightnin", "--out", tmp_path / "o")
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        "ldm: error: unknown preset 'lightnin' (did you mean 'lightning'?); choose one of: lightning, hyper, lcm, turbo"]
    assert not (tmp_path / "o").exists()


def test_a_lora_made_for_few_steps_brings_its_settings(sd1_folder, tmp_path):
    from tests.test_networks_run import UNET

    unet = lora_files.kohya(lora_files.layers(tiny_models.unet(), UNET), "lora_unet_")
    lora_files.write(tmp_path / "loras" / "fast.safetensors", unet, {"ss_output_name": "sd15_lightning_4step"})
    base = ["generate", "a fox <lora:fast:1>", "--model", sd1_folder, "--lora-dir", tmp_path / "loras", "--seed", "1",
            "--json"]
    result = run(*base, "--out", tmp_path / "a")
    assert row(result) | LIGHTNING == row(result) and row(result)["steps"] == 4
    assert "LoRA fast is a lightning LoRA (its metadata says): --steps 4 --cfg 1" in result.stderr
    given = row(run(*base, "--steps", "3", "--cfg", "2", "--out", tmp_path / "b"))
    assert (given["steps"], given["cfg"], given["scheduler"]) == (3, 2.0, "euler")


def test_a_checkpoint_made_for_few_steps_brings_its_settings(sd1_folder, tmp_path):
    path = original_layout.write(sd1_folder, tmp_path / "fast.safetensors", "sd1",
                                 metadata={**original_layout.ldm_metadata(sd1_folder, "sd1"),
                                           "modelspec.title": "Tiny Hyper-SD 2-steps"})
    result = run("generate", "a fox", "--model", path, "--seed", "1", "--out", tmp_path / "o", "--json")
    assert row(result) | LIGHTNING == row(result) and row(result)["steps"] == 2
    assert "fast.safetensors is a hyper model (its metadata says): --steps 2 --cfg 1" in result.stderr


def test_batch_preset_fills_what_a_line_does_not_give(sd1_folder, tmp_path):
    (tmp_path / "p.txt").write_text('--prompt "a fox" --seed 1\n--prompt "a cat" --seed 2 --steps 3 --sampler_name Euler\n')
    result = run("batch", tmp_path / "p.txt", "--model", sd1_folder, "--preset", "turbo", "--out", tmp_path / "o",
                 "--json", "--quiet")
    assert result.exit_code == 0, result.output
    rows = sorted((json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")), key=lambda r: r["seed"])
    assert [(r["steps"], r["cfg"], r["scheduler"], r["schedule"]) for r in rows] == [
        (4, 1.0, "euler_a", "sgm_uniform"), (3, 1.0, "euler", "sgm_uniform")]
    assert "ldm: preset turbo: --steps 4 --cfg 1 --scheduler euler_a --schedule sgm_uniform" in result.stderr
