"""SD3 and SD3.5 from the files people download: Stability's single files (text encoders bundled
or not), ComfyUI-style component files (clip_l, clip_g, t5xxl in fp16 or float8, a VAE), each
recognised by its tensors; `ldm info`; and every bad input refused in one line.

The oracle for the layout is diffusers' own converter and from_single_file: they read the files
written here back into exactly the weights they came from. Then ldm: each way of giving the
same weights loads them exactly and renders the very image of the diffusers folder.
"""
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ldm_cli import loading, pipeline
from ldm_cli.cli import app
from ldm_cli.errors import LdmError
from ldm_cli.loading import LoadOptions, convert, detect, keymap, mmdit
from ldm_cli.loading.tensors import Checkpoint
from ldm_cli.settings import Settings
from tests import original_layout, tiny_models

VARIANTS = ["sd3", "sd35-medium"]


def tiny_folder(root: Path, variant: str) -> Path:
    """A tiny SD3 diffusers folder whose CLIP-L projection is the identity, as SD3 uses CLIP-L."""
    folder = root / f"tiny-{variant}"
    if not (folder / "model_index.json").exists():
        pipe = tiny_models.sd3_pipeline(variant)
        with torch.no_grad():
            pipe.text_encoder.text_projection.weight.copy_(torch.eye(tiny_models.CLIP_L))
        tiny_models.save(pipe, folder)
    return folder


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """variant -> {name: path}: the folder, the bundled single file and the component files."""
    root, cache = tmp_path_factory.mktemp("sd3files"), {}

    def get(variant: str) -> dict[str, Path]:
        if variant not in cache:
            cache[variant] = write_all(root / variant, tiny_folder(root, variant))
        return cache[variant]
    return get


def write_all(out: Path, folder: Path) -> dict[str, Path]:
    out.mkdir()
    transformer, vae, clip_l, clip_g, t5 = original_layout.components(folder, "sd3")
    paths = {"folder": folder, "bundled": original_layout.write(folder, out / "sd3_incl_clips_t5.safetensors", "sd3")}
    file = original_layout.component_file
    paths["transformer"] = file(transformer, "mmdit", out / "sd3_transformer.safetensors", prefix=keymap.MMDIT.prefix)
    paths["vae"] = file(vae, "vae", out / "vae.safetensors")
    # ComfyUI's clip_l carries OpenAI's projection, which SD3 never applies
    projection = {"text_projection.weight": torch.randn(tiny_models.CLIP_L, tiny_models.CLIP_L)}
    paths["clip_l"] = file(clip_l, "clip", out / "clip_l.safetensors", extra=projection)
    paths["clip_g"] = file(clip_g, "clip", out / "clip_g.safetensors")
    paths["t5"] = file(t5, "t5", out / "t5xxl_fp32.safetensors")
    paths["t5_fp16"] = file(t5, "t5", out / "t5xxl_fp16.safetensors", dtype=torch.float16)
    paths["t5_fp8"] = file(t5, "t5", out / "t5xxl_fp8_e4m3fn.safetensors", dtype=torch.float8_e4m3fn)
    paths["t5_e5m2"] = file(t5, "t5", out / "t5xxl_fp8_e5m2.safetensors", dtype=torch.float8_e5m2)
    return paths


def with_parts(paths: dict[str, Path], *names: str, vae: bool = True) -> LoadOptions:
    return LoadOptions(config=str(paths["folder"]), vae=str(paths["vae"]) if vae else None,
                       text_encoders=[str(paths[n]) for n in names])


def modules(model) -> list:
    return [model.denoiser, model.vae, *model.text_encoders]


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def image(model, scheduler: str = "euler") -> np.ndarray:
    s = Settings(prompt="a red fox in snow", negative="blurry", steps=2, cfg=5.0, seed=3, width=64, height=64,
                 scheduler=scheduler).resolve(model.defaults, model.native_size)
    return np.asarray(pipeline.text_to_image(model, [s])[0])


