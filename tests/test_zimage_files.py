"""Z-Image from the files people download: Tongyi's transformer file (bare keys) and ComfyUI's
split files (`diffusion_models/z_image_turbo*.safetensors` under `model.diffusion_model.`,
`text_encoders/qwen_3_4b.safetensors`, FLUX's `ae.safetensors`), and a transformer saved with
diffusers' names; `ldm info`; a missing part refused in one line.

The oracle for the layout is diffusers' own Z-Image converter: it turns the file ldm writes
back into the very weights of the folder's transformer. Each way of giving the same weights
then renders the folder's image exactly.
"""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ldm_cli import loading, pipeline
from ldm_cli.cli import app
from ldm_cli.loading import LoadOptions, detect, zimage
from ldm_cli.loading.tensors import open_checkpoint
from ldm_cli.settings import Settings
from tests import original_layout


@pytest.fixture(scope="module")
def paths(tmp_path_factory, zimage_turbo_folder) -> dict[str, Path]:
    out, folder = tmp_path_factory.mktemp("zimagefiles"), zimage_turbo_folder
    transformer, vae, qwen = original_layout.components(folder, "zimage")
    file = original_layout.component_file
    made = {"folder": folder,
            "tongyi": file(transformer, "zimage", out / "z_image_turbo.safetensors", dtype=torch.bfloat16),
            "comfy": file(transformer, "zimage", out / "z_image_turbo_bf16.safetensors", dtype=torch.bfloat16,
                          prefix="model.diffusion_model.", extra={"norm_final.weight": torch.ones(32)}),
            "diffusers": file(transformer, "diffusers", out / "z_image_turbo_diffusers.safetensors",
                              dtype=torch.bfloat16),
            "qwen": file(qwen, "qwen3", out / "qwen_3_4b.safetensors", prefix="model.",
                         extra={"lm_head.weight": torch.zeros(151936, 32)}),  # ComfyUI's keep the head: not read
            "vae": file(vae, "vae", out / "ae.safetensors")}
    made["configs"] = out / "configs"  # the folder's configs but the transformer's: read from the shapes
    shutil.copytree(folder, made["configs"], ignore=shutil.ignore_patterns("*.safetensors", "transformer"))
    return made


def parts(paths: dict, model: str = "comfy") -> tuple[str, LoadOptions]:
    return str(paths[model]), LoadOptions(config=str(paths["configs"]), vae=str(paths["vae"]),
                                          text_encoders=[str(paths["qwen"])])


def image(model) -> np.ndarray:
    s = Settings(prompt="a red fox in snow", steps=2, seed=3, width=64, height=64).resolve(model.defaults,
                                                                                          model.native_size)
    return np.asarray(pipeline.text_to_image(model, [s])[0]).astype(int)


def test_diffusers_converter_reads_the_original_layout_back(paths):
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    folder = original_layout.component(paths["folder"], "transformer").to(torch.bfloat16).state_dict()
    for name in ("tongyi", "comfy"):
        converted = convert_z_image_transformer_checkpoint_to_diffusers(load_file(paths[name]))
        assert converted.keys() == folder.keys()
        assert all(torch.equal(converted[k], folder[k]) for k in folder), name


@pytest.mark.parametrize("name, layout", [("tongyi", "zimage"), ("comfy", "zimage"), ("diffusers", "diffusers")])
def test_each_layout_is_found_with_its_config_from_the_shapes(paths, name, layout):
    found = detect.detect(open_checkpoint(paths[name], False))
    assert (found.family, found.variant, found.denoiser_slot.kind, found.in_channels) == ("zimage", "turbo", layout, 16)
    folder = json.loads((paths["folder"] / "transformer" / "config.json").read_text())
    assert {k: folder[k] for k in found.denoiser_config if k != "_class_name"} == {
        k: v for k, v in found.denoiser_config.items() if k != "_class_name"}


