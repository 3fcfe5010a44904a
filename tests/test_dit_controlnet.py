"""FLUX and SD3 ControlNets: images equal diffusers' FluxControlNetPipeline (one net and several,
a diffusers folder and a lone file) and StableDiffusion3ControlNetPipeline (InstantX's and
Stability's kinds), and ControlNets that cannot steer the model refused in one line."""
import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm_cli import control_units, loading, pipeline
from ldm_cli.errors import LdmError
from ldm_cli.loading import controlnet as controlnet_loading
from ldm_cli.settings import Settings
from tests.flow_parity import as_pixels, close, pixels


def tiny_flux_controlnet(transformer, seed: int, **extra):
    """A FLUX ControlNet copied from `transformer`, its zero-initialised outputs made random so it acts."""
    from diffusers import FluxControlNetModel

    net = FluxControlNetModel.from_transformer(transformer, num_layers=1, num_single_layers=1,
                                               attention_head_dim=transformer.config.attention_head_dim,
                                               num_attention_heads=transformer.config.num_attention_heads)
    if extra:
        net = FluxControlNetModel.from_config(net.config, **extra)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_single_blocks", "controlnet_x_embedder")):
                p.normal_(0, 0.3)
    return net.eval()


def pattern(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def setup(flux_dev_folder, tmp_path_factory):
    model = loading.load(str(flux_dev_folder))
    root = tmp_path_factory.mktemp("flux-cn")
    nets = []
    for seed in (21, 22):
        folder = root / f"net{seed}"
        tiny_flux_controlnet(model.denoiser, seed).save_pretrained(folder)
        nets.append(folder)
    images = []
    for i in range(2):
        images.append(root / f"control{i}.png")
        pattern(i).save(images[-1])
    return model, flux_dev_folder, nets, images


def settings(model, **kw) -> Settings:
    return Settings(prompt="a red fox", steps=3, seed=7, width=64, height=64, scheduler="euler",
                    **kw).resolve(model.defaults, model.native_size)


def ours(model, nets, images, scales, starts, ends, s, mode=None) -> np.ndarray:
    units = [control_units.ControlUnit(str(n), str(i), sc, st, en, mode=mode)
             for n, i, sc, st, en in zip(nets, images, scales, starts, ends)]
    controlnet_loading.attach(model, units)
    try:
        return pixels(pipeline.text_to_image(model, [s])[0])
    finally:
        model.controls = []


def theirs(folder, nets, images, scales, starts, ends, s, **kw) -> np.ndarray:
    from diffusers import FluxControlNetModel, FluxControlNetPipeline

    loaded = [FluxControlNetModel.from_pretrained(n) for n in nets]
    pipe = FluxControlNetPipeline.from_pretrained(folder, controlnet=loaded if len(loaded) > 1 else loaded[0],
                                                  local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    one = len(loaded) == 1
    out = pipe(s.prompt, control_image=Image.open(images[0]) if one else [Image.open(i) for i in images],
               controlnet_conditioning_scale=scales[0] if one else scales,
               control_guidance_start=starts[0] if one else starts, control_guidance_end=ends[0] if one else ends,
               num_inference_steps=s.steps, guidance_scale=s.guidance, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(s.seed), output_type="np", **kw)
    return as_pixels(out.images[0])


@pytest.mark.parametrize("count, lone_file", [(1, False), (1, True), (2, False)])
def test_matches_diffusers_flux_controlnet_pipeline(setup, count, lone_file):
    model, folder, nets, images = setup
    scales, starts, ends = [0.8, 1.2][:count], [0.0, 0.34][:count], [0.67, 1.0][:count]
    mine_nets = [n / controlnet_loading.FILE_NAME for n in nets[:count]] if lone_file else nets[:count]
    s = settings(model)
    mine = ours(model, mine_nets, images[:count], scales, starts, ends, s)
    plain = pixels(pipeline.text_to_image(model, [s])[0])
    assert np.abs(mine - plain).max() > 8  # the ControlNet changed the image
    assert close(mine, theirs(folder, nets[:count], images[:count], scales, starts, ends, s))


@pytest.fixture(scope="module")
def union(setup, tmp_path_factory):
    """A union FLUX ControlNet of 4 control types, as a lone file (its modes read from the tensors)."""
    folder = tmp_path_factory.mktemp("union")
    tiny_flux_controlnet(setup[0].denoiser, 3, num_mode=4).save_pretrained(folder)
    return folder


def test_a_union_controlnet_draws_its_mode_as_diffusers(setup, union):
    model, folder, _, images = setup
    s = settings(model)
    depth = ours(model, [union / controlnet_loading.FILE_NAME], images[:1], [1.0], [0.0], [1.0], s,
                 mode=control_units.mode_number("depth"))
    assert close(depth, theirs(folder, [union], images[:1], [1.0], [0.0], [1.0], s, control_mode=2))
    from ldm_cli.families import flux

    net = controlnet_loading.load(str(union), model)  # the mode reaches the net: its samples differ
    cond = model.family.encode(model, [s.prompt], s, False)
    g = torch.Generator().manual_seed(0)
    x, image, t = torch.randn(1, 16, 8, 8, generator=g), torch.randn(1, 16, 8, 8, generator=g), torch.tensor(500.0)
    canny, depth = (flux.control_residuals(model, net, x, t, cond, image, 1.0, mode) for mode in (0, 2))
    assert (canny["controlnet_block_samples"][0] - depth["controlnet_block_samples"][0]).abs().max() > 1e-3


def test_control_modes_and_union_nets_must_agree(setup, union, tmp_path):
    from typer.testing import CliRunner

    from ldm_cli.cli import app

    model, folder, nets, images = setup
    common = ["generate", "a fox", "--model", str(folder), "--control-image", str(images[0]), "--steps", "1",
              "-W", "64", "-H", "64", "--out", str(tmp_path / "o")]
    for flags, message in (
            ([], "is a union ControlNet of 4 control types: give --control-mode (canny, tile, depth, blur, or a "
                 "number below 4)"),
            (["--control-mode", "pose"], "give --control-mode (canny, tile, depth, blur, or a number below 4) (got 4)"),
            (["--control-mode", "sketch"], "--control-mode must be one of canny, tile, depth, blur, pose, gray, lq or "
                                           "a number (got 'sketch')")):
        result = CliRunner().invoke(app, [*common, "--controlnet", str(union), *flags])
        assert result.exit_code == 2 and message in result.stderr, result.output
    result = CliRunner().invoke(app, [*common, "--controlnet", str(nets[0]), "--control-mode", "1"])
    assert result.exit_code == 2 and "--control-mode is for union ControlNets" in result.stderr
    assert not (tmp_path / "o").exists()
    result = CliRunner().invoke(app, [*common, "--controlnet", str(union), "--control-mode", "Depth", "--json"])
    assert result.exit_code == 0, result.output
    replay = CliRunner().invoke(app, ["generate", "--from-png", json.loads(result.stdout)["path"], "--json",
                                      "--out", str(tmp_path / "r")])
    assert replay.exit_code == 0 and json.loads(replay.stdout)["controlnet"] == json.loads(result.stdout)["controlnet"]


def test_controlnets_that_cannot_steer_the_model_are_refused(setup, sd1_folder, tmp_path):
    model, _, nets, _ = setup
    sd1 = loading.load(str(sd1_folder))
    with pytest.raises(LdmError, match="is a FLUX ControlNet; this model is Stable Diffusion 1.x"):
        controlnet_loading.load(str(nets[0]), sd1)
    with pytest.raises(LdmError, match="is a FLUX ControlNet; this model is Stable Diffusion 1.x"):
        controlnet_loading.load(str(nets[0] / controlnet_loading.FILE_NAME), sd1)
    xlabs = tmp_path / "xlabs.safetensors"
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2), "controlnet_blocks.0.weight": torch.zeros(2, 2)},
              str(xlabs))
    with pytest.raises(LdmError, match="XLabs' own layout"):
        controlnet_loading.load(str(xlabs), model)
    from tests.test_controlnet import tiny_controlnet

    sd_net = tmp_path / "sd.safetensors"
    save_file(tiny_controlnet(sd1.denoiser, 1).state_dict(), str(sd_net))
    with pytest.raises(LdmError, match="for SD1, SD2 or SDXL, not for FLUX"):
        controlnet_loading.load(str(sd_net), model)


