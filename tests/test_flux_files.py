"""FLUX.1 dev and schnell from the files people download: Black Forest Labs' transformer-only
file with CLIP-L, T5 and ae given as component files, ComfyUI's all-in-one file, float8, ComfyUI's
scaled float8 and GGUF (city96's Q8_0 and K-quants, the transformer and T5); `ldm info`; bad
input refused in one line.

The oracle for the layout is diffusers' own FLUX converter, on a 3072-wide shape set (it assumes
that width). Then each way of giving the same weights renders the very image of the diffusers
folder (float files), or of the same weights dequantized, here by the gguf package's own numpy
code rather than diffusers' torch code ldm runs (GGUF: within 2/255, as fp16 block scales round).
"""
import json
import re
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ldm_cli import loading, pipeline
from ldm_cli.cli import app
from ldm_cli.errors import LdmError
from ldm_cli.loading import LoadOptions, convert, detect, keymap, plan, quantized, recipe
from ldm_cli.loading.tensors import Checkpoint
from ldm_cli.settings import Settings
from tests import original_layout, tiny_models

BARE = keymap.Slot("transformer", "", "flux")  # Black Forest Labs' and city96's files: no prefix


@pytest.fixture(scope="module")
def made(tmp_path_factory, flux_dev_folder, flux_schnell_folder):
    """variant -> {name: path}: the folder and the files written from it."""
    root, cache, folders = tmp_path_factory.mktemp("fluxfiles"), {}, {"dev": flux_dev_folder, "schnell": flux_schnell_folder}

    def get(variant: str) -> dict[str, Path]:
        if variant not in cache:
            cache[variant] = write_all(root / variant, folders[variant])
        return cache[variant]
    return get


def write_all(out: Path, folder: Path) -> dict[str, Path]:
    out.mkdir()
    transformer, vae, clip_l, t5 = original_layout.components(folder, "flux")
    file = original_layout.component_file
    projection = {"text_projection.weight": torch.randn(tiny_models.CLIP_L, tiny_models.CLIP_L)}  # never applied
    paths = {"folder": folder, "transformer": file(transformer, "flux", out / "flux1.safetensors", dtype=torch.bfloat16),
             "vae": file(vae, "vae", out / "ae.safetensors"),
             "clip_l": file(clip_l, "clip", out / "clip_l.safetensors", extra=projection),
             "t5": file(t5, "t5", out / "t5xxl_fp16.safetensors", dtype=torch.float16),
             "all_in_one": original_layout.write(folder, out / "flux1-comfy.safetensors", "flux", dtype=torch.bfloat16)}
    configs = out / "configs"  # the folder's configs but the transformer's: that one is read from the shapes
    shutil.copytree(folder, configs, ignore=shutil.ignore_patterns("*.safetensors", "transformer"))
    paths["configs"] = configs
    return paths


def parts(paths: dict[str, Path], *names: str, config: str = "folder", vae: bool = True) -> LoadOptions:
    return LoadOptions(config=str(paths[config]), vae=str(paths["vae"]) if vae else None,
                       text_encoders=[str(paths[n]) for n in names])


def modules(model) -> list:
    return [model.denoiser, model.vae, *model.text_encoders]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def image(model, steps: int = 2) -> np.ndarray:
    s = Settings(prompt="a red fox in snow", steps=steps, seed=3, width=64, height=64).resolve(model.defaults, model.native_size)
    return np.asarray(pipeline.text_to_image(model, [s])[0]).astype(int)


def reference(paths: dict[str, Path]):
    """The folder's model, each weight in memory of its own: from_pretrained leaves them views into
    the mapped file, off the alignment CPU kernels like best, which moves results by an ulp."""
    model = loading.load(str(paths["folder"]))
    for module in modules(model):
        for p in module.parameters():
            p.data = p.data.clone()
    return model


def rounded(module: torch.nn.Module, dtype: torch.dtype) -> None:
    """`module`'s weights as a file that stores them in `dtype` holds them."""
    for p in module.parameters():
        p.data = p.data.to(dtype).float()


# -- the oracle: diffusers' converter reads our layout, at the width it assumes -----------------------
RELEASED = {"_class_name": "FluxTransformer2DModel", "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
            "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
            "pooled_projection_dim": 768, "axes_dims_rope": [16, 56, 56]}