@pytest.mark.parametrize("name", ["tongyi", "comfy", "diffusers"])
def test_split_files_render_the_folders_image(paths, name):
    folder_model = loading.load(str(paths["folder"]), LoadOptions(dtype="bf16", device="cpu"))
    path, options = parts(paths, name)
    model = loading.load(path, LoadOptions(**{**options.__dict__, "dtype": "bf16", "device": "cpu"}))
    assert (model.family.name, model.options["variant"], model.modules) == ("zimage", "turbo", ["ae", "qwen_3_4b"])
    assert model.defaults["steps"] == 9 and model.tokenizers[0]("Hello, world!").input_ids == [9707, 11, 1879, 0]
    assert np.array_equal(image(model), image(folder_model))


def test_a_file_not_named_turbo_is_base(paths, tmp_path):
    base = shutil.copy(paths["comfy"], tmp_path / "z_image_bf16.safetensors")
    _, options = parts(paths)
    model = loading.load(str(base), options)
    assert (model.options["variant"], model.defaults["steps"], model.defaults["cfg"]) == ("base", 50, 5.0)


def cli(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def test_info_names_the_family_and_what_the_file_needs(paths):
    result = cli("info", paths["comfy"], "--json", "--config", paths["configs"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["family"], info["variant"], info["model"], info["components"]) == (
        "zimage", "turbo", "Z-Image Turbo", ["transformer"])
    assert info["needs"] == ["vae (--vae)", "text_encoder (Qwen3-4B, --text-encoder)"]
    assert info["native_size"] == "1024x1024" and info["storage"]["transformer"] == "bf16"


@pytest.mark.parametrize("extra, message", [
    (["--vae", "vae"], "z_image_turbo_bf16.safetensors has no Qwen3-4B text encoder; pass its file with --text-encoder "
                      "(e.g. qwen_3_4b.safetensors)"),
    (["--text-encoder", "qwen"], "z_image_turbo_bf16.safetensors has no VAE; pass one with --vae (e.g. ae.safetensors)"),
])
def test_a_missing_part_is_one_line(paths, tmp_path, extra, message):
    flags = [extra[0], paths[extra[1]]]
    result = cli("generate", "a fox", "--model", paths["comfy"], *flags, "--config", paths["configs"], "--out", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [f"ldm: error: {message}"]


def test_qwen3_of_another_width_is_refused_in_one_line(paths, tmp_path):
    """Without --config the shipped configs say Qwen3-4B, 2560 wide: the tiny one does not fit."""
    result = cli("generate", "a fox", "--model", paths["comfy"], "--vae", paths["vae"], "--text-encoder", paths["qwen"],
                 "--out", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "ldm: error: --text-encoder qwen_3_4b.safetensors holds a Qwen3 text encoder 32 wide with 2 layers, which "
        "this zimage model does not use; it takes: Qwen3-4B (2560 wide)"]


def test_the_text_encoder_given_as_the_model_is_refused(paths, tmp_path):
    result = cli("generate", "a fox", "--model", paths["qwen"], "--out", tmp_path)
    assert result.exit_code == 2
    assert "holds only a text encoder; pass it with --text-encoder" in result.stderr


def test_rope_axes_keep_the_released_split():
    assert zimage.rope_axes(128) == (32, 48, 48)
    assert zimage.rope_axes(16) == (4, 6, 6)


def test_metadata_names_the_parts_and_replays(paths, tmp_path):
    from PIL import Image

    flags = ["--text-encoder", paths["qwen"], "--vae", paths["vae"], "--config", paths["configs"]]
    first = cli("generate", "a red fox", "--model", paths["comfy"], *flags, "--steps", 2, "--seed", 3, "--cfg", 2,
                "--negative", "blurry", "-W", 64, "-H", 64, "--out", tmp_path / "a")
    assert first.exit_code == 0, first.output
    [png] = (tmp_path / "a").glob("*.png")
    text = Image.open(png).text["parameters"]
    assert "Steps: 2, Sampler: Euler, Schedule type: Simple, CFG scale: 2, Seed: 3, Size: 64x64" in text
    assert "Model: z_image_turbo_bf16, Module 1: ae, Module 2: qwen_3_4b, Shift: 3, Max sequence length: 512" in text
    again = cli("generate", "--from-png", png, "--model", paths["comfy"], *flags, "--out", tmp_path / "b")
    assert again.exit_code == 0, again.output
    [replay] = (tmp_path / "b").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(replay)))


def test_a_float8_transformer_is_upcast(paths, tmp_path):
    """ComfyUI's z_image_turbo_fp8_e4m3fn-style files: each weight read as float8, upcast."""
    transformer = original_layout.component(paths["folder"], "transformer")
    file = original_layout.component_file(transformer, "zimage", tmp_path / "z_image_turbo_fp8_e4m3fn.safetensors",
                                          dtype=torch.float8_e4m3fn, prefix="model.diffusion_model.")
    _, options = parts(paths)
    ours = loading.load(str(file), options)
    ref = loading.load(str(paths["folder"]))
    for p in ref.denoiser.parameters():
        p.data = p.data.to(torch.float8_e4m3fn).float()
    mine, theirs = ours.denoiser.state_dict(), ref.denoiser.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert np.array_equal(image(ours), image(ref))


def test_released_config_from_shapes():
    """The released transformer (3840 wide, 30 layers, 128-wide heads), in both layouts and both
    prefixes: detection gives back the shipped config (and the 6.15B parameters of Z-Image)."""
    from ldm_cli.loading import convert, keymap, recipe
    from ldm_cli.loading.tensors import Checkpoint

    shipped = recipe.read_json(recipe.SHIPPED / "zimage" / "transformer" / "config.json")
    module = convert.empty("transformer", shipped)
    assert round(sum(p.numel() for p in module.parameters()) / 1e9, 2) == 6.15
    for kind in ("zimage", "diffusers"):
        header = {k: tuple(v.shape) for k, v in convert.export(keymap.Slot("x", "", kind), module).items()}
        for shapes in (header, {"model.diffusion_model." + k: v for k, v in header.items()}):
            found = detect.detect(Checkpoint(Path("z_image_turbo_bf16.safetensors"), shapes, {}))
            assert (found.family, found.variant, found.latent_channels) == ("zimage", "turbo", 16)
            assert {**found.denoiser_config, "norm_eps": 1e-05, "qk_norm": True, "rope_theta": 256.0,
                    "t_scale": 1000.0} == shipped


def test_a_gguf_q8_0_transformer_stays_quantized(paths, tmp_path):
    """A city96-style .gguf of the transformer (Tongyi's names, bare): its fused q/k/v is split in
    whole Q8_0 blocks, each Linear dequantized as it runs; the image is that of the weights the
    gguf package's own code dequantizes (within 2/255: fp16 block scales round differently)."""
    from diffusers.quantizers.gguf.utils import GGUFLinear

    from ldm_cli.loading import convert, keymap
    from tests.test_flux_files import q8_where_possible, write_gguf

    ref = loading.load(str(paths["folder"]))
    held = write_gguf(tmp_path / "z_image_turbo-Q8_0.gguf",
                      convert.export(keymap.Slot("transformer", "", "zimage"), ref.denoiser), q8_where_possible)
    _, options = parts(paths)
    ours = loading.load(str(tmp_path / "z_image_turbo-Q8_0.gguf"), options)
    assert isinstance(ours.denoiser.layers[0].attention.to_q, GGUFLinear)
    origins = {name: keymap.zimage_origin(name) for name in ref.denoiser.state_dict()}
    ref.denoiser.load_state_dict({name: held[o.key] if o.part is None else held[o.key].chunk(3)[o.part]
                                  for name, o in origins.items()})
    mine, theirs = image(ours), image(ref)
    assert np.abs(mine - theirs).max() <= 2 and mine.std() > 1


def test_a_gguf_qwen3_text_encoder(paths, tmp_path):
    """Qwen3 as llama.cpp writes it (unsloth's Qwen3-4B-Q8_0.gguf): names from the gguf package's
    own map, matrices in Q8_0; the image is that of the weights the gguf package dequantizes."""
    import gguf
    from diffusers.quantizers.gguf.utils import GGUFLinear

    from tests.test_flux_files import q8_where_possible, write_gguf

    ref = loading.load(str(paths["folder"]))
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, 2)
    state = ref.text_encoders[0].state_dict()
    mapped = {names.get_name(k, try_suffixes=(".weight",)): k for k in state if "rotary" not in k}
    held = write_gguf(tmp_path / "Qwen3-4B-Q8_0.gguf", {g: state[k] for g, k in mapped.items()}, q8_where_possible)
    ours = loading.load(str(paths["comfy"]), LoadOptions(config=str(paths["configs"]), vae=str(paths["vae"]),
                                                         text_encoders=[str(tmp_path / "Qwen3-4B-Q8_0.gguf")]))
    assert isinstance(ours.text_encoders[0].layers[0].self_attn.q_proj, GGUFLinear)
    assert ours.modules == ["ae", "Qwen3-4B-Q8_0"]
    ref.text_encoders[0].load_state_dict({k: held[g] for g, k in mapped.items()}, strict=False)
    ref.denoiser = loading.load(str(paths["comfy"]), parts(paths)[1]).denoiser  # the same bf16-stored transformer
    mine, theirs = image(ours), image(ref)
    assert np.abs(mine - theirs).max() <= 2 and mine.std() > 1


