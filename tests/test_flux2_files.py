"""FLUX.2 klein from the files people download: Black Forest Labs' transformer file (bare keys),
ComfyUI's split files (`diffusion_models/` under `model.diffusion_model.`,
`text_encoders/qwen_3_4b.safetensors`, `vae/flux2-vae.safetensors`); `ldm info`; a Qwen3 of the
other klein's size and a missing part refused in one line (dev: test_flux2_dev_files.py).

The oracle for the layout is diffusers' own FLUX.2 converter: it turns the file ldm writes back
into the very weights of the folder's transformer. Each way of giving the same weights then
renders the folder's image exactly.
"""
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ldm_cli import loading, pipeline
from ldm_cli.cli import app
from ldm_cli.loading import LoadOptions, detect
from ldm_cli.loading.convert import save_single_file
from ldm_cli.loading.tensors import open_checkpoint
from ldm_cli.settings import Settings
from tests import original_layout


@pytest.fixture(scope="module")
def paths(tmp_path_factory, flux2_klein_folder) -> dict[str, Path]:
    from safetensors.torch import load_file

    out, folder = tmp_path_factory.mktemp("flux2files"), flux2_klein_folder
    transformer, vae, qwen = original_layout.components(folder, "flux2")
    file = original_layout.component_file
    made = {"folder": folder,
            "bfl": file(transformer, "flux2", out / "flux-2-klein-4b.safetensors", dtype=torch.bfloat16),
            "comfy": file(transformer, "flux2", out / "flux-2-klein-4b-comfy.safetensors", dtype=torch.bfloat16,
                          prefix="model.diffusion_model."),
            # Hugging Face's Qwen3ForCausalLM names, its head kept (as ComfyUI's files): not read
            "qwen": file(qwen.model, "qwen3", out / "qwen_3_4b.safetensors", prefix="model.",
                         extra={"lm_head.weight": torch.zeros(151936, 32)}),
            "vae": file(vae, "vae", out / "flux2-vae.safetensors"),
            "vae_diffusers": file(vae, "diffusers", out / "flux2-vae-diffusers.safetensors")}
    # a VAE file without the BatchNorm's count of training batches, which eval never reads
    uncounted = {k: v for k, v in load_file(made["vae"]).items() if not k.endswith("num_batches_tracked")}
    made["vae_uncounted"] = out / "flux2-vae-uncounted.safetensors"
    save_single_file(uncounted, made["vae_uncounted"], {})
    made["configs"] = out / "configs"  # the folder's configs but the transformer's: read from the shapes
    shutil.copytree(folder, made["configs"], ignore=shutil.ignore_patterns("*.safetensors", "transformer"))
    return made


def options(paths: dict, vae: str = "vae", **kw) -> LoadOptions:
    return LoadOptions(config=str(paths["configs"]), vae=str(paths[vae]), text_encoders=[str(paths["qwen"])],
                       dtype="bf16", device="cpu", **kw)


def image(model) -> np.ndarray:
    s = Settings(prompt="a red fox in snow", steps=2, seed=3, width=64, height=64,
                 max_sequence_length=32).resolve(model.defaults, model.native_size)
    return np.asarray(pipeline.text_to_image(model, [s])[0]).astype(int)


def test_diffusers_converter_reads_the_original_layout_back(paths):
    from diffusers.loaders.single_file_utils import convert_flux2_transformer_checkpoint_to_diffusers
    from safetensors.torch import load_file

    folder = original_layout.component(paths["folder"], "transformer").to(torch.bfloat16).state_dict()
    converted = convert_flux2_transformer_checkpoint_to_diffusers(load_file(paths["bfl"]))
    assert converted.keys() == folder.keys()
    assert all(torch.equal(converted[k], folder[k]) for k in folder)


