"""What a single file is loaded as: the prediction type (--prediction, --config, an A1111 yaml,
the file's metadata, A1111's probe), --vae, and `ldm info`."""
import json

import pytest
import torch
from typer.testing import CliRunner

from ldm_cli import hashing, loading
from ldm_cli.cli import app
from ldm_cli.errors import LdmError
from ldm_cli.loading import LoadOptions, convert, keymap, prediction
from tests import original_layout, tiny_models


def metadata_without_scheduler(folder, family):
    """The file describes its components but not its prediction: only the probe can tell."""
    config = json.loads(original_layout.ldm_metadata(folder, family)["ldm.config"])
    del config["scheduler"]
    return {"ldm.config": json.dumps(config)}


@pytest.fixture(scope="module")
def sd2_file(sd2_folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("sd2") / "sd2-v.safetensors"
    return original_layout.write(sd2_folder, path, "sd2", metadata=metadata_without_scheduler(sd2_folder, "sd2"))


# -- prediction ------------------------------------------------------------------------------------
def unet_answering(bias: float):
    """A UNet whose output is `bias` everywhere, whatever its input."""
    unet = tiny_models.unet()
    with torch.no_grad():
        unet.conv_out.weight.zero_()
        unet.conv_out.bias.fill_(bias)
    return unet


def test_probe_is_a1111s_rule():
    # input 0.5 at t=999: output - input below -1 means v, about 0 means epsilon
    assert prediction.is_v_model(unet_answering(-2.0))
    assert not prediction.is_v_model(unet_answering(0.5))
    assert not prediction.is_v_model(unet_answering(-0.4))


def test_sd2_with_nothing_to_go_on_is_probed(sd2_file, monkeypatch):
    calls = []
    monkeypatch.setattr(prediction, "is_v_model", lambda unet: calls.append(unet) or True)
    model = loading.load(str(sd2_file))
    assert model.prediction_type == "v_prediction" and calls == [model.denoiser]
    monkeypatch.setattr(prediction, "is_v_model", lambda unet: False)
    assert loading.load(str(sd2_file)).prediction_type == "epsilon"


def test_a1111_yaml_beside_the_file(sd2_file, monkeypatch):
    monkeypatch.setattr(prediction, "is_v_model", lambda unet: pytest.fail("probed despite the yaml"))
    yaml = sd2_file.with_suffix(".yaml")
    yaml.write_text("model:\n  params:\n    # parameterization: \"eps\"\n    parameterization: \"v\"\n")
    try:
        assert loading.load(str(sd2_file)).prediction_type == "v_prediction"
        assert loading.load(str(sd2_file), LoadOptions(prediction="epsilon")).prediction_type == "epsilon"
        yaml.write_text("model:\n  params:\n    linear_start: 0.00085\n")  # no parameterization: epsilon
        assert loading.load(str(sd2_file)).prediction_type == "epsilon"
    finally:
        yaml.unlink()


def test_only_sd2_text_to_image_models_are_probed(sd1_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(prediction, "is_v_model", lambda unet: pytest.fail("SD1 probed"))
    path = original_layout.write(sd1_folder, tmp_path / "sd1.safetensors", "sd1",
                                 metadata=metadata_without_scheduler(sd1_folder, "sd1"))
    assert loading.load(str(path)).prediction_type == "epsilon"
    assert loading.load(str(path), LoadOptions(prediction="v")).prediction_type == "v_prediction"


def test_sd2_native_size_follows_the_prediction():
    from ldm_cli.loading import detect, recipe

    found = detect.Found("sd2", 4, 4, False)
    for chosen, size in [("v", 96), ("epsilon", 64)]:
        r = recipe.resolve(found, {}, None)
        prediction.apply(r, chosen)
        assert r.configs["unet"]["sample_size"] == size  # 768 and 512 pixels


# -- --vae ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def other_vae():
    return tiny_models.vae(scaling_factor=0.5, seed=9)


def test_vae_single_file_in_the_original_layout_keeps_the_models_scaling(other_vae, sdxl_folder, tmp_path):
    path = tmp_path / "vae-ft.safetensors"  # bare keys (encoder.*, decoder.*), as VAE files ship
    convert.save_single_file(convert.export(keymap.Slot("vae", "", "vae"), other_vae), path, {})
    model = loading.load(str(sdxl_folder), LoadOptions(vae=str(path)))
    original_layout_weights_equal(model.vae, other_vae)
    assert model.vae.config.scaling_factor == 0.13025  # the latent space SDXL was trained in


def test_vae_diffusers_folder_and_file(other_vae, written_sd1, tmp_path):
    folder, path = written_sd1
    other_vae.save_pretrained(tmp_path / "vae")
    from_folder = loading.load(str(path), LoadOptions(config=str(folder), vae=str(tmp_path / "vae")))
    original_layout_weights_equal(from_folder.vae, other_vae)
    assert from_folder.vae.config.scaling_factor == 0.5  # a folder brings its own config
    convert.save_single_file(other_vae.state_dict(), tmp_path / "diffusers-vae.safetensors", {})
    from_file = loading.load(str(path), LoadOptions(config=str(folder), vae=str(tmp_path / "diffusers-vae.safetensors")))
    original_layout_weights_equal(from_file.vae, other_vae)


def test_vae_from_a_whole_checkpoint_or_not_a_vae(written_sd1, sd1_folder, tmp_path):
    folder, path = written_sd1
    model = loading.load(str(sd1_folder), LoadOptions(vae=str(path)))  # its first_stage_model.* part
    original_layout_weights_equal(model.vae, loading.load(str(sd1_folder)).vae.half().float())
    convert.save_single_file({"lora_up.weight": torch.zeros(4, 4)}, tmp_path / "lora.safetensors", {})
    with pytest.raises(LdmError, match="not a VAE"):
        loading.load(str(path), LoadOptions(config=str(folder), vae=str(tmp_path / "lora.safetensors")))


@pytest.fixture(scope="module")
def written_sd1(sd1_folder, tmp_path_factory):
    path = tmp_path_factory.mktemp("sd1") / "sd1.safetensors"
    return sd1_folder, original_layout.write(sd1_folder, path, "sd1", dtype=torch.float16)


def original_layout_weights_equal(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- ldm info --------------------------------------------------------------------------------------------
def test_info(written_sd1):
    folder, path = written_sd1
    result = CliRunner().invoke(app, ["info", str(path), "--config", str(folder), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    ref = loading.load(str(folder))
    assert {k: data[k] for k in ("family", "prediction", "native_size", "dtype", "ema")} == {
        "family": "sd1", "prediction": "epsilon", "native_size": "64x64", "dtype": "fp16", "ema": True}
    assert data["parameters_unet"] == sum(p.numel() for p in ref.denoiser.parameters())
    assert data["parameters_text_encoder"] == sum(p.numel() for p in ref.text_encoders[0].parameters())
    assert data["hash"] == hashing.short_hash(path)
    text = CliRunner().invoke(app, ["info", str(path), "--config", str(folder)]).stdout
    assert "prediction from" in text and "Stable Diffusion 1.x" in text


def test_info_probes_sd2(sd2_file, monkeypatch):
    monkeypatch.setattr(prediction, "is_v_model", lambda unet: True)
    result = CliRunner().invoke(app, ["info", str(sd2_file), "--json"])
    data = json.loads(result.stdout)
    assert (data["prediction"], data["prediction_from"], data["family"]) == ("v", "probe", "sd2")