# -- the oracle: diffusers reads the written files as Stability's layout ------------------------------
@pytest.mark.parametrize("variant", ["sd3", "sd35-medium", "sd35-large"])
def test_keymap_agrees_with_diffusers_converter(variant):
    from diffusers.loaders.single_file_utils import convert_sd3_transformer_checkpoint_to_diffusers

    transformer = tiny_models.sd3_transformer(variant)
    original = convert.export(keymap.MMDIT, transformer)
    theirs = convert_sd3_transformer_checkpoint_to_diffusers(dict(original))
    assert_same_weights(transformer, _module_of(transformer, theirs))


def _module_of(like: torch.nn.Module, state: dict) -> torch.nn.Module:
    module = type(like).from_config(like.config)
    module.load_state_dict(state, strict=True)
    return module


def test_diffusers_reads_the_bundled_file_back(made):
    from diffusers import StableDiffusion3Pipeline

    paths = made("sd35-medium")
    theirs = StableDiffusion3Pipeline.from_single_file(str(paths["bundled"]), config=str(paths["folder"]),
                                                       local_files_only=True)
    for slot, ours in zip(keymap.LAYOUTS["sd3"], original_layout.components(paths["folder"], "sd3")):
        mine, other = ours.state_dict(), getattr(theirs, slot.name).state_dict()
        # diffusers leaves T5's copy of `shared` (encoder.embed_tokens) unfilled under transformers 5
        unfilled = {k for k, v in other.items() if v.is_meta}
        assert unfilled <= {"encoder.embed_tokens.weight"} and mine.keys() == other.keys()
        assert all(torch.equal(mine[k], other[k]) for k in mine.keys() - unfilled), slot.name


# -- family, variant and config from the tensors alone ---------------------------------------------
# the released files' transformer configs (diffusers' hub folders); the headers are built from them
RELEASED = {
    "sd3": {"num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24, "caption_projection_dim": 1536,
            "pos_embed_max_size": 192, "dual_attention_layers": (), "qk_norm": None},
    "sd35-medium": {"num_layers": 24, "attention_head_dim": 64, "num_attention_heads": 24,
                    "caption_projection_dim": 1536, "pos_embed_max_size": 384,
                    "dual_attention_layers": tuple(range(13)), "qk_norm": "rms_norm"},
    "sd35-large": {"num_layers": 38, "attention_head_dim": 64, "num_attention_heads": 38,
                   "caption_projection_dim": 2432, "pos_embed_max_size": 192, "dual_attention_layers": (),
                   "qk_norm": "rms_norm"},
}
COMMON = {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "joint_attention_dim": 4096,
          "pooled_projection_dim": 2048}


def released_header(variant: str) -> Checkpoint:
    """The header of a released file (transformer only), from its config on the meta device."""
    config = {"_class_name": "SD3Transformer2DModel", **COMMON, **RELEASED[variant]}
    state = convert.export(keymap.MMDIT, convert.empty("transformer", config))
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    return Checkpoint(Path(f"{variant}.safetensors"), shapes, dict.fromkeys(shapes, "F16"))


@pytest.mark.parametrize("variant", list(RELEASED))
def test_released_variants_and_configs_from_shapes(variant):
    checkpoint = released_header(variant)
    assert checkpoint.shapes["model.diffusion_model.x_embedder.proj.weight"] == (RELEASED[variant]["num_layers"] * 64, 16, 2, 2)
    found = detect.detect(checkpoint)
    assert (found.family, found.variant, found.in_channels, found.latent_channels) == ("sd3", variant, 16, 16)
    assert {k: v for k, v in found.denoiser_config.items() if k != "_class_name"} == {**COMMON, **RELEASED[variant]}
    bare = Checkpoint(checkpoint.path, {k.removeprefix("model.diffusion_model."): v for k, v in checkpoint.shapes.items()}, {})
    assert detect.detect(bare).variant == variant  # the transformer's keys alone, as diffusers also reads them