@pytest.mark.parametrize("name, prefix", [("bfl", ""), ("comfy", "model.diffusion_model.")])
def test_each_layout_is_found_with_its_config_from_the_shapes(paths, name, prefix):
    found = detect.detect(open_checkpoint(paths[name], False))
    assert (found.family, found.variant, found.denoiser_slot.kind, found.denoiser_slot.prefix, found.in_channels) == (
        "flux2", "distilled", "flux2", prefix, 8)
    folder = json.loads((paths["folder"] / "transformer" / "config.json").read_text())
    assert {k: v for k, v in found.denoiser_config.items() if k != "_class_name"} == {
        k: folder[k] for k in found.denoiser_config if k != "_class_name"}


@pytest.fixture(scope="module")
def folder_image(paths):
    return image(loading.load(str(paths["folder"]), LoadOptions(dtype="bf16", device="cpu")))


@pytest.mark.parametrize("name, vae", [("bfl", "vae"), ("comfy", "vae"), ("comfy", "vae_diffusers"),
                                       ("comfy", "vae_uncounted")])
def test_split_files_render_the_folders_image(paths, folder_image, name, vae):
    model = loading.load(str(paths[name]), options(paths, vae))
    assert (model.family.name, model.options["variant"], model.modules) == ("flux2", "distilled",
                                                                             [Path(paths[vae]).stem, "qwen_3_4b"])
    assert model.defaults["steps"] == 4 and model.tokenizers[0]("Hello, world!").input_ids == [9707, 11, 1879, 0]
    assert np.array_equal(image(model), folder_image)


def test_a_file_named_base_is_base(paths, tmp_path):
    base = shutil.copy(paths["comfy"], tmp_path / "flux-2-klein-base-4b.safetensors")
    model = loading.load(str(base), options(paths))
    assert (model.options["variant"], model.defaults["steps"], model.defaults["cfg"]) == ("base", 50, 4.0)


def cli(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def test_info_names_the_family_the_variant_assumed_and_what_the_file_needs(paths):
    result = cli("info", paths["comfy"], "--json", "--config", paths["configs"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert (info["family"], info["variant"], info["variant_from"], info["components"]) == (
        "flux2", "distilled", "the file's name", ["transformer"])
    assert info["needs"] == ["vae (--vae)", "text_encoder (Qwen3, --text-encoder)"]
    assert info["native_size"] == "1024x1024" and info["storage"]["transformer"] == "bf16"


def test_a_missing_vae_is_one_line(paths, tmp_path):
    result = cli("generate", "a fox", "--model", paths["comfy"], "--text-encoder", paths["qwen"], "--config",
                 paths["configs"], "--out", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        "ldm: error: flux-2-klein-4b-comfy.safetensors has no VAE; pass one with --vae (e.g. flux2-vae.safetensors)"]


def header_only(path: Path, shapes: dict) -> Path:
    """A file with the tensors detection reads, at their real widths (small elsewhere)."""
    save_single_file({k: torch.zeros(shape) for k, shape in shapes.items()}, path, {})
    return path


def klein_transformer(path: Path, text_width: int) -> Path:
    shapes = {"img_in.weight": (32, 128), "txt_in.weight": (32, 3 * text_width), "single_stream_modulation.lin.weight":
              (96, 32), "double_blocks.0.img_attn.qkv.weight": (96, 32), "double_blocks.0.img_mlp.0.weight": (192, 32),
              "double_blocks.0.img_attn.norm.query_norm.scale": (16,)}
    return header_only(path, shapes)


@pytest.mark.parametrize("klein, qwen, wanted", [
    ("flux-2-klein-4b.safetensors", 4096, "Qwen3-4B (2560 wide)"),
    ("flux-2-klein-9b.safetensors", 2560, "Qwen3-8B (4096 wide)"),
])
def test_the_other_kleins_qwen3_is_refused_in_one_line_naming_the_right_one(tmp_path, klein, qwen, wanted):
    model = klein_transformer(tmp_path / klein, 2560 if wanted.startswith("Qwen3-4B") else 4096)
    encoder = header_only(tmp_path / "qwen_3.safetensors", {"model.layers.0.mlp.gate_proj.weight": (8, qwen),
                                                            "model.layers.0.self_attn.q_norm.weight": (128,)})
    result = cli("generate", "a fox", "--model", model, "--text-encoder", encoder, "--out", tmp_path)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"ldm: error: --text-encoder qwen_3.safetensors holds a Qwen3 text encoder {qwen} wide with 1 layers, which "
        f"this flux2 model does not use; it takes: {wanted}"]


def test_metadata_names_the_parts_and_replays(paths, tmp_path):
    from PIL import Image

    flags = ["--text-encoder", paths["qwen"], "--vae", paths["vae"], "--config", paths["configs"]]
    first = cli("generate", "a red fox", "--model", paths["comfy"], *flags, "--steps", 2, "--seed", 3, "-W", 64,
                "-H", 64, "--max-sequence-length", 32, "--out", tmp_path / "a")
    assert first.exit_code == 0, first.output
    [png] = (tmp_path / "a").glob("*.png")
    text = Image.open(png).text["parameters"]
    assert "Steps: 2, Sampler: Euler, Schedule type: Simple, CFG scale: 1, Seed: 3, Size: 64x64" in text
    assert "Model: flux-2-klein-4b-comfy, Module 1: flux2-vae, Module 2: qwen_3_4b" in text
    again = cli("generate", "--from-png", png, "--model", paths["comfy"], *flags, "--out", tmp_path / "b")
    assert again.exit_code == 0, again.output
    [replay] = (tmp_path / "b").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(replay)))


