"""The GPU fast path (speed.py) and --compile (compiling.py), checked on the CPU."""
from __future__ import annotations

import os
import shutil
import sys
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from torch.overrides import TorchFunctionMode

from ldm_cli import compiling, img2img, inpaint, ksampling, loading, pipeline, schedulers, speed
from ldm_cli.errors import LdmError
from ldm_cli.settings import Settings
from tests import compile_cache
from tests import tiny_models


@pytest.fixture(scope="module")
def model(sd1_folder):
    return loading.load(str(sd1_folder), loading.LoadOptions(device="cpu"))


def settings(model, **kw):
    base = dict(prompt="a red fox", negative="blurry", steps=3, cfg=5.0, seed=3, scheduler="dpmpp_2m", schedule="karras")
    return Settings(**{**base, **kw}).resolve({}, model.native_size)


def pixels(images) -> np.ndarray:
    return np.stack([np.asarray(im, np.int16) for im in images])


def unet_call(unet, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    context = unet.config.cross_attention_dim
    kwargs = {}
    if unet.config.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.rand(2, 6, generator=g)}
    with torch.inference_mode():
        return unet(torch.randn(2, 4, 8, 8, generator=g), torch.tensor(500), encoder_hidden_states=torch.randn(
            2, 77, context, generator=g), return_dict=False, **kwargs)[0]


def tiny_dit():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16,
                                 pooled_projection_dim=32, out_channels=4).eval()


def storage_bytes(module: torch.nn.Module) -> int:
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in module.parameters()}
    return sum(storages.values())


# -- the lossless path --------------------------------------------------------------------------
@pytest.mark.parametrize("sdxl", [False, True])
def test_fused_projections_compute_the_same_and_add_no_memory(sdxl):
    unet = tiny_models.unet(64 if sdxl else 32, sdxl=sdxl)
    before, size = unet_call(unet), storage_bytes(unet)
    assert speed.fuse_projections(unet)
    assert speed.processor_names(unet) == {"FusedAttnProcessor2_0"}
    assert torch.allclose(unet_call(unet), before, atol=1e-5)
    assert storage_bytes(unet) == size  # the separate q, k, v weights are views of the fused ones


def test_fused_projections_of_an_mmdit_compute_the_same():
    dit = tiny_dit()
    g = torch.Generator().manual_seed(0)
    inputs = dict(hidden_states=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([500, 500]),
                  encoder_hidden_states=torch.randn(2, 7, 32, generator=g),
                  pooled_projections=torch.randn(2, 32, generator=g), return_dict=False)
    with torch.inference_mode():
        before, size = dit(**inputs)[0], storage_bytes(dit)
        assert speed.fuse_projections(dit)
        assert speed.processor_names(dit) == {"FusedJointAttnProcessor2_0"}
        assert torch.allclose(dit(**inputs)[0], before, atol=1e-5)
    assert storage_bytes(dit) == size


def test_fusing_twice_or_a_custom_processor_leaves_the_module_alone():
    from diffusers.models.attention_processor import AttnProcessor

    unet = tiny_models.unet()
    assert speed.fuse_projections(unet) and not speed.fuse_projections(unet)
    classic = tiny_models.unet()
    classic.set_attn_processor(AttnProcessor())
    assert speed.processor_names(classic) == {"AttnProcessor"}
    assert not speed.fuse_projections(classic)
    assert not any(hasattr(m, "to_qkv") for m in classic.modules())


def test_channels_last_computes_the_same():
    unet = tiny_models.unet()
    before = unet_call(unet)
    unet.to(memory_format=torch.channels_last)
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(unet_call(unet), before, atol=1e-5)


def test_only_unets_and_vaes_count_as_convolutional():
    assert speed.is_convolutional(tiny_models.unet()) and speed.is_convolutional(tiny_models.vae())
    assert not speed.is_convolutional(tiny_dit())
    # Qwen-Image's video VAE: its 5-D Conv3d weights cannot take channels-last (torch refuses them)
    assert not speed.is_convolutional(tiny_models.qwen_image_vae())


def test_attention_runs_through_sdpa_and_cpu_models_are_left_as_loaded(model):
    assert speed.processor_names(model.denoiser) == speed.processor_names(model.vae) == {"AttnProcessor2_0"}
    assert model.denoiser.conv_in.weight.is_contiguous()


def test_the_cuda_fast_path_renders_the_same_image(sd1_folder, model):
    """The path a CUDA model gets, applied here on the CPU: the same image within rounding."""
    fast = loading.load(str(sd1_folder), loading.LoadOptions(device="cpu"))
    speed.apply(SimpleNamespace(device=torch.device("cuda"), denoiser=fast.denoiser, vae=fast.vae))
    assert speed.processor_names(fast.denoiser) == {"FusedAttnProcessor2_0"}
    assert fast.vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    s = settings(model)
    a, b = pixels(pipeline.text_to_image(model, [s])), pixels(pipeline.text_to_image(fast, [s]))
    assert np.abs(a - b).max() <= 1


