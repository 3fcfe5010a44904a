"""Single-file checkpoints in the original layout.

First the oracle: diffusers' own from_single_file reads the files the tests write back into the
weights they came from, so they are the real original layout. Then ldm: loading them gives
exactly the weights, configs and images of the diffusers folders they came from, for SD1,
SD2 (v-prediction), SDXL and the inpainting variants, with the extra keys real files carry.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from ldm_cli import hashing, loading, pipeline
from ldm_cli.errors import LdmError
from ldm_cli.loading import LoadOptions, convert, detect, keymap
from ldm_cli.loading.tensors import Checkpoint
from ldm_cli.settings import Settings
from tests import original_layout

FOLDERS = {"sd1": "sd1_folder", "sd2": "sd2_folder", "sdxl": "sdxl_folder",
           "sd1-inpaint": "sd1_inpaint_folder", "sdxl-inpaint": "sdxl_inpaint_folder"}


def family_of(name: str) -> str:
    return name.split("-")[0]


@pytest.fixture(scope="module")
def written(request, tmp_path_factory):
    """name -> (diffusers folder, fp32 single file with the extra keys real files carry)."""
    cache = {}

    def get(name):
        if name not in cache:
            folder = request.getfixturevalue(FOLDERS[name])
            path = tmp_path_factory.mktemp("single") / f"{name}.safetensors"
            cache[name] = folder, original_layout.write(folder, path, family_of(name))
        return cache[name]
    return get


@pytest.fixture(scope="module")
def loaded(written):
    """name -> (ldm's model from the single file with --config, ldm's model from the folder)."""
    cache = {}

    def get(name):
        if name not in cache:
            folder, path = written(name)
            cache[name] = loading.load(str(path), LoadOptions(config=str(folder))), loading.load(str(folder))
        return cache[name]
    return get


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key]), key


def public(config) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_")}


def modules(model) -> list[torch.nn.Module]:
    return [model.denoiser, model.vae, *model.text_encoders]


# -- the oracle: diffusers reads our files as the original layout ---------------------------------
@pytest.mark.parametrize("name", ["sd1", "sd2", "sd1-inpaint", "sdxl-distinct"])
def test_diffusers_reads_the_written_files_back(name, request, tmp_path):
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline

    if name == "sdxl-distinct":
        folder = original_layout.distinct_sdxl_pipeline().save_pretrained(tmp_path / "xl") or tmp_path / "xl"
    else:
        folder = request.getfixturevalue(FOLDERS[name])
    family = family_of(name)
    path = original_layout.write(folder, tmp_path / "m.safetensors", family, extras=False)
    cls = {"sd1": StableDiffusionPipeline, "sd2": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline,
           "sd1-inpaint": StableDiffusionInpaintPipeline}[name.replace("-distinct", "")]
    theirs = cls.from_single_file(str(path), config=str(folder), local_files_only=True)
    for slot, ours in zip(keymap.LAYOUTS[family], original_layout.components(folder, family)):
        assert_same_weights(getattr(theirs, slot.name), ours)


# -- ldm loads them into the folder's weights and images ------------------------------------------
@pytest.mark.parametrize("name", list(FOLDERS))
def test_loads_exactly_the_weights_it_came_from(loaded, name):
    ours, ref = loaded(name)
    assert ours.family.name == ref.family.name == family_of(name)
    for a, b in zip(modules(ours), modules(ref)):
        assert_same_weights(a, b)
    assert public(ours.denoiser.config) == public(ref.denoiser.config)
    assert public(ours.vae.config) == public(ref.vae.config)
    assert (ours.prediction_type, ours.native_size, ours.is_inpainting) == (ref.prediction_type, ref.native_size,
                                                                          name.endswith("inpaint"))
    for t, u in zip(ours.tokenizers, ref.tokenizers):  # OpenCLIP's "!" padding included
        assert t("a fox", padding="max_length").input_ids == u("a fox", padding="max_length").input_ids


@pytest.mark.parametrize("name", ["sd1", "sd2", "sdxl"])
def test_same_image_as_the_folder(loaded, name):
    ours, ref = loaded(name)
    s = Settings(prompt="a red fox in snow", negative="blurry", steps=2, cfg=5.0, seed=3,
                 scheduler="ddim").resolve({}, ref.native_size)
    mine, theirs = (np.asarray(pipeline.text_to_image(m, [s])[0]) for m in (ours, ref))
    assert mine.shape == (64, 64, 3) and np.array_equal(mine, theirs)
    if name == "sd2":
        assert ours.prediction_type == "v_prediction"


def test_model_identity(loaded, written):
    ours, _ = loaded("sd1")
    _, path = written("sd1")
    assert (ours.name, ours.path, ours.hash) == ("sd1", str(path), hashing.short_hash(path))
    assert ours.dtype == torch.float32 and ours.device.type == "cpu"


def test_metadata_configs_and_defaults_like_the_builtin(sd1_folder, tmp_path):
    defaults = {"steps": 20, "cfg": 5.0, "scheduler": "dpmpp_2m", "schedule": "karras"}
    path = original_layout.write(sd1_folder, tmp_path / "builtin.safetensors", "sd1", dtype=torch.float16,
                                 metadata=original_layout.ldm_metadata(sd1_folder, "sd1", defaults))
    model = loading.load(str(path))  # no --config: the file describes itself
    ref = loading.load(str(sd1_folder))
    assert model.defaults == defaults
    for a, b in zip(modules(model), modules(ref)):  # fp16 in the file, fp32 on the CPU
        assert_same_weights(a, b.half().float())


def test_config_folder_overrides_metadata(sd2_folder, tmp_path):
    metadata = original_layout.ldm_metadata(sd2_folder, "sd2")
    config = json.loads(metadata["ldm.config"])
    config["scheduler"]["prediction_type"] = "epsilon"
    path = original_layout.write(sd2_folder, tmp_path / "m.safetensors", "sd2",
                                 metadata={"ldm.config": json.dumps(config)})
    assert loading.load(str(path)).prediction_type == "epsilon"
    assert loading.load(str(path), LoadOptions(config=str(sd2_folder))).prediction_type == "v_prediction"
    forced = loading.load(str(path), LoadOptions(config=str(sd2_folder), prediction="epsilon"))
    assert forced.prediction_type == "epsilon"


def test_config_folder_of_another_family_is_refused(written, sdxl_folder):
    _, path = written("sd1")
    with pytest.raises(LdmError, match="StableDiffusionXLPipeline.*sd1"):
        loading.load(str(path), LoadOptions(config=str(sdxl_folder)))


def test_without_config_a_nonstandard_file_says_what_to_do(written):
    _, path = written("sd1")
    with pytest.raises(LdmError, match="--config"):
        loading.load(str(path))


def test_export_round_trip(loaded, written):
    """The one mapping both ways: a loaded model exports to the very tensors of its file."""
    from safetensors.torch import load_file

    ours, _ = loaded("sdxl")
    _, path = written("sdxl")
    exported = convert.to_original("sdxl", ours.denoiser, ours.vae, ours.text_encoders)
    stored = load_file(path)
    assert exported.keys() <= stored.keys()
    assert all(torch.equal(exported[k], stored[k]) for k in exported)


# -- the shipped configs describe the released checkpoints -----------------------------------------
RELEASED = {  # names and shapes from the headers of the released SD1.5, SD2.1 and SDXL base files
    "sd1": {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 768),
            "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
            "model.diffusion_model.output_blocks.8.2.conv.weight": (640, 640, 3, 3),
            "first_stage_model.decoder.mid.attn_1.q.weight": (512, 512, 1, 1),
            "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
            "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072)},
    "sd2": {"model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight": (320, 1024),
            "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320),
            "cond_stage_model.model.transformer.resblocks.22.attn.in_proj_weight": (3072, 1024),
            "cond_stage_model.model.positional_embedding": (77, 1024)},
    "sdxl": {"model.diffusion_model.label_emb.0.0.weight": (1280, 2816),
             "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k.weight": (640, 2048),
             "model.diffusion_model.middle_block.1.transformer_blocks.9.ff.net.2.weight": (1280, 5120),
             "model.diffusion_model.output_blocks.2.2.conv.weight": (1280, 1280, 3, 3),
             "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": (768,),
             "conditioner.embedders.1.model.transformer.resblocks.31.attn.in_proj_weight": (3840, 1280),
             "conditioner.embedders.1.model.text_projection": (1280, 1280)},
}
PARAMETERS = {"sd1": (859520964, 83653863, 123060480), "sd2": (865910724, 83653863, 340387840),
              "sdxl": (2567463684, 83653863, 123060480, 694659840)}


def released_header(family: str, in_channels: int = 4) -> tuple[Checkpoint, list[torch.nn.Module]]:
    """A header-only Checkpoint of the full-size model, built on the meta device (no weights)."""
    from ldm_cli.loading import recipe

    built = []
    for slot in keymap.LAYOUTS[family]:
        config = recipe.read_json(recipe.config_file(recipe.SHIPPED / family, slot.name))
        built.append(convert.empty(slot.name, {**config, "in_channels": in_channels} if slot.name == "unet" else config))
    state = convert.to_original(family, built[0], built[1], built[2:])
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    return Checkpoint(Path(f"{family}.safetensors"), shapes, dict.fromkeys(shapes, "F16")), built


@pytest.mark.parametrize("family", ["sd1", "sd2", "sdxl"])
def test_shipped_configs_describe_the_released_checkpoints(family):
    checkpoint, built = released_header(family)
    for key, shape in RELEASED[family].items():
        assert checkpoint.shapes[key] == shape, key
    assert tuple(sum(p.numel() for p in m.parameters()) for m in built) == PARAMETERS[family]
    found = detect.detect(checkpoint)
    assert (found.family, found.inpainting, found.ema) == (family, False, False)
    inpainting, _ = released_header(family, in_channels=9)
    assert detect.detect(inpainting).inpainting


def with_shapes(checkpoint: Checkpoint, **changes) -> Checkpoint:
    shapes = {**checkpoint.shapes, **changes}
    return Checkpoint(checkpoint.path, shapes, dict.fromkeys(shapes, "F16"))


def test_detection_refuses_what_ldm_cannot_run():
    sd1, _ = released_header("sd1")
    vae_only = Checkpoint(Path("vae.safetensors"), {k.removeprefix("first_stage_model."): v for k, v in sd1.shapes.items()
                                                    if k.startswith("first_stage_model.")}, {})
    with pytest.raises(LdmError, match="only a VAE.*--vae"):
        detect.detect(vae_only)
    refiner = {k: v for k, v in sd1.shapes.items() if not k.startswith("cond_stage_model.")}
    refiner["conditioner.embedders.0.model.text_projection"] = (1280, 1280)
    with pytest.raises(LdmError, match="refiner"):
        detect.detect(Checkpoint(Path("r.safetensors"), refiner, {}))
    wide = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(LdmError, match="mixes parts"):
        detect.detect(with_shapes(sd1, **{wide: (320, 1024)}))
    with pytest.raises(LdmError, match="8 input channels"):
        detect.detect(with_shapes(sd1, **{detect.UNET_IN: (320, 8, 3, 3)}))
    with pytest.raises(LdmError, match="not a Stable Diffusion checkpoint"):
        detect.detect(Checkpoint(Path("x.safetensors"), {"weight": (3, 3)}, {}))


def test_ema_means_a_copy_of_the_weights():
    sd1, _ = released_header("sd1")
    assert not detect.detect(with_shapes(sd1, **{"model_ema.decay": (), "model_ema.num_updates": ()})).ema
    assert detect.detect(with_shapes(sd1, **{"model_ema.diffusion_modelout2weight": (4, 320, 3, 3)})).ema