def test_keymap_agrees_with_diffusers_converter():
    """3072 wide (diffusers' converter assumes it), two blocks of each kind; each weight kept to
    three columns so the test stays small: only the rows say where a weight goes."""
    from types import SimpleNamespace

    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers

    config = {**RELEASED, "num_layers": 2, "num_single_layers": 2, "guidance_embeds": True}
    generator = torch.Generator().manual_seed(0)
    state = {k: torch.randn(v.shape[0], *([3] if v.dim() > 1 else []), generator=generator)
             for k, v in convert.empty("transformer", config).state_dict().items()}
    original = convert.export(keymap.FLUX, SimpleNamespace(config=config, state_dict=lambda: state))
    assert "model.diffusion_model.single_blocks.1.linear1.weight" in original
    theirs = convert_flux_transformer_checkpoint_to_diffusers(dict(original))
    assert theirs.keys() == state.keys() and all(torch.equal(theirs[k], state[k]) for k in state)


# -- variant and config from the tensors alone -----------------------------------------------------
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_released_variants_and_configs_from_shapes(variant):
    shipped = recipe.read_json(recipe.SHIPPED / f"flux-{variant}" / "transformer" / "config.json")
    header = {k: tuple(v.shape) for k, v in convert.export(BARE, convert.empty("transformer", shipped)).items()}
    assert header["img_in.weight"] == (3072, 64) and ("guidance_in.in_layer.weight" in header) == (variant == "dev")
    for shapes in (header, {"model.diffusion_model." + k: v for k, v in header.items()}):
        found = detect.detect(Checkpoint(Path("flux1.safetensors"), shapes, {}))
        assert (found.family, found.variant, found.latent_channels) == ("flux", variant, 16)
        assert found.denoiser_config == shipped


@pytest.mark.parametrize("width", [2, 5])  # 32 and 80 wide: neither the released 3072 nor each other
def test_any_width_is_read_from_the_shapes(width):
    transformer = tiny_models.flux_transformer("schnell")
    config = {**transformer.config, "_class_name": "FluxTransformer2DModel", "num_attention_heads": width, "num_single_layers": 3}
    shapes = {k: tuple(v.shape) for k, v in convert.export(BARE, convert.empty("transformer", config)).items()}
    found = detect.detect(Checkpoint(Path("x.safetensors"), shapes, {}))
    same = ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads", "joint_attention_dim",
            "pooled_projection_dim", "in_channels", "guidance_embeds")
    assert {k: found.denoiser_config[k] for k in same} == {k: config[k] for k in same}
    assert tuple(found.denoiser_config["axes_dims_rope"]) == tuple(config["axes_dims_rope"])  # 16-wide heads: (4, 6, 6)


# -- ldm: every layout gives the folder's weights and image ------------------------------------------
@pytest.mark.parametrize("variant", ["dev", "schnell"])
def test_bfl_file_with_component_files_is_the_folder(made, variant):
    paths = made(variant)
    ours = loading.load(str(paths["transformer"]), parts(paths, "t5", "clip_l", config="configs"))  # any order
    ref = reference(paths)
    rounded(ref.denoiser, torch.bfloat16)
    rounded(ref.text_encoders[1], torch.float16)
    for a, b in zip(modules(ours), modules(ref)):
        assert_same_weights(a, b)
    assert ours.options["variant"] == variant and ours.family.name == "flux" and ours.size_multiple == 16
    assert ours.defaults["steps"] == {"dev": 28, "schnell": 4}[variant]
    assert ours.modules == ["ae", "t5xxl_fp16", "clip_l"]
    assert np.array_equal(image(ours), image(ref))


def test_comfyui_all_in_one_file_is_the_folder(made):
    paths = made("dev")
    ours = loading.load(str(paths["all_in_one"]), LoadOptions(config=str(paths["folder"])))
    ref = reference(paths)
    for module in modules(ref):
        rounded(module, torch.bfloat16)
    for a, b in zip(modules(ours), modules(ref)):
        assert_same_weights(a, b)
    assert np.array_equal(image(ours), image(ref))


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2])
def test_float8_transformer_is_upcast(made, tmp_path, dtype):
    paths = made("schnell")
    transformer = original_layout.component(paths["folder"], "transformer")
    file = original_layout.component_file(transformer, "flux", tmp_path / "flux1-fp8.safetensors", dtype=dtype)
    ours = loading.load(str(file), parts(paths, "clip_l", "t5"))
    ref = reference(paths)
    rounded(ref.denoiser, dtype)
    rounded(ref.text_encoders[1], torch.float16)
    assert_same_weights(ours.denoiser, ref.denoiser)
    assert np.array_equal(image(ours), image(ref))


