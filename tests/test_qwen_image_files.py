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
from ldm_cli.errors import LdmError
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


@pytest.mark.parametrize("part, message", [
    ("vae", "holds only a VAE; pass it with --vae"), ("text", "holds only a text encoder; pass it with --text-encoder")])
def test_a_part_given_as_the_model_is_refused(paths, tmp_path, part, message):
    result = cli("generate", "a fox", "--model", paths[part], "--out", tmp_path)
    assert result.exit_code == 2
    assert message in result.stderr


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


def test_a_float8_transformer_is_upcast(paths, tmp_path):
    """ComfyUI's qwen_image_fp8_e4m3fn-style files: each weight read as float8, upcast."""
    transformer = original_layout.component(paths["folder"], "transformer")
    file = original_layout.component_file(transformer, "diffusers", tmp_path / "qwen_image_fp8_e4m3fn.safetensors",
                                          dtype=torch.float8_e4m3fn, prefix="model.diffusion_model.")
    ours = loading.load(str(file), options(paths))
    ref = loading.load(str(paths["folder"]), LoadOptions(device="cpu"))
    for p in ref.denoiser.parameters():
        p.data = p.data.to(torch.float8_e4m3fn).float()
    mine, theirs = ours.denoiser.state_dict(), ref.denoiser.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert np.array_equal(image(ours), image(ref))


def test_a_scaled_float8_text_encoder(paths, tmp_path):
    """ComfyUI's qwen_2.5_vl_7b_fp8_scaled-style file: float8 matrices, each with its scale_weight."""
    from safetensors.torch import load_file

    from ldm_cli.loading import convert

    state, scaled = load_file(paths["text"]), {"scaled_fp8": torch.zeros(2, dtype=torch.float8_e4m3fn)}
    for key, value in state.items():
        if key.startswith("model.layers.") and key.endswith("proj.weight"):
            scaled[key], scaled[key.removesuffix("weight") + "scale_weight"] = (value / 0.5).to(torch.float8_e4m3fn), \
                torch.tensor(0.5)
        else:
            scaled[key] = value
    file = tmp_path / "qwen_2.5_vl_7b_fp8_scaled.safetensors"
    convert.save_single_file(scaled, file, {})
    ours = loading.load(str(paths["comfy"]), LoadOptions(**{**options(paths).__dict__, "text_encoders": [str(file)]}))
    ref = loading.load(str(paths["folder"]), LoadOptions(device="cpu"))
    for name, p in ref.text_encoders[0].named_parameters():
        if name.startswith("layers.") and name.endswith("proj.weight"):
            p.data = (p.data / 0.5).to(torch.float8_e4m3fn).float() * 0.5
    mine, theirs = ours.text_encoders[0].state_dict(), ref.text_encoders[0].state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert np.array_equal(image(ours), image(ref))


def test_a_gguf_q8_0_transformer_stays_quantized(paths, tmp_path):
    """A city96-style .gguf of the transformer (Qwen's names, bare): each Linear dequantized as it
    runs; the image is that of the weights the gguf package's own code dequantizes (within 2/255:
    fp16 block scales round differently)."""
    from diffusers.quantizers.gguf.utils import GGUFLinear

    from ldm_cli.loading import convert, keymap
    from tests.test_flux_files import q8_where_possible, write_gguf

    ref = loading.load(str(paths["folder"]), LoadOptions(device="cpu"))
    held = write_gguf(tmp_path / "qwen-image-Q8_0.gguf",
                      convert.export(keymap.Slot("transformer", "", "diffusers"), ref.denoiser), q8_where_possible)
    ours = loading.load(str(tmp_path / "qwen-image-Q8_0.gguf"), options(paths))
    assert isinstance(ours.denoiser.transformer_blocks[0].attn.to_q, GGUFLinear)
    ref.denoiser.load_state_dict({name: held[name] for name in ref.denoiser.state_dict()})
    mine, theirs = image(ours), image(ref)
    assert np.abs(mine - theirs).max() <= 2 and mine.std() > 1