def test_generate_and_img2img_take_a_flux_controlnet_and_record_it(setup, tmp_path):
    from typer.testing import CliRunner

    from ldm_cli.cli import app

    _, folder, nets, images = setup
    common = ["--model", str(folder), "--controlnet", str(nets[0]), "--control-image", str(images[0]),
              "--steps", "2", "-W", "64", "-H", "64", "--seed", "5"]
    made = CliRunner().invoke(app, ["generate", "a fox", *common, "--out", str(tmp_path / "g")])
    assert made.exit_code == 0, made.output
    [png] = (tmp_path / "g").glob("*.png")
    assert f"ControlNet 0: \"Module: none, Model: {nets[0].name}" in Image.open(png).text["parameters"]
    replayed = CliRunner().invoke(app, ["generate", "--from-png", str(png), "--out", str(tmp_path / "r")])
    assert replayed.exit_code == 0, replayed.output
    assert np.array_equal(pixels(Image.open(png)), pixels(Image.open(next((tmp_path / "r").glob("*.png")))))
    redrawn = CliRunner().invoke(app, ["img2img", str(png), "a fox", *common, "--strength", "0.6",
                                       "--out", str(tmp_path / "i")])
    assert redrawn.exit_code == 0, redrawn.output


# -- SD3 --------------------------------------------------------------------------------------------
def tiny_sd3_controlnet(transformer, seed: int, instantx: bool):
    """An SD3 ControlNet of one block over `transformer`'s config, its zero-initialised parts made
    random; InstantX's kind zeroes the pooled text and reads unshifted latents, Stability's not."""
    from diffusers import SD3ControlNetModel

    torch.manual_seed(seed)
    net = SD3ControlNetModel.from_config(transformer.config, num_layers=1, extra_conditioning_channels=0,
                                         force_zeros_for_pooled_projection=instantx)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_blocks", "pos_embed_input")):
                p.normal_(0, 0.3)
    return net.eval()


