"""Qwen-Image from the files people download: the transformer as one file (Qwen's names, bare, or
ComfyUI's `diffusion_models/qwen_image*.safetensors` under `model.diffusion_model.`), Qwen2.5-VL
(`text_encoders/qwen_2.5_vl_7b.safetensors`: Hugging Face's names under `model.`, its vision tower
and head beside) and the VAE in Wan's names (`vae/qwen_image_vae.safetensors`); `ldm info`; a
missing part refused in one line.

The oracle for the VAE's layout is diffusers' own Wan VAE converter: it turns the file ldm
writes back into the very weights of the folder's VAE. Each way of giving the same weights then
renders the folder's image exactly.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ldm_cli import loading, pipeline
from ldm_cli.cli import app
from ldm_cli.loading import LoadOptions, detect, qwen_image
from ldm_cli.loading.tensors import open_checkpoint
from ldm_cli.settings import Settings
from tests import original_layout


@pytest.fixture(scope="module")
def paths(tmp_path_factory, qwen_image_folder) -> dict[str, Path]:
    out, folder = tmp_path_factory.mktemp("qwenimagefiles"), qwen_image_folder
    transformer, vae = (original_layout.component(folder, name) for name in ("transformer", "vae"))
    file = original_layout.component_file
    made = {"folder": folder,
            "qwen": file(transformer, "diffusers", out / "qwen_image.safetensors"),
            "comfy": file(transformer, "diffusers", out / "qwen_image_bf16.safetensors",
                          prefix="model.diffusion_model."),
            "vae": file(vae, "qwen_vae", out / "qwen_image_vae.safetensors"),
            "text": Path(shutil.copy(folder / "text_encoder" / "model.safetensors", out / "qwen_2.5_vl_7b.safetensors"))}
    made["configs"] = out / "configs"  # the folder's configs but the transformer's: read from the shapes
    shutil.copytree(folder, made["configs"], ignore=shutil.ignore_patterns("*.safetensors", "transformer"))
    return made


def options(paths: dict, **kw) -> LoadOptions:
    return LoadOptions(config=str(paths["configs"]), vae=str(paths["vae"]), text_encoders=[str(paths["text"])],
                       device="cpu", **kw)


def image(model, **kw) -> np.ndarray:
    s = Settings(**{"prompt": "a red fox in snow", "steps": 2, "seed": 3, "width": 64, "height": 64, "cfg": 3.0,
                    "negative": "blurry", **kw}).resolve(model.defaults, model.native_size)
    return np.asarray(pipeline.text_to_image(model, [s])[0]).astype(int)


def test_diffusers_converter_reads_the_vae_file_back(paths):
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers
    from safetensors.torch import load_file

    folder = original_layout.component(paths["folder"], "vae").state_dict()
    converted = convert_wan_vae_to_diffusers(load_file(paths["vae"]))
    assert converted.keys() == folder.keys()
    assert all(torch.equal(converted[k], folder[k]) for k in folder)


@pytest.mark.parametrize("name", ["qwen", "comfy"])
def test_each_layout_is_found_with_its_config_from_the_shapes(paths, name):
    found = detect.detect(open_checkpoint(paths[name], False))
    assert (found.family, found.denoiser_slot.kind, found.in_channels) == ("qwen-image", "diffusers", 16)
    folder = json.loads((paths["folder"] / "transformer" / "config.json").read_text())
    assert {k: folder[k] for k in found.denoiser_config if k != "_class_name"} == {
        k: v for k, v in found.denoiser_config.items() if k != "_class_name"}


@pytest.mark.parametrize("name", ["qwen", "comfy"])
def test_split_files_render_the_folders_image(paths, name):
    folder_model = loading.load(str(paths["folder"]), LoadOptions(device="cpu"))
    model = loading.load(str(paths[name]), options(paths))
    assert (model.family.name, model.modules) == ("qwen-image", ["qwen_image_vae", "qwen_2.5_vl_7b"])
    assert (model.defaults["steps"], model.defaults["cfg"], model.vae_scale_factor) == (50, 4.0, 8)
    assert model.tokenizers[0]("<think>").input_ids == [13708, 766, 29]  # Qwen2.5's, not Qwen3's
    assert np.array_equal(image(model), image(folder_model))


def test_a_folder_takes_the_vae_file(paths):
    folder_model = loading.load(str(paths["folder"]), LoadOptions(device="cpu"))
    model = loading.load(str(paths["folder"]), LoadOptions(device="cpu", vae=str(paths["vae"])))
    assert np.array_equal(image(model), image(folder_model))


def cli(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def test_info_names_the_family_and_what_the_file_needs(paths):
    result = cli("info", paths["comfy"], "--json", "--config", paths["configs"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["family"], info["model"], info["components"]) == ("qwen-image", "Qwen-Image", ["transformer"])
    assert info["needs"] == ["vae (--vae)", "text_encoder (Qwen2.5-VL-7B, --text-encoder)"]
    assert info["native_size"] == "1024x1024" and info["storage"]["transformer"] == "fp32"


def test_info_with_the_shipped_configs_names_the_released_sizes(paths):
    result = cli("info", paths["comfy"], "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["native_size"] == "1024x1024"


@pytest.mark.parametrize("extra, message", [
    (["--vae", "vae"], "qwen_image_bf16.safetensors has no Qwen2.5-VL-7B text encoder; pass its file with "
                      "--text-encoder (e.g. qwen_2.5_vl_7b.safetensors)"),
    (["--text-encoder", "text"], "qwen_image_bf16.safetensors has no VAE; pass one with --vae "
                                 "(e.g. qwen_image_vae.safetensors)"),
])
def test_a_missing_part_is_one_line(paths, tmp_path, extra, message):
    result = cli("generate", "a fox", "--model", paths["comfy"], extra[0], paths[extra[1]], "--config",
                 paths["configs"], "--out", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"ldm: error: {message}"]


def test_a_vae_of_another_family_is_refused_in_one_line(paths, tmp_path, flux_dev_folder):
    result = cli("generate", "a fox", "--model", paths["folder"], "--vae", flux_dev_folder / "vae", "--out", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"ldm: error: --vae {str(flux_dev_folder / 'vae')!r} holds a AutoencoderKL, but this model's VAE is a "
        "AutoencoderKLQwenImage; pass a VAE of the model's own family"]


def test_qwen25vl_of_another_width_is_refused_in_one_line(paths, tmp_path):
    """Without --config the shipped configs say Qwen2.5-VL-7B, 3584 wide: the tiny one does not fit."""
    result = cli("generate", "a fox", "--model", paths["comfy"], "--vae", paths["vae"], "--text-encoder", paths["text"],
                 "--out", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "ldm: error: --text-encoder qwen_2.5_vl_7b.safetensors holds a Qwen2.5-VL text encoder 32 wide with 2 layers, "
        "which this qwen-image model does not use; it takes: Qwen2.5-VL-7B (3584 wide)"]


def test_metadata_and_replay_with_split_files(paths, tmp_path):
    flags = ["--config", paths["configs"], "--vae", paths["vae"], "--text-encoder", paths["text"]]
    first = cli("generate", "a red fox", "--model", paths["comfy"], *flags, "--steps", "2", "--seed", "5", "-W", "64",
                "-H", "64", "--out", tmp_path / "a")
    assert first.exit_code == 0, first.output
    [png] = (tmp_path / "a").glob("*.png")
    text = Image.open(png).text["parameters"]
    assert "Steps: 2, Sampler: Euler, Schedule type: Simple, CFG scale: 4, Seed: 5," in text
    assert "Model: qwen_image_bf16, Module 1: qwen_image_vae, Module 2: qwen_2.5_vl_7b," in text
    again = cli("generate", "--from-png", png, *flags, "--out", tmp_path / "b")
    assert again.exit_code == 0, again.output
    [replay] = (tmp_path / "b").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(replay)))


def test_rope_axes_keep_the_released_split():
    assert qwen_image.rope_axes(128) == (16, 56, 56)
    assert qwen_image.rope_axes(16) == (4, 6, 6)
