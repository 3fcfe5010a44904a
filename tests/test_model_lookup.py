"""--from-png finds a recorded model that moved by its name and hash in the models folders
(--models-dir, $LDM_MODELS_DIR; A1111's and ComfyUI's layouts), and refuses, never substitutes,
one it cannot find."""
import json
import shutil

import pytest
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from ldm_cli import hashing, model_lookup
from ldm_cli.cli import app
from ldm_cli.errors import LdmError


def a1111_png(path, model: str | None, model_hash: str | None = None):
    fields = "Steps: 1, Sampler: Euler, CFG scale: 7, Seed: 3, Size: 64x64"
    fields += f", Model hash: {model_hash}" * bool(model_hash) + f", Model: {model}" * bool(model)
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a fox\n" + fields)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return str(path)


def test_a_model_that_cannot_be_found_is_refused_not_substituted(tmp_path, monkeypatch):
    monkeypatch.delenv(model_lookup.MODELS_ENV, raising=False)
    png = a1111_png(tmp_path / "x.png", "sd_xl_base_1.0", "31e35c80fc")
    result = CliRunner().invoke(app, ["generate", "--from-png", png, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        f"ldm: error: '{png}' was made with the model 'sd_xl_base_1.0' (hash 31e35c80fc), which ldm cannot find "
        "without a models folder; pass it with --model, or the folder holding it with --models-dir (or $LDM_MODELS_DIR)"]
    empty = tmp_path / "models"
    empty.mkdir()
    result = CliRunner().invoke(app, ["generate", "--from-png", png, "--models-dir", str(empty), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and f"which is not in '{empty}'; pass it with --model" in result.stderr
    assert not (tmp_path / "o").exists()


def test_an_ldm_png_whose_model_moved_is_found_by_name(sd1_folder, tmp_path, monkeypatch):
    monkeypatch.delenv(model_lookup.MODELS_ENV, raising=False)
    out = tmp_path / "o"
    moved = tmp_path / "old" / "tiny-sd1"
    shutil.copytree(sd1_folder, moved)
    made = CliRunner().invoke(app, ["generate", "a fox", "--model", str(moved), "--steps", "1", "--seed", "5",
                                    "--out", str(out), "--json"])
    png = json.loads(made.stdout)["path"]
    shutil.rmtree(moved)
    refused = CliRunner().invoke(app, ["generate", "--from-png", png, "--out", str(out)])
    assert refused.exit_code == 2 and "the model 'tiny-sd1' (hash " in refused.stderr
    assert f"which is not at '{moved}' and ldm cannot find without a models folder" in refused.stderr
    webui = tmp_path / "webui"
    shutil.copytree(sd1_folder, webui / "models" / "Stable-diffusion" / "sub" / "tiny-sd1")
    again = CliRunner().invoke(app, ["generate", "--from-png", png, "--models-dir", str(webui), "--out", str(out), "--json"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["model"] == str(webui / "models" / "Stable-diffusion" / "sub" / "tiny-sd1")


def test_a_png_that_recorded_no_model_replays_with_the_builtin_one(tmp_path):
    assert model_lookup.recorded_model(None, None, None, tmp_path / "x.png", None) is None
    assert model_lookup.recorded_model("/elsewhere/builtin.safetensors", "ldm-builtin", "0123456789",
                                       tmp_path / "x.png", None) is None


def test_the_recorded_hash_picks_among_files_of_one_name(tmp_path, monkeypatch):
    comfy = tmp_path / "ComfyUI"
    for i, sub in enumerate(("a", "b")):
        (comfy / "models" / "checkpoints" / sub).mkdir(parents=True)
        (comfy / "models" / "checkpoints" / sub / "m.safetensors").write_bytes(bytes([i]) * 64)
    (comfy / "other").mkdir()
    (comfy / "other" / "m.ckpt").write_bytes(b"not searched: outside models/checkpoints")
    monkeypatch.setenv(model_lookup.MODELS_ENV, str(comfy))
    roots = model_lookup.folders(None)
    assert roots == [comfy / "models" / "checkpoints"]
    second = comfy / "models" / "checkpoints" / "b" / "m.safetensors"
    assert model_lookup.find("m", hashing.short_hash(second), roots) == second
    with pytest.raises(LdmError, match="several models are named 'm' .* none has the recorded hash 0000000000"):
        model_lookup.find("m", "0000000000", roots)
    assert model_lookup.find("../m", None, roots) is None and model_lookup.find("gone", None, roots) is None
    (comfy / "models" / "checkpoints" / "b" / "m.safetensors").unlink()
    assert model_lookup.find("m", "0000000000", roots) == comfy / "models" / "checkpoints" / "a" / "m.safetensors"


@pytest.mark.parametrize("layout", [("Stable-diffusion", "Lora"), ("checkpoints", "loras")])  # A1111's, ComfyUI's
def test_model_and_lora_names_from_the_models_folder(sd1_folder, tmp_path, monkeypatch, layout):
    from tests import lora_files, tiny_models

    checkpoints, loras = layout
    root = tmp_path / "models"
    shutil.copytree(sd1_folder, root / checkpoints / "base" / "tiny-sd1")
    unet = lora_files.kohya(lora_files.layers(tiny_models.unet(), ("to_q", "to_v")), "lora_unet_")
    lora = lora_files.write(root / loras / "style" / "fox.safetensors", unet)
    monkeypatch.setenv(model_lookup.MODELS_ENV, str(tmp_path))
    assert model_lookup.listing("checkpoints", None) == {"tiny-sd1": root / checkpoints / "base" / "tiny-sd1"}
    assert model_lookup.listing("loras", None) == {"fox": lora}
    args = ["generate", "a fox <lora:fox:0.8>", "--steps", "1", "--seed", "3", "--json"]
    by_name = CliRunner().invoke(app, [*args, "--model", "tiny-sd1", "--out", str(tmp_path / "a")])
    assert by_name.exit_code == 0, by_name.output
    by_path = CliRunner().invoke(app, [*args, "--model", str(sd1_folder), "--lora-dir", str(lora.parent),
                                       "--out", str(tmp_path / "b")])
    images = [Image.open(json.loads(r.stdout)["path"]) for r in (by_name, by_path)]
    assert images[0].tobytes() == images[1].tobytes() and "Lora hashes" in images[0].text["parameters"]
    missing = CliRunner().invoke(app, [*args, "--model", "nope", "--out", str(tmp_path / "c")])
    assert missing.exit_code == 2 and "nope" in missing.stderr and not (tmp_path / "c").exists()