@pytest.mark.parametrize("variant", ["sd3", "sd35-medium", "sd35-large"])
def test_tiny_models_are_told_apart_like_real_ones(variant):
    transformer = tiny_models.sd3_transformer(variant)
    shapes = {k: tuple(v.shape) for k, v in convert.export(keymap.MMDIT, transformer).items()}
    assert mmdit.variant(shapes, keymap.MMDIT.prefix) == variant
    config = mmdit.config(shapes, keymap.MMDIT.prefix)
    expected = dict(transformer.config)
    if variant == "sd3":  # without q/k norms the heads are the MMDiT's rule: as many as layers
        assert config["num_attention_heads"] == config["num_layers"]
        expected.update(num_attention_heads=2, attention_head_dim=16)
    same = ("num_layers", "attention_head_dim", "num_attention_heads", "caption_projection_dim", "pos_embed_max_size",
            "joint_attention_dim", "pooled_projection_dim", "patch_size", "in_channels", "out_channels", "qk_norm")
    assert {k: config[k] for k in same} == {k: expected[k] for k in same}
    assert list(config["dual_attention_layers"]) == list(expected["dual_attention_layers"])


# -- ldm: every layout gives the folder's weights and image ------------------------------------------
@pytest.mark.parametrize("variant", VARIANTS)
def test_bundled_single_file_is_the_folder(made, variant):
    paths = made(variant)
    ours, ref = loading.load(str(paths["bundled"]), LoadOptions(config=str(paths["folder"]))), loading.load(str(paths["folder"]))
    assert ours.options["variant"] == variant and ours.family.name == "sd3"
    for a, b in zip(modules(ours), modules(ref)):
        assert_same_weights(a, b)
    assert torch.equal(ours.text_encoders[0].text_projection.weight, torch.eye(tiny_models.CLIP_L))
    for t, u in zip(ours.tokenizers, ref.tokenizers):  # CLIP-G's "!" padding and T5's own included
        assert type(t) is type(u) and t("a fox", padding="max_length").input_ids == u("a fox", padding="max_length").input_ids
    assert ours.defaults["steps"] == 28 and ours.defaults["scheduler"] == "euler"
    for scheduler in ("euler", "dpmpp_2m"):
        assert np.array_equal(image(ours, scheduler), image(ref, scheduler))


def test_component_files_are_the_folder(made):
    paths = made("sd35-medium")
    ours = loading.load(str(paths["transformer"]), with_parts(paths, "t5", "clip_g", "clip_l"))  # any order
    ref = loading.load(str(paths["folder"]))
    for a, b in zip(modules(ours), modules(ref)):
        assert_same_weights(a, b)
    assert ours.modules == ["vae", "t5xxl_fp32", "clip_g", "clip_l"]  # Forge's Module 1, 2, ...
    assert np.array_equal(image(ours, "heun"), image(ref, "heun"))


@pytest.mark.parametrize("name, dtype", [("t5_fp16", torch.float16), ("t5_fp8", torch.float8_e4m3fn),
                                         ("t5_e5m2", torch.float8_e5m2)])
def test_t5_stored_small_is_upcast(made, name, dtype):
    """fp16 and float8 T5 files (ComfyUI's, holding `shared` alone) load, upcast to the compute dtype."""
    paths = made("sd3")
    model = loading.load(str(paths["transformer"]), with_parts(paths, "clip_l", "clip_g", name))
    t5, ref = model.text_encoders[2], loading.load(str(paths["folder"])).text_encoders[2]
    assert t5.shared.weight is t5.encoder.embed_tokens.weight  # tied again, one tensor
    for key, value in ref.state_dict().items():
        assert torch.equal(t5.state_dict()[key], value.to(dtype).float()), key
    assert image(model).shape == (64, 64, 3)


