"""Latent scaling comes from the VAE config; a decode that overflows is retried in fp32."""
import pytest
import torch

from ldm_cli import device as devices
from ldm_cli import loading, vae
from ldm_cli.errors import LdmError


@pytest.fixture
def model(sd1_folder):
    return loading.load(str(sd1_folder))


def spy_decode(model, monkeypatch, poison_dtype=None):
    seen = []
    real = model.vae.decode

    def decode(z, return_dict=True):
        seen.append((z.clone(), model.vae.dtype))
        out = real(z, return_dict=return_dict)
        if model.vae.dtype == poison_dtype:
            out[0][:] = float("nan")
        return out

    monkeypatch.setattr(model.vae, "decode", decode)
    return seen


@pytest.mark.parametrize("scaling, shift", [(0.18215, None), (0.13025, None), (1.5305, 0.0609)])
def test_latents_are_scaled_by_the_vae_config(model, monkeypatch, scaling, shift):
    model.vae.register_to_config(scaling_factor=scaling, shift_factor=shift)
    seen = spy_decode(model, monkeypatch)
    latents = torch.randn(1, 4, 8, 8)
    vae.decode(model, latents)
    assert torch.allclose(seen[0][0], latents / scaling + (shift or 0.0))


def test_encode_inverts_the_scaling(model):
    model.vae.register_to_config(scaling_factor=0.5, shift_factor=0.25)
    pixels = torch.rand(1, 3, 64, 64) * 2 - 1
    z = vae.encode(model, pixels, None)
    raw = model.vae.encode(pixels).latent_dist.mode()
    assert torch.allclose(z, (raw - 0.25) * 0.5, atol=1e-5)


def test_non_finite_decode_is_retried_in_fp32(model, monkeypatch):
    model.vae.to(torch.bfloat16)
    model.vae.register_to_config(force_upcast=False)
    seen = spy_decode(model, monkeypatch, poison_dtype=torch.bfloat16)
    [image] = vae.decode(model, torch.randn(1, 4, 8, 8, dtype=torch.bfloat16))
    assert [d for _, d in seen] == [torch.bfloat16, torch.float32]
    assert model.vae.dtype == torch.bfloat16  # put back after the retry
    assert image.getextrema() != ((0, 0), (0, 0), (0, 0))


def test_force_upcast_decodes_half_vaes_in_fp32(model, monkeypatch):
    model.vae.to(torch.float16)
    seen = spy_decode(model, monkeypatch)
    vae.decode(model, torch.randn(1, 4, 8, 8, dtype=torch.float16))
    assert [d for _, d in seen] == [torch.float32]


def test_dtype_defaults():
    assert devices.pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert devices.pick_dtype("auto", torch.device("cuda")) == torch.float16
    assert devices.pick_dtype("auto", torch.device("cuda"), "bf16") == torch.bfloat16
    assert devices.pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_fp16_matches_cpu_fp32(sd1_folder):
    import numpy as np

    from ldm_cli import pipeline
    from ldm_cli.loading import LoadOptions
    from ldm_cli.settings import Settings

    images = []
    for dev in ("cpu", "cuda"):
        m = loading.load(str(sd1_folder), LoadOptions(device=dev))
        s = Settings(prompt="a fox", steps=4, cfg=7.0, seed=1, scheduler="euler_a").resolve({}, m.native_size)
        images.append(np.asarray(pipeline.text_to_image(m, [s])[0]).astype(int))
    assert np.abs(images[0] - images[1]).mean() < 3  # same noise from CPU generators, fp16 rounding only


def test_latents_that_went_non_finite_are_not_decoded(model, monkeypatch):
    seen = spy_decode(model, monkeypatch)
    latents = torch.randn(3, 4, 8, 8)
    latents[1, 0, 0, 0] = float("nan")
    latents[2, 0, 0, 0] = float("inf")
    with pytest.raises(LdmError, match=r"sampling went to NaN or inf.*likely causes: .*LoRA.*--cfg.* \(images 2, 3 of 3\); "
                                       "images already saved are kept"):
        vae.decode(model, latents)
    assert seen == []


def test_a_decode_still_non_finite_in_fp32_is_an_error_not_a_black_image(model, monkeypatch):
    model.vae.to(torch.bfloat16)
    model.vae.register_to_config(force_upcast=False)
    for dtype in (torch.bfloat16, torch.float32):
        spy_decode(model, monkeypatch, poison_dtype=dtype)
    with pytest.raises(LdmError, match="the VAE decoded NaN or inf even in fp32"):
        vae.decode(model, torch.randn(1, 4, 8, 8, dtype=torch.bfloat16))
    assert model.vae.dtype == torch.bfloat16


def test_a_model_with_nan_weights_saves_no_black_image(sd1_folder, tmp_path):
    """End to end: a U-Net with one NaN weight fails in one line, and writes no PNG."""
    import shutil

    from safetensors.torch import load_file, save_file
    from typer.testing import CliRunner

    from ldm_cli.cli import app

    broken = tmp_path / "broken"
    shutil.copytree(sd1_folder, broken)
    [weights] = (broken / "unet").glob("*.safetensors")
    tensors = load_file(weights)
    tensors["conv_out.weight"][0, 0, 0, 0] = float("nan")
    save_file(tensors, weights)
    result = CliRunner().invoke(app, ["generate", "a fox", "--model", str(broken), "--steps", "2", "-n", "2",
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "ldm: error: sampling went to NaN or inf" in result.stderr
    assert "Traceback" not in result.output and not list(tmp_path.rglob("*.png"))
