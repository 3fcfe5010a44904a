"""Chroma from the files people download: lodestones' transformer-only file with T5 (ComfyUI's,
holding `shared` alone) and FLUX's ae given as component files, ComfyUI's all-in-one file;
`ldm info`; a missing part refused in one line.

The oracle for the layout is diffusers' own Chroma converter, on a 3072-wide shape set (it
assumes that width); each file then renders the very image of the diffusers folder.
"""
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ldm_cli import loading, pipeline
from ldm_cli.cli import app
from ldm_cli.loading import LoadOptions, convert, detect, keymap, recipe
from ldm_cli.loading.tensors import Checkpoint
from ldm_cli.settings import Settings
from tests import original_layout, tiny_models

BARE = keymap.Slot("transformer", "", "chroma")  # lodestones' files: no prefix


@pytest.fixture(scope="module")
def paths(tmp_path_factory, chroma_folder) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("chromafiles")
    transformer, vae, t5 = original_layout.components(chroma_folder, "chroma")
    file = original_layout.component_file
    made = {"folder": chroma_folder,
            "transformer": file(transformer, "chroma", out / "Chroma1-HD.safetensors", dtype=torch.bfloat16),
            "vae": file(vae, "vae", out / "ae.safetensors"),
            "t5": file(t5, "t5", out / "t5xxl_fp16.safetensors", dtype=torch.float16),
            "all_in_one": original_layout.write(chroma_folder, out / "chroma-comfy.safetensors", "chroma",
                                                dtype=torch.bfloat16),
            "configs": out / "configs"}  # the folder's configs but the transformer's: read from the shapes
    shutil.copytree(chroma_folder, made["configs"], ignore=shutil.ignore_patterns("*.safetensors", "transformer"))
    return made


def shipped() -> dict:
    return recipe.read_json(recipe.SHIPPED / "chroma" / "transformer" / "config.json")


def test_keymap_agrees_with_diffusers_converter():
    """3072 wide (diffusers' converter assumes it), two blocks of each kind and three approximator
    layers; each weight kept to three columns so the test stays small: only the rows say where a
    weight goes."""
    from diffusers.loaders.single_file_utils import convert_chroma_transformer_checkpoint_to_diffusers

    config = {**shipped(), "num_layers": 2, "num_single_layers": 2, "approximator_layers": 3}
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape[0], *([3] if v.dim() > 1 else []), generator=generator)
             for k, v in convert.empty("transformer", config).state_dict().items()}
    original = convert.export(keymap.CHROMA, SimpleNamespace(config=config, state_dict=lambda: state))
    assert "model.diffusion_model.distilled_guidance_layer.norms.2.scale" in original
    theirs = convert_chroma_transformer_checkpoint_to_diffusers(dict(original))
    assert theirs.keys() == state.keys() and all(torch.equal(theirs[k], state[k]) for k in state)


def test_released_config_from_shapes_and_never_taken_for_flux():
    config = shipped()
    header = {k: tuple(v.shape) for k, v in convert.export(BARE, convert.empty("transformer", config)).items()}
    assert "double_blocks.0.img_attn.qkv.weight" in header and "guidance_in.in_layer.weight" not in header
    assert header["distilled_guidance_layer.in_proj.weight"] == (5120, 64)
    for shapes in (header, {"model.diffusion_model." + k: v for k, v in header.items()}):
        found = detect.detect(Checkpoint(Path("Chroma1-HD.safetensors"), shapes, {}))
        assert (found.family, found.latent_channels) == ("chroma", 16)
        assert found.denoiser_config == {k: v for k, v in config.items() if k != "_comment"}
    flux = convert.export(keymap.Slot("transformer", "", "flux"), tiny_models.flux_transformer("schnell"))
    assert detect.detect(Checkpoint(Path("flux1.safetensors"), {k: tuple(v.shape) for k, v in flux.items()}, {})).family == "flux"


def modules(model) -> list:
    return [model.denoiser, model.vae, *model.text_encoders]


def image(model) -> np.ndarray:
    s = Settings(prompt="a red fox in snow", steps=2, seed=3, width=64, height=64, cfg=3.0,
                 negative="blurry").resolve(model.defaults, model.native_size)
    return np.asarray(pipeline.text_to_image(model, [s])[0]).astype(int)


def reference(folder: Path, **dtypes: torch.dtype):
    """The folder's model, each part's weights rounded as a file storing them in `dtypes` holds them
    (and each in memory of its own: from_pretrained leaves views into the mapped file)."""
    model = loading.load(str(folder))
    for name, module in zip(("denoiser", "vae", "t5"), modules(model)):
        for p in module.parameters():
            p.data = p.data.to(dtypes.get(name, p.dtype)).float().clone()
    return model


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def test_transformer_file_with_t5_and_vae_files_is_the_folder(paths):
    ours = loading.load(str(paths["transformer"]), LoadOptions(config=str(paths["configs"]), vae=str(paths["vae"]),
                                                               text_encoders=[str(paths["t5"])]))
    ref = reference(paths["folder"], denoiser=torch.bfloat16, t5=torch.float16)
    for a, b in zip(modules(ours), modules(ref)):
        assert_same_weights(a, b)
    assert (ours.family.name, ours.size_multiple, ours.defaults["steps"], ours.defaults["cfg"]) == ("chroma", 16, 35, 5.0)
    assert ours.modules == ["ae", "t5xxl_fp16"]
    assert np.array_equal(image(ours), image(ref))