@pytest.mark.parametrize("size, qwen", [("4b", "Qwen3-4B"), ("9b", "Qwen3-8B")])
def test_released_configs_from_shapes(size, qwen):
    """A released-size transformer, bare and under ComfyUI's prefix: detection gives back the
    shipped config, picks that klein's folder, and so names its Qwen3."""
    from ldm_cli.loading import components, convert, keymap, recipe
    from ldm_cli.loading.tensors import Checkpoint

    shipped = recipe.read_json(recipe.SHIPPED / f"flux2-klein-{size}" / "transformer" / "config.json")
    module = convert.empty("transformer", shipped)
    header = {k: tuple(v.shape) for k, v in convert.export(keymap.Slot("x", "", "flux2"), module).items()}
    for shapes in (header, {"model.diffusion_model." + k: v for k, v in header.items()}):
        found = detect.detect(Checkpoint(Path(f"flux-2-klein-{size}.safetensors"), shapes, {}))
        assert (found.family, found.variant, found.latent_channels) == ("flux2", "distilled", 32)
        assert {**found.denoiser_config, "timestep_guidance_channels": 256, "rope_theta": 2000, "eps": 1e-06} == shipped
        r = recipe.resolve(found, {}, None)
        assert components.label(r, "text_encoder") == qwen


@pytest.mark.parametrize("name, metadata, variant, told", [
    ("flux-2-klein-4b.safetensors", {"modelspec.title": "FLUX.2 [klein] Base 4B"}, "base",
     "the file's metadata (modelspec.title)"),
    ("flux-2-klein-base-4b.safetensors", {"modelspec.architecture": "flux-2-klein-4b"}, "distilled",
     "the file's metadata (modelspec.architecture)"),  # the metadata outranks the name
    ("klein_base_4b.safetensors", {}, "base", "the file's name"),
    ("klein-4b-based-on-my-photos.safetensors", {"modelspec.title": " "}, "distilled", "the file's name"),
])
def test_the_klein_variant_is_read_from_the_metadata_then_the_name(paths, tmp_path, name, metadata, variant, told):
    """ModelSpec's title or architecture, where the file has one, else the file's name; `ldm info`
    says which it went by."""
    from safetensors.torch import load_file

    save_single_file(load_file(paths["bfl"]), tmp_path / name, metadata)
    assert detect.detect(open_checkpoint(tmp_path / name, False)).variant == variant
    result = cli("info", tmp_path / name, "--json")
    assert result.exit_code == 0, result.output
    assert (json.loads(result.stdout)["variant"], json.loads(result.stdout)["variant_from"]) == (variant, told)