def test_released_config_from_shapes():
    """The released transformer (3072 wide, 60 layers, 128-wide heads), bare and under ComfyUI's
    prefix: detection gives back the shipped config (and Qwen-Image's 20.4B parameters)."""
    from ldm_cli.loading import convert, keymap, recipe
    from ldm_cli.loading.tensors import Checkpoint

    shipped = recipe.read_json(recipe.SHIPPED / "qwen-image" / "transformer" / "config.json")
    module = convert.empty("transformer", shipped)
    assert round(sum(p.numel() for p in module.parameters()) / 1e9, 1) == 20.4
    header = {k: tuple(v.shape) for k, v in convert.export(keymap.Slot("x", "", "diffusers"), module).items()}
    for shapes in (header, {"model.diffusion_model." + k: v for k, v in header.items()}):
        found = detect.detect(Checkpoint(Path("qwen_image_bf16.safetensors"), shapes, {}))
        assert (found.family, found.latent_channels, found.denoiser_config) == ("qwen-image", 16, shipped)


def test_a_gguf_qwen25vl_text_encoder(paths, tmp_path):
    """Qwen2.5-VL's text model as llama.cpp writes it (unsloth's Qwen2.5-VL-7B-Instruct-Q8_0.gguf):
    names from the gguf package's own map, matrices in Q8_0; the image is that of the weights the
    gguf package dequantizes."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFLinear

    from tests.test_flux_files import q8_where_possible, write_gguf

    ref = loading.load(str(paths["comfy"]), options(paths))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN2VL, 2)
    state = ref.text_encoders[0].state_dict()
    mapped = {names.get_name(k, try_suffixes=(".weight", ".bias")): k for k in state if "rotary" not in k}
    held = write_gguf(tmp_path / "Qwen2.5-VL-7B-Q8_0.gguf", {g: state[k] for g, k in mapped.items()},
                      q8_where_possible)
    ours = loading.load(str(paths["comfy"]), LoadOptions(**{**options(paths).__dict__,
                                                          "text_encoders": [str(tmp_path / "Qwen2.5-VL-7B-Q8_0.gguf")]}))
    assert isinstance(ours.text_encoders[0].layers[0].self_attn.q_proj, GGUFLinear)
    assert ours.modules == ["qwen_image_vae", "Qwen2.5-VL-7B-Q8_0"]
    ref.text_encoders[0].load_state_dict({k: held[g] for g, k in mapped.items()}, strict=False)
    mine, theirs = image(ours), image(ref)
    assert np.abs(mine - theirs).max() <= 2 and mine.std() > 1
    assert not np.array_equal(theirs, image(loading.load(str(paths["comfy"]), options(paths))))  # Q8_0 did act


def test_qwen25_is_told_from_qwen3_and_from_clip():
    """Qwen2.5's q biases beside Qwen's MLP names; CLIP has q biases too, Qwen3 the MLP names."""
    from ldm_cli.loading import components

    def found(keys):
        return components.encoders_in(type("Header", (), {"shapes": dict.fromkeys(keys, (64, 64))})())

    qwen = ["model.layers.0.self_attn.q_proj.bias", "model.layers.0.mlp.gate_proj.weight"]
    clip = ["text_model.encoder.layers.0.self_attn.q_proj.weight", "text_model.encoder.layers.0.self_attn.q_proj.bias"]
    assert found(qwen) == [("qwen25vl", "model.")]
    assert found(qwen[1:]) == [("qwen3", "model.")]
    assert found(clip) == [("clip", "")]


def test_variant_flag_makes_a_single_file_an_edit_model(paths):
    """A Qwen-Image-Edit file has Qwen-Image's shapes: --variant says so and `ldm info` names it;
    `ldm edit` refuses it before anything loads, in one line either way: without the flag it is
    plain Qwen-Image, and with it the vision tower it reads images with comes only from a folder."""
    from ldm_cli import edit

    result = CliRunner().invoke(app, ["info", str(paths["comfy"]), "--json", "--config", str(paths["configs"]),
                                      "--variant", "edit-plus"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["variant"], info["variant_from"], info["model"]) == (
        "edit-plus", "--variant", "Qwen-Image-Edit Plus (2509, 2511)")
    with pytest.raises(LdmError, match="vision tower, which ldm loads from a diffusers folder only"):
        edit.check_model(str(paths["comfy"]), "edit-plus")
    with pytest.raises(LdmError, match="cannot edit by instruction"):
        edit.check_model(str(paths["comfy"]))
    model = loading.load(str(paths["comfy"]), options(paths, variant="edit"))
    assert model.options["variant"] == "edit" and edit.editing(model).label.startswith("Qwen-Image-Edit")
