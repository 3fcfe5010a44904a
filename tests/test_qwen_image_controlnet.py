"""Qwen-Image ControlNets (QwenImageControlNetModel, InstantX's layout) against diffusers'
QwenImageControlNetPipeline: the same weights, control image, scale, prompt and seed give the
same image within 2/255, from a folder and from a lone file in diffusers' names; nets that
cannot steer the model (another width, the inpainting kind) are refused in one line."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm_cli import control_units, loading, pipeline
from ldm_cli.errors import LdmError
from ldm_cli.loading import controlnet as controlnet_loading
from ldm_cli.settings import Settings
from tests import flow_parity
from tests.flow_parity import as_pixels, close, pixels

THEIR_SCHEDULERS = {"euler": ("FlowMatchEulerDiscreteScheduler", {})}


def tiny_qwen_controlnet(transformer, seed: int, **extra):
    """A net of one block copied from `transformer`, its zero-initialised projections made random so it acts."""
    from diffusers import QwenImageControlNetModel

    config = transformer.config
    net = QwenImageControlNetModel.from_transformer(transformer, num_layers=1,
                                                    attention_head_dim=config.attention_head_dim,
                                                    num_attention_heads=config.num_attention_heads, **extra)
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_blocks", "controlnet_x_embedder")):
                p.normal_(0, 0.3)
    return net.eval()


def pattern(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def setup(qwen_image_folder, tmp_path_factory):
    model = loading.load(str(qwen_image_folder))
    root = tmp_path_factory.mktemp("qwen-cn")
    net = root / "net"
    tiny_qwen_controlnet(model.denoiser, 41).save_pretrained(net)
    image = root / "control.png"
    pattern(0).save(image)
    return model, qwen_image_folder, net, image


def settings(model, **kw) -> Settings:
    base = dict(prompt="a red fox", steps=3, seed=7, width=64, height=64, scheduler="euler", cfg=1.0)
    return Settings(**{**base, **kw}).resolve(model.defaults, model.native_size)


def ours(model, net, image, scale, s) -> np.ndarray:
    controlnet_loading.attach(model, [control_units.ControlUnit(str(net), str(image), scale, 0.0, 1.0)])
    try:
        return pixels(pipeline.text_to_image(model, [s])[0])
    finally:
        model.controls = []


def theirs(folder, net, image, scale, s) -> np.ndarray:
    from diffusers import QwenImageControlNetModel, QwenImageControlNetPipeline

    pipe = QwenImageControlNetPipeline.from_pretrained(folder, controlnet=QwenImageControlNetModel.from_pretrained(net),
                                                       local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = pipe.scheduler.config
    pipe.scheduler = flow_parity.their_scheduler(pipe, THEIR_SCHEDULERS, s.scheduler)
    out = pipe(s.prompt, control_image=Image.open(image), controlnet_conditioning_scale=scale, true_cfg_scale=s.cfg,
               num_inference_steps=s.steps, height=s.height, width=s.width,
               generator=torch.Generator("cpu").manual_seed(s.seed), output_type="np")
    return as_pixels(out.images[0])


@pytest.mark.parametrize("lone_file", [False, True])
def test_matches_diffusers_qwen_image_controlnet_pipeline(setup, lone_file):
    model, folder, net, image = setup
    s = settings(model)
    given = net / "diffusion_pytorch_model.safetensors" if lone_file else net
    mine = ours(model, given, image, 0.8, s)
    assert close(mine, theirs(folder, net, image, 0.8, s))
    assert np.abs(mine - pixels(pipeline.text_to_image(model, [s])[0])).max() > 2  # the net acts


def test_nets_that_cannot_steer_the_model_are_refused(setup, tmp_path):
    model, _, _, _ = setup
    inpainting = tiny_qwen_controlnet(model.denoiser, 42, extra_condition_channels=4)
    inpainting.save_pretrained(tmp_path / "inpainting")
    with pytest.raises(LdmError, match="is an inpainting ControlNet"):
        controlnet_loading.load(str(tmp_path / "inpainting"), model)
    with pytest.raises(LdmError, match="is an inpainting ControlNet"):
        controlnet_loading.load(str(tmp_path / "inpainting" / "diffusion_pytorch_model.safetensors"), model)
    from diffusers import QwenImageControlNetModel

    config = dict(model.denoiser.config)
    wide = QwenImageControlNetModel(**{k: config[k] for k in ("patch_size", "in_channels", "out_channels",
                                                              "joint_attention_dim", "axes_dims_rope")},
                                    num_layers=1, attention_head_dim=config["attention_head_dim"],
                                    num_attention_heads=2 * config["num_attention_heads"])
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(LdmError, match="is for a Qwen-Image model of width"):
        controlnet_loading.load(str(tmp_path / "wide"), model)