# -- ComfyUI's scaled float8 -------------------------------------------------------------------------
def scaled_fp8(state: dict[str, torch.Tensor], prefix: str) -> tuple[dict, dict]:
    """(the file: each matrix stored as float8 of weight / scale with its `.scale_weight`, plus the
    `scaled_fp8` marker and some unused `.scale_input`s; the weights it holds, dequantized)."""
    stored, held = {prefix + "scaled_fp8": torch.empty(0, dtype=torch.float8_e4m3fn)}, {}
    for key, w in state.items():
        if w.dim() == 2 and key.endswith(".weight"):
            scale = w.abs().max().float() / 448  # e4m3fn's largest value: weights stored far from their size
            stored[key], stored[key[:-6] + "scale_weight"] = (w / scale).to(torch.float8_e4m3fn), scale
            stored[key[:-6] + "scale_input"] = torch.tensor(1.0)
            held[key] = stored[key].float() * scale
        else:
            stored[key] = held[key] = w
    return stored, held


def test_scaled_float8_multiplies_each_weight_by_its_scale(made, tmp_path):
    paths = made("dev")
    transformer = original_layout.component(paths["folder"], "transformer")
    t5 = original_layout.component(paths["folder"], "text_encoder_2")
    files = {}
    for name, module, kind in (("flux1-dev-fp8-scaled", transformer, "flux"), ("t5xxl_fp8_e4m3fn_scaled", t5, "t5")):
        stored, held = scaled_fp8(convert.export(keymap.Slot("x", "", kind), module), "")
        convert.save_single_file(stored, tmp_path / f"{name}.safetensors", {})
        files[name] = (tmp_path / f"{name}.safetensors", held)
    ours = loading.load(str(files["flux1-dev-fp8-scaled"][0]), LoadOptions(
        config=str(paths["folder"]), vae=str(paths["vae"]),
        text_encoders=[str(paths["clip_l"]), str(files["t5xxl_fp8_e4m3fn_scaled"][0])]))
    ref = reference(paths)
    ref.denoiser = from_original(ref.denoiser, BARE, files["flux1-dev-fp8-scaled"][1])
    ref.text_encoders[1] = from_original(ref.text_encoders[1], keymap.Slot("text_encoder_2", "", "t5"),
                                         files["t5xxl_fp8_e4m3fn_scaled"][1])
    assert_same_weights(ours.denoiser, ref.denoiser)
    assert_same_weights(ours.text_encoders[1], ref.text_encoders[1])
    assert ours.denoiser.x_embedder.weight.abs().max() < 1  # the scale applied: stored values reach 448
    assert np.array_equal(image(ours), image(ref))