def test_without_t5_the_model_runs_with_zeros(made, capsys):
    paths = made("sd3")
    model = loading.load(str(paths["transformer"]), with_parts(paths, "clip_l", "clip_g"))
    assert model.text_encoders[2] is None and model.tokenizers[2] is None and model.defaults["no_t5"]
    assert "no T5-XXL text encoder" in capsys.readouterr().err
    assert image(model).shape == (64, 64, 3)


def test_no_t5_for_a_whole_run_reads_no_t5(made, tmp_path, monkeypatch):
    """`--no-t5` on every image: T5's weights are not read (nor its absence noted), from a
    folder, a bundled file or a --text-encoder file; the image is the one drawn with T5 loaded."""
    from PIL import Image

    paths, seen = made("sd3"), []
    real = loading.load
    monkeypatch.setattr(loading, "load", lambda *a, **k: seen.append(real(*a, **k)) or seen[-1])
    common = ["--steps", "2", "--seed", "3", "-W", "64", "-H", "64", "--no-t5", "--json"]
    runs = {"folder": ["--model", paths["folder"]], "bundled": ["--model", paths["bundled"], "--config", paths["folder"]],
            "parts": ["--model", paths["transformer"], "--vae", paths["vae"], "--config", paths["folder"],
                      *[x for n in ("clip_l", "clip_g", "t5") for x in ("--text-encoder", paths[n])]]}
    pictures = {}
    for name, flags in runs.items():
        result = CliRunner().invoke(app, ["generate", "a fox", *map(str, flags), *common, "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert "T5" not in result.stderr  # nothing to say: the user asked for no T5
        assert seen[-1].defaults["no_t5"] and seen[-1].tokenizers[2] is None
        pictures[name] = np.asarray(Image.open(next((tmp_path / name).glob("*.png"))))
    full = loading.load(str(paths["folder"]))
    s = Settings(prompt="a fox", steps=2, seed=3, width=64, height=64, no_t5=True).resolve(full.defaults, full.native_size)
    alone = np.asarray(pipeline.text_to_image(full, [s])[0])
    assert all(np.array_equal(alone, picture) for picture in pictures.values())
    prompts = tmp_path / "p.txt"
    for text, t5_read in (('--prompt "a fox" --no_t5 true\n--prompt "a cat" --no_t5 true\n', False),
                          ('--prompt "a fox" --no_t5 true\na cat\n', True)):  # one line wants T5: it is read
        prompts.write_text(text)
        result = CliRunner().invoke(app, ["batch", str(prompts), "--model", str(paths["folder"]), "--steps", "1",
                                          "-W", "64", "-H", "64", "--out", str(tmp_path / f"b{t5_read}"), "--quiet"])
        assert result.exit_code == 0, result.output
        assert (seen[-1].tokenizers[2] is not None) == t5_read


def test_a_missing_part_names_its_flag(made):
    paths = made("sd3")
    with pytest.raises(LdmError, match="no CLIP-G text encoder; pass its file with --text-encoder"):
        loading.load(str(paths["transformer"]), with_parts(paths, "clip_l", "t5"))
    with pytest.raises(LdmError, match="no VAE; pass one with --vae"):
        loading.load(str(paths["transformer"]), with_parts(paths, "clip_l", "clip_g", vae=False))


# -- bad input: one line, exit 2, nothing written -------------------------------------------------
def bad_files(paths: dict[str, Path], tmp: Path, sd1_file: Path) -> dict[str, tuple[list[str], str]]:
    truncated = tmp / "t5_truncated.safetensors"
    truncated.write_bytes(paths["t5_fp16"].read_bytes()[:-100])
    lying = tmp / "t5_lying.safetensors"
    lying.write_bytes(lying_header(paths["t5_fp16"].read_bytes()))
    wide = original_layout.component_file(tiny_models.text_encoder(width=40), "clip", tmp / "clip_h.safetensors")
    sd_vae = original_layout.component_file(tiny_models.vae(), "vae", tmp / "sd_vae.safetensors")
    te = [arg for name in ("clip_l", "clip_g", "t5") for arg in ("--text-encoder", str(paths[name]))]
    return {
        "another family's checkpoint": ([*te, "--text-encoder", str(sd1_file)], "whole model checkpoint"),
        "a CLIP of another width": ([*te, "--text-encoder", str(wide)], "40 wide.*does not use"),
        "a VAE as text encoder": ([*te, "--text-encoder", str(paths["vae"])], "is a VAE"),
        "two T5 files": ([*te, "--text-encoder", str(paths["t5_fp8"])], "two T5-XXL text encoders"),
        "a truncated file": ([*te, "--text-encoder", str(truncated)], "truncated or corrupt"),
        "a lying header": ([*te, "--text-encoder", str(lying)], "truncated or corrupt"),
        "a 4-channel VAE": ([*te, "--vae", str(sd_vae)], "4-channel VAE.*16-channel"),
        "a size not a multiple of 16": ([*te, "-W", "72"], "16"),
    }


def lying_header(data: bytes) -> bytes:
    """The same file, its header claiming a bigger first tensor than the data holds."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["shape"] = [header[key]["shape"][0] * 4, *header[key]["shape"][1:]]
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


def test_bad_input_is_one_line(made, tmp_path, sd1_folder):
    paths = made("sd3")
    sd1_file = original_layout.write(sd1_folder, tmp_path / "sd15.safetensors", "sd1", extras=False)
    for case, (flags, message) in bad_files(paths, tmp_path, sd1_file).items():
        out = tmp_path / "out" / case.replace(" ", "_")
        result = CliRunner().invoke(app, ["generate", "a fox", "--model", str(paths["transformer"]), "--config",
                                          str(paths["folder"]), "--vae", str(paths["vae"]), *flags, "--steps", "1",
                                          "-H", "64", "--out", str(out)])
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2, (case, result.output)
        assert len(lines) == 1 and lines[0].startswith("ldm: error: "), (case, lines)
        assert re.search(message, lines[0]), (case, lines[0])
        assert not out.exists(), case
    folder = CliRunner().invoke(app, ["generate", "a fox", "--model", str(paths["folder"]), "--text-encoder",
                                      str(paths["t5"]), "--out", str(tmp_path / "out" / "folder")])
    assert folder.exit_code == 2 and "--text-encoder is for single-file models" in folder.stderr


# -- ldm info ---------------------------------------------------------------------------------------
def test_info_names_variant_components_and_needs(made):
    paths = made("sd35-medium")
    runner = CliRunner()
    bundled = json.loads(runner.invoke(app, ["info", str(paths["bundled"]), "--config", str(paths["folder"]), "--json"]).stdout)
    assert (bundled["family"], bundled["variant"], bundled["model"]) == ("sd3", "sd35-medium", "SD3.5 medium")
    assert bundled["components"] == ["transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3"]
    assert bundled["needs"] == [] and bundled["prediction"] == "flow"
    ref = loading.load(str(paths["folder"]))
    assert bundled["parameters_transformer"] == sum(p.numel() for p in ref.denoiser.parameters())
    alone = json.loads(runner.invoke(app, ["info", str(paths["transformer"]), "--config", str(paths["folder"]), "--json"]).stdout)
    encoder = runner.invoke(app, ["info", str(paths["t5"])])
    assert encoder.exit_code == 2 and "holds only a text encoder; pass it with --text-encoder" in encoder.stderr
    assert alone["components"] == ["transformer"]
    assert alone["needs"] == ["vae (--vae)", "text_encoder (CLIP-L, --text-encoder)",
                              "text_encoder_2 (CLIP-G, --text-encoder)", "text_encoder_3 (T5-XXL, --text-encoder, optional)"]
