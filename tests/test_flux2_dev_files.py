"""FLUX.2 dev from the files people download: Black Forest Labs' transformer file (bare keys, told
from klein by its guidance embedding) and ComfyUI's split files (`diffusion_models/` under
`model.diffusion_model.`; `text_encoders/mistral_3_small_flux2*.safetensors`, Mistral's language
model under `model.`, cut to the 30 layers the pipeline reads, without its final norm and with
its tekken.json as a uint8 tensor; `vae/flux2-vae.safetensors`). Each renders the folder's image;
`ldm info` names the variant and the parts it needs; a Mistral cut too short, or carrying another
vocabulary, is refused in one line."""
import base64
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ldm_cli import loading, pipeline
from ldm_cli.cli import app
from ldm_cli.loading import LoadOptions, detect, tekken
from ldm_cli.loading.tensors import open_checkpoint
from ldm_cli.settings import Settings
from tests import original_layout


def tekken_json(vocabulary_changed: bool = False) -> bytes:
    """Mistral's tekken.json rebuilt from ldm's copy (the format ComfyUI's file embeds)."""
    spelling = {c: b for b, c in tekken._byte_spelling().items()}
    vocab = json.loads((tekken.MISTRAL_TOKENIZER / "vocab.json").read_text(encoding="utf-8"))
    words = sorted(vocab.items(), key=lambda item: item[1])[1000:]
    if vocabulary_changed:
        words[5], words[6] = words[6], words[5]
    pattern = json.loads((tekken.MISTRAL_TOKENIZER / "tokenizer_config.json").read_text())["pattern"]
    entries = [{"rank": i, "token_bytes": base64.b64encode(bytes(spelling[c] for c in w)).decode()}
               for i, (w, _) in enumerate(words)]
    return json.dumps({"config": {"pattern": pattern, "default_vocab_size": 131072,
                                  "default_num_special_tokens": 1000}, "vocab": entries}).encode()


@pytest.fixture(scope="module")
def paths(tmp_path_factory, flux2_dev_folder) -> dict[str, Path]:
    out, folder = tmp_path_factory.mktemp("flux2devfiles"), flux2_dev_folder
    transformer, vae = (original_layout.component(folder, n) for n in ("transformer", "vae"))
    language = original_layout.component(folder, "text_encoder").model.language_model
    file = original_layout.component_file
    cut = {k: v for k, v in language.state_dict().items()
           if not k.startswith("layers.30.") and k != "norm.weight"}
    tokens = torch.frombuffer(bytearray(tekken_json()), dtype=torch.uint8)
    made = {"folder": folder,
            "bfl": file(transformer, "flux2", out / "flux2-dev.safetensors", dtype=torch.bfloat16),
            "comfy": file(transformer, "flux2", out / "flux2_dev_comfy.safetensors", dtype=torch.bfloat16,
                          prefix="model.diffusion_model."),
            "mistral": file(language, "qwen3", out / "mistral_full.safetensors", prefix="model."),
            "mistral_cut": out / "mistral_3_small_flux2_bf16.safetensors",
            "vae": file(vae, "vae", out / "flux2-vae.safetensors")}
    from ldm_cli.loading.convert import save_single_file

    save_single_file({**{"model." + k: v for k, v in cut.items()}, "tekken_model": tokens}, made["mistral_cut"], {})
    made["configs"] = out / "configs"  # the folder's configs but the transformer's and tokenizer's: ldm's Tekken
    shutil.copytree(folder, made["configs"], ignore=shutil.ignore_patterns("*.safetensors", "transformer", "tokenizer"))
    made["configs_tokenizer"] = out / "configs_tokenizer"  # with the folder's own tokenizer/ (its tokenizer.json)
    shutil.copytree(folder, made["configs_tokenizer"], ignore=shutil.ignore_patterns("*.safetensors", "transformer"))
    return made


def image(model) -> np.ndarray:
    s = Settings(prompt="a red fox in snow", steps=2, seed=3, width=64, height=64,
                 max_sequence_length=32).resolve(model.defaults, model.native_size)
    return np.asarray(pipeline.text_to_image(model, [s])[0]).astype(int)


@pytest.fixture(scope="module")
def folder_image(paths) -> np.ndarray:
    return image(loading.load(str(paths["folder"]), LoadOptions(dtype="bf16", device="cpu")))


@pytest.mark.parametrize("name, prefix", [("bfl", ""), ("comfy", "model.diffusion_model.")])
def test_dev_is_told_from_klein_by_its_guidance_embedding(paths, name, prefix):
    found = detect.detect(open_checkpoint(paths[name], False))
    assert (found.family, found.variant, found.denoiser_slot.prefix) == ("flux2", "dev", prefix)
    assert found.denoiser_config["guidance_embeds"] is True


@pytest.mark.parametrize("transformer, mistral, configs", [("bfl", "mistral", "configs"),
                                                           ("comfy", "mistral_cut", "configs"),
                                                           ("bfl", "mistral", "configs_tokenizer")])
def test_each_file_form_renders_the_folders_image(paths, folder_image, transformer, mistral, configs):
    model = loading.load(str(paths[transformer]), LoadOptions(config=str(paths[configs]), vae=str(paths["vae"]),
                                                              text_encoders=[str(paths[mistral])], dtype="bf16",
                                                              device="cpu"))
    assert model.options["variant"] == "dev" and model.defaults["guidance"] == 4.0
    assert np.abs(image(model) - folder_image).max() <= 2