def from_original(like: torch.nn.Module, slot: keymap.Slot, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """`like`'s class holding `state` (original layout, float32), placed by the keymap the
    converter test checks."""
    module = convert.empty(slot.name, like.config.to_dict() if hasattr(like.config, "to_dict") else dict(like.config))
    return convert.fill(module, plan.for_module(slot, module, Checkpoint(Path("x"), {k: tuple(v.shape) for k, v in state.items()}, {})),
                        state).eval()


# -- GGUF -------------------------------------------------------------------------------------------
def write_gguf(path: Path, state: dict[str, torch.Tensor], kind) -> dict[str, torch.Tensor]:
    """A .gguf file of `state`, each matrix quantized as kind(key, tensor) says (None: float32), and
    the weights it holds as the gguf package's numpy code dequantizes them."""
    import gguf

    writer, held = gguf.GGUFWriter(str(path), "flux"), {}
    for key, t in state.items():
        array = t.float().numpy()
        quant = kind(key, t) if t.dim() == 2 else None
        if quant is None:
            writer.add_tensor(key, array)
            held[key] = t.float()
            continue
        blocks = gguf.quants.quantize(array, quant) if quant.name in ("Q8_0", "Q5_0") else random_blocks(array, quant)
        writer.add_tensor(key, blocks, raw_dtype=quant)
        if quant != gguf.GGMLQuantizationType.Q8_1:  # which gguf does not dequantize either
            held[key] = torch.from_numpy(gguf.quants.dequantize(blocks, quant).copy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return held


def random_blocks(array: np.ndarray, quant) -> np.ndarray:
    """Valid blocks of random codes (the gguf package cannot quantize to K-quants), their leading
    scales set so the weights come out about the size of `array`'s."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[quant]
    rows, n = array.shape[0], array.shape[1] // block
    codes = np.random.default_rng(0).integers(0, 256, (rows, n, size), dtype=np.uint8)
    scale = np.float16(np.abs(array).max() / 1000)
    codes[..., :4] = np.frombuffer(np.array([scale, scale], np.float16).tobytes(), np.uint8)  # d and dmin first
    return codes.reshape(rows, n * size)


def q8_where_possible(key: str, t: torch.Tensor):
    import gguf

    return gguf.GGMLQuantizationType.Q8_0 if t.shape[1] % 32 == 0 else None


def t5_gguf_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Hugging Face T5 encoder's weights under llama.cpp's names, as the gguf package maps them."""
    import gguf

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.T5ENCODER, 2)
    return {names.get_name(k, try_suffixes=(".weight", ".bias")): v for k, v in state.items()
            if k != "encoder.embed_tokens.weight"}


def test_gguf_q8_0_stays_quantized_and_renders_its_weights(made, tmp_path):
    from diffusers.quantizers.gguf.utils import GGUFLinear, GGUFParameter

    paths = made("dev")
    folder_model = reference(paths)
    held = write_gguf(tmp_path / "flux1-dev-Q8_0.gguf", convert.export(BARE, folder_model.denoiser), q8_where_possible)
    t5_held = write_gguf(tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf", t5_gguf_names(folder_model.text_encoders[1].state_dict()),
                         q8_where_possible)
    ours = loading.load(str(tmp_path / "flux1-dev-Q8_0.gguf"), LoadOptions(
        config=str(paths["configs"]), vae=str(paths["vae"]),
        text_encoders=[str(tmp_path / "t5-v1_1-xxl-encoder-Q8_0.gguf"), str(paths["clip_l"])]))
    layer = ours.denoiser.transformer_blocks[0].attn.to_q
    assert isinstance(layer, GGUFLinear) and isinstance(layer.weight, GGUFParameter) and layer.weight.quant_type.name == "Q8_0"
    stored = sum(p.numel() * p.element_size() for p in ours.denoiser.parameters())
    assert stored < 0.4 * sum(p.numel() * 4 for p in folder_model.denoiser.parameters())  # ~34/128 of fp32
    assert isinstance(ours.text_encoders[1].encoder.block[0].layer[0].SelfAttention.q, GGUFLinear)
    assert ours.modules == ["ae", "t5-v1_1-xxl-encoder-Q8_0", "clip_l"]
    ref = folder_model
    ref.denoiser = from_original(ref.denoiser, BARE, held)
    ref.text_encoders[1] = from_original(ref.text_encoders[1], keymap.Slot("text_encoder_2", "", "t5_gguf"), t5_held)
    assert np.abs(image(ours) - image(ref)).max() <= 2


def test_gguf_k_quant_renders_its_weights(made, tmp_path):
    import gguf
    from diffusers.quantizers.gguf.utils import dequantize_gguf_tensor

    paths = made("schnell")
    ref = reference(paths)
    types = {256: gguf.GGMLQuantizationType.Q4_K, 96: gguf.GGMLQuantizationType.Q5_0}  # K-quants need 256 columns
    mixed = lambda key, t: types.get(t.shape[1], q8_where_possible(key, t))  # noqa: E731 - as city96's mixed files
    held = write_gguf(tmp_path / "flux1-schnell-Q4_K_S.gguf", convert.export(BARE, ref.denoiser), mixed)
    ours = loading.load(str(tmp_path / "flux1-schnell-Q4_K_S.gguf"), parts(paths, "clip_l", "t5", config="configs"))
    weight = ours.denoiser.time_text_embed.timestep_embedder.linear_1.weight
    assert weight.quant_type.name == "Q4_K" and weight.shape[1] < 256  # blocks of 144 bytes per 256 weights
    expected = held["time_in.in_layer.weight"]  # diffusers dequantizes in fp16: within its rounding
    assert (dequantize_gguf_tensor(weight).float() - expected).abs().max() <= 2e-3 * expected.abs().max()
    ref.denoiser = from_original(ref.denoiser, BARE, held)
    assert np.abs(image(ours) - image(ref)).max() <= 2


@pytest.mark.parametrize("name", sorted(quantized.SCALE_OFFSETS))
def test_a_nan_gguf_scale_is_found_where_gguf_reads_it(name):
    """The table of scale offsets against the gguf package's own dequantizer: with those bytes
    finite every weight is, and a NaN in any of them is found."""
    import gguf

    quant = gguf.GGMLQuantizationType[name]
    size = gguf.GGML_QUANT_SIZES[quant][1]
    codes = np.random.default_rng(0).integers(0, 256, (4, 3, size), dtype=np.uint8)
    for offset in quantized.SCALE_OFFSETS[name]:
        codes[..., offset:offset + 2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
    checkpoint = SimpleNamespace(name="x.gguf", dtypes={"w": name})
    assert np.isfinite(gguf.quants.dequantize(codes.reshape(4, -1), quant)).all()
    quantized.check_scales(checkpoint, "w", torch.from_numpy(codes.reshape(4, -1)))
    for offset in quantized.SCALE_OFFSETS[name]:
        bad = codes.copy()
        bad[2, 1, offset:offset + 2] = np.frombuffer(np.float16(np.nan).tobytes(), np.uint8)
        assert np.isnan(gguf.quants.dequantize(bad.reshape(4, -1), quant)).any()
        with pytest.raises(LdmError, match="x.gguf is corrupt: its GGUF tensor 'w' has NaN or inf scales"):
            quantized.check_scales(checkpoint, "w", torch.from_numpy(bad.reshape(4, -1)))


def test_a_gguf_file_with_one_nan_scale_is_refused_at_load(made, tmp_path):
    import gguf

    paths = made("schnell")
    path = tmp_path / "flux1-schnell-Q8_0.gguf"
    write_gguf(path, convert.export(BARE, reference(paths).denoiser), q8_where_possible)
    tensor = next(t for t in gguf.GGUFReader(path).tensors if t.tensor_type.name == "Q8_0")
    data = bytearray(path.read_bytes())
    data[tensor.data_offset + 34:tensor.data_offset + 36] = np.float16(np.nan).tobytes()  # the second block's d
    path.write_bytes(bytes(data))
    result = CliRunner().invoke(app, ["generate", "a fox", "--model", str(path), "--config", str(paths["configs"]),
                                      "--text-encoder", str(paths["clip_l"]), "--text-encoder", str(paths["t5"]),
                                      "--vae", str(paths["vae"]), "--steps", "1", "-H", "64", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2, result.output
    assert result.stderr == (f"ldm: error: {path.name} is corrupt: its GGUF tensor {tensor.name!r} has NaN or inf scales, "
                             "which would make every image black; download it again\n")
    assert not (tmp_path / "o").exists()


# -- ldm info ---------------------------------------------------------------------------------------
def test_info_names_variant_storage_and_needs(made, tmp_path):
    paths, runner = made("dev"), CliRunner()
    write_gguf(tmp_path / "flux1-dev-Q8_0.gguf", convert.export(BARE, original_layout.component(paths["folder"], "transformer")),
               q8_where_possible)
    bare = json.loads(runner.invoke(app, ["info", str(paths["transformer"]), "--config", str(paths["configs"]), "--json"]).stdout)
    assert (bare["family"], bare["variant"], bare["model"], bare["native_size"]) == ("flux", "dev", "FLUX.1 dev", "1024x1024")
    assert bare["needs"] == ["vae (--vae)", "text_encoder (CLIP-L, --text-encoder)", "text_encoder_2 (T5-XXL, --text-encoder)"]
    assert bare["storage"] == {"transformer": "bf16"} and bare["prediction"] == "flow"
    quantized = json.loads(runner.invoke(app, ["info", str(tmp_path / "flux1-dev-Q8_0.gguf"), "--config",
                                               str(paths["configs"]), "--json"]).stdout)
    assert quantized["storage"] == {"transformer": "Q8_0"} and quantized["parameters_transformer"] == bare["parameters_transformer"]
    whole = json.loads(runner.invoke(app, ["info", str(paths["all_in_one"]), "--config", str(paths["folder"]), "--json"]).stdout)
    assert whole["components"] == ["transformer", "vae", "text_encoder", "text_encoder_2"] and whole["needs"] == []
    text = runner.invoke(app, ["info", str(tmp_path / "flux1-dev-Q8_0.gguf"), "--config", str(paths["configs"])]).stdout
    assert re.search(r"storage\s+transformer Q8_0", text)


# -- bad input: one line, exit 2, nothing written -------------------------------------------------
def bad_files(paths: dict[str, Path], tmp: Path, sd_vae: Path) -> dict[str, tuple[list[str], str]]:
    import gguf

    unknown = tmp / "flux1-unknown.gguf"
    write_gguf(unknown, {"img_in.weight": torch.randn(4, 32)}, q8_where_possible)
    data = bytearray(unknown.read_bytes())
    at = data.index(b"img_in.weight") + len(b"img_in.weight") + 4 + 2 * 8  # name, n_dims, two dims: the type
    data[at:at + 4] = (200).to_bytes(4, "little")  # no such GGML type
    unknown.write_bytes(bytes(data))
    unreadable = tmp / "flux1-q8_1.gguf"  # a type gguf knows but no dequantizer handles
    write_gguf(unreadable, {"img_in.weight": torch.randn(4, 256)}, lambda k, t: gguf.GGMLQuantizationType.Q8_1)
    truncated = tmp / "flux1-truncated.gguf"
    truncated.write_bytes(unreadable.read_bytes()[:-100])
    clip, t5, vae = ["--text-encoder", str(paths["clip_l"])], ["--text-encoder", str(paths["t5"])], ["--vae", str(paths["vae"])]
    model = ["--model", str(paths["transformer"])]
    return {
        "no CLIP-L": ([*model, *t5, *vae], "no CLIP-L text encoder; pass its file with --text-encoder"),
        "no T5": ([*model, *clip, *vae], "no T5-XXL text encoder; pass its file with --text-encoder"),
        "no VAE": ([*model, *clip, *t5], "no VAE; pass one with --vae \\(e.g. ae.safetensors\\)"),
        "a 4-channel VAE": ([*model, *clip, *t5, "--vae", str(sd_vae)], "4-channel VAE.*16-channel"),
        "a size not a multiple of 16": ([*model, *clip, *t5, *vae, "-W", "72"], "16"),
        "an unknown GGUF type": (["--model", str(unknown), *clip, *t5, *vae], "GGUF quantization type the installed gguf"),
        "a GGUF type without a dequantizer": (["--model", str(unreadable), *clip, *t5, *vae], "Q8_1, which ldm cannot dequantize"),
        "a truncated GGUF file": (["--model", str(truncated), *clip, *t5, *vae], "truncated or corrupt"),
    }


def test_bad_input_is_one_line(made, tmp_path):
    paths = made("dev")
    sd_vae = original_layout.component_file(tiny_models.vae(), "vae", tmp_path / "sd_vae.safetensors")
    for case, (flags, message) in bad_files(paths, tmp_path, sd_vae).items():
        out = tmp_path / "out" / case.replace(" ", "_")
        result = CliRunner().invoke(app, ["generate", "a fox", "--config", str(paths["configs"]), *flags,
                                          "--steps", "1", "-H", "64", "--out", str(out)])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, (case, result.output)
        assert len(lines) == 1 and lines[0].startswith("ldm: error: "), (case, lines)
        assert re.search(message, lines[0]), (case, lines[0])
        assert not out.exists(), case


def test_a_fill_model_is_named_not_misread():
    transformer = tiny_models.flux_transformer("dev")
    shapes = {k: tuple(v.shape) for k, v in convert.export(BARE, transformer).items()}
    shapes["img_in.weight"] = (shapes["img_in.weight"][0], 384)  # FLUX Fill: image, mask and masked image in
    with pytest.raises(LdmError, match="384 input channels for 64 out .FLUX Fill"):
        detect.detect(Checkpoint(Path("flux1-fill-dev.safetensors"), shapes, {}))