def test_comfyui_all_in_one_file_is_the_folder(paths):
    ours = loading.load(str(paths["all_in_one"]), LoadOptions(config=str(paths["folder"])))
    ref = reference(paths["folder"], denoiser=torch.bfloat16, vae=torch.bfloat16, t5=torch.bfloat16)
    for a, b in zip(modules(ours), modules(ref)):
        assert_same_weights(a, b)
    assert np.array_equal(image(ours), image(ref))


def test_info_names_the_family_parts_and_needs(paths):
    runner = CliRunner()
    bare = json.loads(runner.invoke(app, ["info", str(paths["transformer"]), "--config", str(paths["configs"]),
                                          "--json"]).stdout)
    assert (bare["family"], bare["model"], bare["native_size"], bare["prediction"]) == ("chroma", "Chroma", "1024x1024", "flow")
    assert bare["components"] == ["transformer"] and bare["storage"] == {"transformer": "bf16"}
    assert bare["needs"] == ["vae (--vae)", "text_encoder (T5-XXL, --text-encoder)"]
    whole = json.loads(runner.invoke(app, ["info", str(paths["all_in_one"]), "--config", str(paths["folder"]),
                                           "--json"]).stdout)
    assert whole["components"] == ["transformer", "vae", "text_encoder"] and whole["needs"] == []
    # sizes rounded before anything loads: 16, the VAE's 8 times the 2x2 patches, for files and folders
    assert {loading.size_multiple(str(paths[k])) for k in ("transformer", "all_in_one", "folder")} == {16}


@pytest.mark.parametrize("flags, message", [
    (["--vae", "vae"], "Chroma1-HD.safetensors has no T5-XXL text encoder; pass its file with --text-encoder "
                      "(e.g. t5xxl_fp16.safetensors)"),
    (["--text-encoder", "t5"], "Chroma1-HD.safetensors has no VAE; pass one with --vae (e.g. ae.safetensors)"),
])
def test_a_missing_part_is_one_line(paths, tmp_path, flags, message):
    flags = [str(paths.get(f, f)) for f in flags]
    result = CliRunner().invoke(app, ["generate", "a fox", "--model", str(paths["transformer"]), "--config",
                                      str(paths["configs"]), *flags, "--steps", "1", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().splitlines() == ["ldm: error: " + message]
    assert not (tmp_path / "o").exists()


def test_metadata_in_forges_layout_and_replay(paths, tmp_path):
    from PIL import Image

    parts = ["--config", str(paths["configs"]), "--vae", str(paths["vae"]), "--text-encoder", str(paths["t5"])]
    first = CliRunner().invoke(app, ["generate", "a red fox", "--model", str(paths["transformer"]), *parts, "--steps", "2",
                                     "--seed", "5", "-W", "64", "-H", "64", "--negative", "blurry", "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    [png] = (tmp_path / "a").glob("*.png")
    text = Image.open(png).text["parameters"]
    assert "Negative prompt: blurry\nSteps: 2, Sampler: Euler, Schedule type: Simple, CFG scale: 5, Seed: 5," in text
    assert "Model: Chroma1-HD, Module 1: ae, Module 2: t5xxl_fp16," in text and "Distilled CFG" not in text
    again = CliRunner().invoke(app, ["generate", "--from-png", str(png), *parts, "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    [replay] = (tmp_path / "b").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(replay)))


def test_gguf_q8_0_transformer_stays_quantized_and_renders_its_weights(paths, tmp_path):
    """A GGUF Chroma (as the community quantizes it), through FLUX's GGUF path."""
    from diffusers.quantizers.gguf.utils import GGUFLinear

    from tests.test_flux_files import from_original, q8_where_possible, write_gguf

    ref = reference(paths["folder"], t5=torch.float16)
    held = write_gguf(tmp_path / "chroma-Q8_0.gguf", convert.export(BARE, ref.denoiser), q8_where_possible)
    ours = loading.load(str(tmp_path / "chroma-Q8_0.gguf"), LoadOptions(
        config=str(paths["configs"]), vae=str(paths["vae"]), text_encoders=[str(paths["t5"])]))
    layer = ours.denoiser.single_transformer_blocks[0].attn.to_q
    assert isinstance(layer, GGUFLinear) and layer.weight.quant_type.name == "Q8_0"
    assert ours.family.name == "chroma"
    ref.denoiser = from_original(ref.denoiser, BARE, held)
    assert np.abs(image(ours) - image(ref)).max() <= 2


def test_a_folder_without_t5_is_refused(chroma_folder, tmp_path):
    folder = tmp_path / "no-t5"
    shutil.copytree(chroma_folder, folder, ignore=shutil.ignore_patterns("text_encoder"))
    result = CliRunner().invoke(app, ["generate", "a fox", "--model", str(folder), "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "ldm: error: no-t5 has no T5-XXL text encoder (text_encoder/), which Chroma needs; "
        "add the release's text_encoder/ and tokenizer/ folders to it"]
    assert not (tmp_path / "out").exists()