def test_variant_flag_outranks_the_metadata_and_the_name(paths, tmp_path):
    """--variant says the release where shapes cannot: the base defaults load, `ldm info` says it
    went by the flag, and the image records it so --from-png replays it."""
    model = loading.load(str(paths["comfy"]), options(paths, variant="base"))  # named as the distilled one
    assert (model.options["variant"], model.defaults["steps"], model.defaults["cfg"]) == ("base", 50, 4.0)
    result = cli("info", paths["comfy"], "--json", "--config", paths["configs"], "--variant", "base")
    assert result.exit_code == 0, result.output
    assert (json.loads(result.stdout)["variant"], json.loads(result.stdout)["variant_from"]) == ("base", "--variant")
    made = ["--model", paths["comfy"], "--vae", paths["vae"], "--text-encoder", paths["qwen"], "--config", paths["configs"],
            "--steps", "2", "--width", "64", "--height", "64", "--seed", "3", "--max-sequence-length", "32"]
    first = cli("generate", "a fox", *made, "--variant", "base", "--out", tmp_path / "first", "--json")
    assert first.exit_code == 0, first.output
    recorded = json.loads(first.stdout)
    assert (recorded["variant"], recorded["cfg"]) == ("base", 4.0)  # base's CFG, not distilled's 1
    again = cli("generate", "--from-png", recorded["path"], *made[:8], "--out", tmp_path / "again", "--json")
    assert again.exit_code == 0, again.output
    replayed = json.loads(again.stdout)
    assert replayed["variant"] == "base"
    assert np.array_equal(np.asarray(Image.open(replayed["path"])), np.asarray(Image.open(recorded["path"])))


def test_a_variant_the_family_lacks_is_one_line_listing_those_it_has(paths, tmp_path):
    name, message = "turbo", "ldm: error: --variant turbo: flux2 has distilled, base"
    generate = cli("generate", "a fox", "--model", paths["comfy"], "--vae", paths["vae"], "--text-encoder",
                   paths["qwen"], "--config", paths["configs"], "--variant", name, "--out", tmp_path / "out")
    info = cli("info", paths["comfy"], "--variant", name)
    for result in (generate, info):
        assert result.exit_code == 2 and result.stderr.splitlines() == [message]
    assert not (tmp_path / "out").exists()


# -- ComfyUI's mixed-precision float8 ---------------------------------------------------------------
def mixed_fp8(state: dict, header: bool) -> tuple[dict, dict, dict]:
    """(a `*_fp8_mixed` file's tensors: every other double block's matrices float8 of weight / scale
    with a 0-dim `.weight_scale`, an unused `.input_scale` and, unless `header`, a `.comfy_quant`
    naming the format; its metadata (the header's `_quantization_metadata` when `header`); the
    weights it holds, dequantized)."""
    stored, held, layers = {}, {}, {}
    for key, w in state.items():
        if w.dim() == 2 and key.endswith(".weight") and ".double_blocks.0." in key:
            layer, scale = key.removesuffix(".weight"), w.float().abs().max() / 448
            stored[key], stored[layer + ".weight_scale"] = (w.float() / scale).to(torch.float8_e4m3fn), scale
            stored[layer + ".input_scale"] = torch.tensor(1.0)
            if not header:
                stored[layer + ".comfy_quant"] = torch.tensor(list(b'{"format": "float8_e4m3fn"}'), dtype=torch.uint8)
            layers[layer] = {"format": "float8_e4m3fn"}
            held[key] = stored[key].float() * scale
        else:
            stored[key], held[key] = w, w.float()
    metadata = {"_quantization_metadata": json.dumps({"format_version": "1.0", "layers": layers})} if header else {}
    return stored, metadata, held