def test_a_t5_gguf_is_not_taken_for_qwen3(paths, tmp_path):
    """T5's llama.cpp names share Qwen3's (enc.blk.N.ffn_up ...): told apart by the q/k norms only Qwen3 has."""
    from ldm_cli.loading import components

    shapes = {"enc.blk.0.attn_q.weight": (64, 64), "enc.blk.0.ffn_gate.weight": (128, 64),
              "enc.blk.0.ffn_up.weight": (128, 64), "token_embd.weight": (32128, 64)}
    checkpoint = type("Header", (), {"shapes": shapes})()
    assert components.encoders_in(checkpoint) == [("t5_gguf", "")]


def test_an_all_in_one_file_renders_the_folders_image(paths, tmp_path):
    """ComfyUI's all-in-one layout: the transformer under model.diffusion_model., FLUX's VAE under
    vae., Qwen3 under text_encoders.qwen3_4b.transformer.model.; nothing else to give."""
    file = original_layout.write(paths["folder"], tmp_path / "z_image_turbo_aio.safetensors", "zimage", extras=False)
    model = loading.load(str(file), LoadOptions(config=str(paths["configs"])))
    assert (model.family.name, model.modules) == ("zimage", [])
    assert np.array_equal(image(model), image(loading.load(str(paths["folder"]))))
    result = cli("info", file, "--json", "--config", paths["configs"])
    assert json.loads(result.stdout)["components"] == ["transformer", "vae", "text_encoder"]
    assert json.loads(result.stdout)["needs"] == []


def test_variant_flag_outranks_the_name(paths, tmp_path):
    base = shutil.copy(paths["comfy"], tmp_path / "z_image_bf16.safetensors")  # named as Base
    _, options = parts(paths)
    options.variant = "turbo"
    model = loading.load(str(base), options)
    assert (model.options["variant"], model.defaults["steps"], model.defaults["cfg"]) == ("turbo", 9, 1.0)
    result = cli("info", base, "--json", "--config", paths["configs"], "--variant", "turbo")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["variant"], info["variant_from"], info["model"]) == ("turbo", "--variant", "Z-Image Turbo")
    assert json.loads(cli("info", base, "--json", "--config", paths["configs"]).stdout)["variant_from"] == "the file's name"


def test_variant_flag_outranks_a_folders_name(paths):
    model = loading.load(str(paths["folder"]), LoadOptions(variant="base"))
    assert (model.options["variant"], model.defaults["steps"]) == ("base", 50)