@pytest.fixture(scope="module")
def sd3_setup(sd3_folder, tmp_path_factory):
    model = loading.load(str(sd3_folder))
    root = tmp_path_factory.mktemp("sd3-cn")
    nets = {}
    for instantx in (True, False):
        nets[instantx] = root / f"net-{instantx}"
        tiny_sd3_controlnet(model.denoiser, 31, instantx).save_pretrained(nets[instantx])
    image = root / "control.png"
    pattern(5).save(image)
    return model, sd3_folder, nets, image


@pytest.mark.parametrize("instantx", [True, False])
def test_sd3_matches_diffusers_sd3_controlnet_pipeline(sd3_setup, monkeypatch, instantx):
    """diffusers samples the control latents from the global RNG; ldm takes their mode, so the
    reference here takes it too."""
    from diffusers import SD3ControlNetModel, StableDiffusion3ControlNetPipeline
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    model, folder, nets, image = sd3_setup
    s = Settings(prompt="a red fox", negative="blurry", steps=3, cfg=5.0, seed=7, width=64, height=64,
                 scheduler="euler").resolve(model.defaults, model.native_size)
    mine = ours(model, [nets[instantx]], [image], [0.9], [0.0], [1.0], s)
    assert np.abs(mine - pixels(pipeline.text_to_image(model, [s])[0])).max() > 8
    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mode())
    pipe = StableDiffusion3ControlNetPipeline.from_pretrained(
        folder, controlnet=SD3ControlNetModel.from_pretrained(nets[instantx]), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(s.prompt, negative_prompt=s.negative, control_image=Image.open(image), controlnet_conditioning_scale=0.9,
               num_inference_steps=s.steps, guidance_scale=s.cfg, height=64, width=64,
               generator=torch.Generator("cpu").manual_seed(s.seed), output_type="np").images[0]
    assert close(mine, as_pixels(ref))


def test_sd3_controlnets_load_from_their_folders_only(sd3_setup, setup):
    model, _, nets, _ = sd3_setup
    with pytest.raises(LdmError, match="an SD3 ControlNet loads from its folder"):
        controlnet_loading.load(str(nets[True] / controlnet_loading.FILE_NAME), model)
    with pytest.raises(LdmError, match="holds a 'FluxControlNetModel', not an SD3 ControlNet"):
        controlnet_loading.load(str(setup[2][0]), model)
    with pytest.raises(LdmError, match="holds a 'SD3ControlNetModel', not a FLUX ControlNet"):
        controlnet_loading.load(str(nets[True]), setup[0])


def test_a_controlnet_given_as_the_model_says_so(setup, sd1_folder, tmp_path):
    from typer.testing import CliRunner

    from ldm_cli.cli import app
    from tests.test_controlnet import tiny_controlnet

    sd_net = tmp_path / "control_sd15_canny.safetensors"
    save_file(tiny_controlnet(loading.load(str(sd1_folder)).denoiser, 1).state_dict(), str(sd_net))
    for path in (setup[2][0] / controlnet_loading.FILE_NAME, sd_net):
        for command in (["info", str(path)], ["generate", "a fox", "--model", str(path), "--out", str(tmp_path / "o")]):
            result = CliRunner().invoke(app, command)
            assert result.exit_code == 2
            assert result.stderr.splitlines() == [f"ldm: error: {path.name} is a ControlNet, not a model; pass it with "
                                                  "--controlnet next to a model"], result.output