@pytest.mark.parametrize("header", [False, True])
def test_a_mixed_precision_fp8_transformer_renders_its_dequantized_weights(paths, tmp_path, header):
    """Each float8 layer is multiplied by its weight_scale as read: the same image as a file of the
    weights it holds, dequantized; `ldm info` names the storage."""
    from safetensors.torch import load_file

    stored, metadata, held = mixed_fp8(load_file(paths["comfy"]), header)
    mixed, plain = tmp_path / "flux-2-klein-4b-fp8mixed.safetensors", tmp_path / "flux-2-klein-4b-held.safetensors"
    save_single_file(stored, mixed, metadata)
    save_single_file(held, plain, {})
    ours, ref = loading.load(str(mixed), options(paths)), loading.load(str(plain), options(paths))
    mine, theirs = ours.denoiser.state_dict(), ref.denoiser.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    assert ours.denoiser.transformer_blocks[0].attn.to_q.weight.abs().max() < 10  # scaled: stored values reach 448
    assert np.array_equal(image(ours), image(ref))
    result = cli("info", mixed, "--json", "--config", paths["configs"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["storage"]["transformer"] == (
        "bf16 mixed precision (float8_e4m3fn layers, comfy_quant)")


def test_a_mixed_precision_format_ldm_cannot_dequantize_is_one_line(paths, tmp_path):
    from safetensors.torch import load_file

    stored, _, _ = mixed_fp8(load_file(paths["comfy"]), False)
    marks = [k for k in stored if k.endswith(".comfy_quant")]
    stored[marks[0]] = torch.tensor(list(b'{"format": "nvfp4"}'), dtype=torch.uint8)
    save_single_file(stored, tmp_path / "flux-2-klein-4b-nvfp4.safetensors", {})
    result = cli("generate", "a fox", "--model", tmp_path / "flux-2-klein-4b-nvfp4.safetensors", "--vae", paths["vae"],
                 "--text-encoder", paths["qwen"], "--config", paths["configs"], "--out", tmp_path / "out")
    assert result.exit_code == 2 and not (tmp_path / "out").exists()
    assert result.stderr.splitlines() == [
        f"ldm: error: flux-2-klein-4b-nvfp4.safetensors stores {marks[0].removesuffix('.comfy_quant')!r} (and 0 more "
        "layers) in ComfyUI's nvfp4 format, which ldm cannot dequantize; use its fp8, fp8_scaled or bf16 file"]


# -- GGUF ---------------------------------------------------------------------------------------------
def test_a_gguf_q8_0_transformer_stays_quantized(paths, tmp_path):
    """A city96/unsloth-style .gguf of the klein transformer (BFL's names, bare): each Linear stays
    Q8_0 (fused q/k/v and the single blocks' q/k/v+MLP split in whole blocks) and dequantizes as
    it runs; the image is that of the weights the gguf package's own code dequantizes, read from
    a plain file of them (within 2/255: fp16 block scales round differently)."""
    from diffusers.quantizers.gguf.utils import GGUFLinear
    from safetensors.torch import load_file

    from tests.test_flux_files import q8_where_possible, write_gguf

    held = write_gguf(tmp_path / "flux-2-klein-4b-Q8_0.gguf", load_file(paths["bfl"]), q8_where_possible)
    save_single_file(held, tmp_path / "flux-2-klein-4b-held.safetensors", {})
    fp32 = replace(options(paths), dtype="fp32")  # bf16 would round the two paths' sums differently
    ours = loading.load(str(tmp_path / "flux-2-klein-4b-Q8_0.gguf"), fp32)
    ref = loading.load(str(tmp_path / "flux-2-klein-4b-held.safetensors"), fp32)
    assert (ours.family.name, ours.options["variant"]) == ("flux2", "distilled")
    assert isinstance(ours.denoiser.transformer_blocks[0].attn.to_q, GGUFLinear)
    assert isinstance(ours.denoiser.single_transformer_blocks[0].attn.to_qkv_mlp_proj, GGUFLinear)
    mine, theirs = image(ours), image(ref)
    assert np.abs(mine - theirs).max() <= 2 and mine.std() > 1
    result = cli("info", tmp_path / "flux-2-klein-4b-Q8_0.gguf", "--json", "--config", paths["configs"])
    assert result.exit_code == 0, result.output
    assert (json.loads(result.stdout)["family"], json.loads(result.stdout)["storage"]["transformer"]) == ("flux2", "Q8_0")