def test_the_cut_mistral_keeps_the_layers_read_and_no_norm(paths):
    model = loading.load(str(paths["comfy"]), LoadOptions(config=str(paths["configs"]), vae=str(paths["vae"]),
                                                          text_encoders=[str(paths["mistral_cut"])], device="cpu"))
    mistral = model.text_encoders[0]
    assert (mistral.config.num_hidden_layers, len(mistral.layers)) == (30, 30)
    assert torch.equal(mistral.norm.weight, torch.ones_like(mistral.norm.weight))


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_info_names_the_variant_and_the_parts_it_needs(paths):
    result = cli("info", paths["bfl"], "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["family"], info["variant"], info["variant_from"], info["model"]) == (
        "flux2", "dev", "its guidance embedding", "FLUX.2 dev")
    assert any("Mistral" in part for part in info["needs"]) and any(part.startswith("vae") for part in info["needs"])



def test_a_klein_variant_named_for_dev_is_one_line(paths):
    result = cli("info", paths["bfl"], "--variant", "base")
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        "ldm: error: --variant base: this is FLUX.2 dev, by its guidance embedding; --variant names FLUX.2 klein's "
        "releases (distilled, base)"]


def test_a_mistral_cut_too_short_is_refused_in_one_line(paths, tmp_path):
    from safetensors.torch import load_file, save_file

    short = {k: v for k, v in load_file(paths["mistral_cut"]).items() if not k.startswith("model.layers.29.")}
    save_file(short, tmp_path / "mistral_short.safetensors")
    result = cli("generate", "a fox", "--model", paths["bfl"], "--config", paths["configs"], "--vae", paths["vae"],
                 "--text-encoder", tmp_path / "mistral_short.safetensors", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "ldm: error: --text-encoder mistral_short.safetensors holds 29 of Mistral's 31 layers; FLUX.2 dev reads "
        "its layer 30: pass the whole file (or ComfyUI's mistral_3_small_flux2 file)"]
    assert not (tmp_path / "out").exists()


def test_another_vocabulary_is_refused_in_one_line(paths, tmp_path):
    from safetensors.torch import load_file, save_file

    other = load_file(paths["mistral_cut"])
    other["tekken_model"] = torch.frombuffer(bytearray(tekken_json(vocabulary_changed=True)), dtype=torch.uint8)
    save_file(other, tmp_path / "mistral_other.safetensors")
    result = cli("generate", "a fox", "--model", paths["bfl"], "--config", paths["configs"], "--vae", paths["vae"],
                 "--text-encoder", tmp_path / "mistral_other.safetensors", "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "ldm: error: mistral_other.safetensors carries a Tekken vocabulary other than Mistral Small 3.x's, which ldm "
        "tokenizes with; pass FLUX.2 dev's own Mistral file"]
    assert not (tmp_path / "out").exists()


def test_the_released_dev_config_from_shapes_names_mistral():
    """A released-size dev transformer (its header alone): detection gives back the shipped
    config, and the recipe names the text encoder to give (Mistral Small 3.2) and its tokenizer."""
    from ldm_cli.loading import components, convert, keymap, recipe
    from ldm_cli.loading.tensors import Checkpoint

    shipped = recipe.read_json(recipe.SHIPPED / "flux2-dev" / "transformer" / "config.json")
    module = convert.empty("transformer", shipped)
    header = {k: tuple(v.shape) for k, v in convert.export(keymap.Slot("x", "", "flux2"), module).items()}
    found = detect.detect(Checkpoint(Path("flux2-dev.safetensors"), header, {}))
    assert (found.family, found.variant, found.latent_channels) == ("flux2", "dev", 32)
    assert {**found.denoiser_config, "timestep_guidance_channels": 256, "rope_theta": 2000, "eps": 1e-06} == shipped
    r = recipe.resolve(found, {}, None)
    assert components.label(r, "text_encoder") == "Mistral-Small-3.2-24B"
    assert r.tokenizers == [(recipe.MISTRAL_TOKENIZER, {})]


def header_only(path: Path, shapes: dict) -> Path:
    from ldm_cli.loading.convert import save_single_file

    save_single_file({k: torch.zeros(shape) for k, shape in shapes.items()}, path, {})
    return path


def test_a_qwen3_given_to_dev_is_refused_in_one_line_naming_mistral(paths, tmp_path):
    """Qwen3's names are Mistral's: a Qwen3 (q/k norms) of Mistral's very width is still not it."""
    qwen = header_only(tmp_path / "qwen_3.safetensors", {"model.layers.0.mlp.gate_proj.weight": (8, 32),
                                                         "model.layers.0.self_attn.q_norm.weight": (8,)})
    result = cli("generate", "a fox", "--model", paths["bfl"], "--config", paths["configs"], "--vae", paths["vae"],
                 "--text-encoder", qwen, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "ldm: error: --text-encoder qwen_3.safetensors holds a Qwen3 text encoder 32 wide with 1 layers, which this "
        "flux2 model does not use; it takes: Mistral (32 wide)"]


def test_a_mistral_given_to_klein_is_refused_in_one_line_naming_its_qwen3(tmp_path):
    from tests.test_flux2_files import klein_transformer

    model = klein_transformer(tmp_path / "flux-2-klein-4b.safetensors", 2560)
    mistral = header_only(tmp_path / "mistral_3_small_flux2_bf16.safetensors",
                          {"model.layers.0.mlp.gate_proj.weight": (8, 5120)})
    result = cli("generate", "a fox", "--model", model, "--text-encoder", mistral, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "ldm: error: --text-encoder mistral_3_small_flux2_bf16.safetensors holds a Mistral text encoder 5120 wide with "
        "1 layers, which this flux2 model does not use; it takes: Qwen3-4B (2560 wide)"]