# -- compiling: cache, mode, toolchain ----------------------------------------------------------
def test_compile_cache_lives_in_ldms_cache(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "ldm"))
    folder = compiling.prepare_cache()
    assert folder == tmp_path / "ldm" / "compile" and folder.is_dir()
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    assert Path(cache_dir()) == folder  # inductor (and so Triton) writes there


def test_compile_cache_follows_xdg_and_a_users_own_choice(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    monkeypatch.delenv("LDM_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert compiling.cache_dir() == tmp_path / "xdg" / "ldm" / "compile"
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert compiling.prepare_cache() == tmp_path / "mine"


def test_an_unwritable_compile_cache_is_one_error(monkeypatch, tmp_path):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("LDM_CACHE_DIR", str(tmp_path / "file"))
    with pytest.raises(LdmError, match="compile cache"):
        compiling.prepare_cache()


def test_compile_mode_per_device(monkeypatch):
    monkeypatch.delenv(compiling.MODE_ENV, raising=False)
    assert compiling.mode_for(torch.device("cuda")) == "reduce-overhead"
    assert compiling.mode_for(torch.device("cpu")) == "default"
    monkeypatch.setenv(compiling.MODE_ENV, "max-autotune")
    assert compiling.mode_for(torch.device("cuda")) == "max-autotune"


def test_compiling_on_the_cpu_without_a_compiler_is_one_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(LdmError, match="C\\+\\+ compiler"):
        compiling.check_toolchain(torch.device("cpu"))


def test_graph_replays_hand_back_copies():
    out = torch.ones(3)
    got = compiling._replaying(lambda: (out, {"x": out}))()
    assert torch.equal(got[0], out) and got[0].data_ptr() != out.data_ptr()
    assert got[1]["x"].data_ptr() != out.data_ptr()


def test_compile_flag_reaches_the_loader(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from ldm_cli import cli

    seen = []

    def load(source, options, early=None):
        seen.append(options.compile)
        raise LdmError("stop here")
    monkeypatch.setattr(loading, "load", load)
    runner = CliRunner()
    runner.invoke(cli.app, ["generate", "a fox", "--compile", "--out", str(tmp_path / "a")])
    (tmp_path / "p.txt").write_text("a fox\n")
    runner.invoke(cli.app, ["batch", str(tmp_path / "p.txt"), "--compile", "--out", str(tmp_path / "b")])
    runner.invoke(cli.app, ["generate", "a fox", "--out", str(tmp_path / "c")])
    assert seen == [True, True, False]


@pytest.mark.slow
def test_compiled_denoiser_renders_the_same_image_and_compiles_once(tmp_path_factory, sd1_folder, model, monkeypatch):
    """torch.compile on the CPU (inductor builds C++): the same image as eager, the code another
    process compiled (tests/compile_cache.py) is found in the cache, and a second batch of the
    same shape compiles nothing. (A second `ldm` process compiling nothing: test_gpu_bench.py.)"""
    from torch._dynamo.utils import counters

    cache, _ = compile_cache.bench_table(tmp_path_factory)
    compile_cache.use_in_this_process(monkeypatch, cache)
    fast = loading.load(str(sd1_folder), loading.LoadOptions(device="cpu", compile=True))
    s = settings(model)
    plain = pixels(pipeline.text_to_image(model, [s]))
    misses = counters["inductor"]["fxgraph_cache_miss"]
    assert np.abs(pixels(pipeline.text_to_image(fast, [s])) - plain).max() <= 1
    assert counters["inductor"]["fxgraph_cache_miss"] == misses, (
        "compiled again: is bench/gpu_speed.py's tiny SD1 U-Net still tests/tiny_models.py's?")
    graphs = counters["stats"]["unique_graphs"]
    pipeline.text_to_image(fast, [settings(model, seed=4, prompt="a blue cat")])
    assert counters["stats"]["unique_graphs"] == graphs


# -- no host syncs in ldm's loop ----------------------------------------------------------------
# Tensor methods that make a CUDA device finish its queued work before Python can go on.
SYNCING = {"item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__float__", "__int__", "__index__",
           "__repr__", "__format__"}
LDM = str(Path(loading.__file__).resolve().parent.parent)


class SyncCounter(TorchFunctionMode):
    """Counts syncing calls by the first caller outside torch: ldm's code, or a library's."""

    def __init__(self):
        super().__init__()
        self.calls = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in SYNCING:
            frame = sys._getframe(1)
            while frame and f"{os.sep}torch{os.sep}" in frame.f_code.co_filename:
                frame = frame.f_back
            where = frame.f_code.co_filename if frame else "?"
            self.calls["ldm" if where.startswith(LDM) else "library"] += 1
        return func(*args, **(kwargs or {}))


def count_loop_syncs(monkeypatch, render) -> Counter:
    from ldm_cli import sampling

    counter = SyncCounter()
    denoise = sampling.denoise

    def counted(*args, **kwargs):
        with counter:
            return denoise(*args, **kwargs)
    monkeypatch.setattr(sampling, "denoise", counted)
    render()
    return counter.calls


# DPM adaptive sizes each step from its error estimate, read back from the device: a sync a step
# by nature. Every other k-diffusion sampler keeps its sigma arithmetic on the host.
READS_BACK = ("dpm_adaptive",)
K_SAMPLERS = sorted(n for n, spec in schedulers.SCHEDULERS.items() if spec.k is not None and n not in READS_BACK)


@pytest.mark.parametrize("name", sorted(n for n, spec in schedulers.SCHEDULERS.items() if spec.cls is not None))
def test_ldms_loop_never_syncs_the_host(model, monkeypatch, name):
    """Per step, ldm's own code calls nothing that waits for the GPU (diffusers' schedulers may:
    the count of theirs is not asserted)."""
    s = settings(model, scheduler=name, schedule="default", steps=4)
    calls = count_loop_syncs(monkeypatch, lambda: pipeline.text_to_image(model, [s]))
    assert calls["ldm"] == 0


@pytest.mark.filterwarnings("error::UserWarning")  # a host float's negative square root is complex, and warns
@pytest.mark.parametrize("name", K_SAMPLERS)
def test_the_k_diffusion_samplers_never_sync_the_host(model, monkeypatch, name):
    """Nor do ldm's k-diffusion samplers (SGM Uniform runs every one of them on that path; churn
    where the sampler takes it), inpainting's blend and img2img's kept tail included."""
    cfg_pp = schedulers.cfg_pp(name)  # its own timesteps; text to image only
    s = settings(model, scheduler=name, schedule="default" if cfg_pp else "sgm_uniform", steps=4, s_churn=1.0)
    assert schedulers.uses_k(name, s.schedule)
    calls = count_loop_syncs(monkeypatch, lambda: pipeline.text_to_image(model, [s]))
    if name not in ksampling.OWN_STEPS and not cfg_pp:
        image = Image.new("RGB", (64, 64), (200, 30, 30))
        mask = Image.new("L", (64, 64), 0)
        mask.paste(255, (16, 16, 48, 48))
        calls += count_loop_syncs(monkeypatch, lambda: inpaint.inpaint(
            model, [inpaint.with_defaults(s.merged(strength=0.8))], [image], [mask]))
    assert calls["ldm"] == 0


@pytest.fixture(scope="module")
def flow_model(sd3_folder):
    return loading.load(str(sd3_folder), loading.LoadOptions(device="cpu"))


@pytest.mark.filterwarnings("error::UserWarning")
@pytest.mark.parametrize("name", [n for n in K_SAMPLERS if n in schedulers.flow_names()])
def test_the_k_samplers_on_a_flow_model_never_sync_the_host(flow_model, monkeypatch, name):
    """Their flow forms (rectified-flow noise, half-log-SNR steps) keep the sigmas on the host too."""
    s = settings(flow_model, scheduler=name, schedule="sgm_uniform", steps=4)
    assert pipeline.k_path(s, flow_model.family)
    calls = count_loop_syncs(monkeypatch, lambda: pipeline.text_to_image(flow_model, [s]))
    assert calls["ldm"] == 0


def test_the_counter_tells_ldms_calls_from_a_librarys():
    x = torch.tensor(2.0)
    with SyncCounter() as counter:
        exec(compile("x.item(); bool(x)", os.path.join(LDM, "somewhere.py"), "exec"), {"x": x})
        x.tolist()
    assert counter.calls == {"ldm": 2, "library": 1}


def test_img2img_and_inpaint_loops_never_sync_the_host(model, monkeypatch):
    image = Image.new("RGB", (64, 64), (200, 30, 30))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    s = settings(model, strength=0.6, steps=5, scheduler="ddim", schedule="default")  # DDIM's step syncs
    calls = count_loop_syncs(monkeypatch, lambda: img2img.image_to_image(model, [s], [image]))
    calls += count_loop_syncs(monkeypatch, lambda: inpaint.inpaint(
        model, [inpaint.with_defaults(s.merged(strength=0.8))], [image], [mask]))
    assert calls["ldm"] == 0 and calls["library"] > 0  # the counter does see the library's
