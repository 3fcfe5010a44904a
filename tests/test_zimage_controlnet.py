"""Z-Image ControlNets (ZImageControlNetModel, alibaba-pai's Fun ControlNet Union layout) against
diffusers' ZImageControlNetPipeline: the same weights, control image, scale, prompt and seed give
the same image within 2/255; two units' samples add up layer by layer; nets that cannot steer
the model, or come without their config, are refused in one line."""
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


def tiny_zimage_controlnet(transformer, seed: int, extra_channels: int, refiner: str | None):
    """A net the width of `transformer`, steering its one layer; its zero-initialised projections
    made random so that it acts. `extra_channels` above the latents: Fun ControlNet 2.0's inputs."""
    from diffusers import ZImageControlNetModel

    config = transformer.config
    torch.manual_seed(seed)
    net = ZImageControlNetModel(control_layers_places=[0], control_refiner_layers_places=[0],
                                control_in_dim=config.in_channels + extra_channels, add_control_noise_refiner=refiner,
                                dim=config.dim, n_refiner_layers=config.n_refiner_layers, n_heads=config.n_heads,
                                n_kv_heads=config.n_kv_heads)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.3)
    return net.eval()


def pattern(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def setup(zimage_turbo_folder, tmp_path_factory):
    model = loading.load(str(zimage_turbo_folder))
    root = tmp_path_factory.mktemp("zimage-cn")
    nets = []
    for seed, extra, refiner in ((31, 0, None), (32, 1, "control_noise_refiner")):
        nets.append(root / f"net{seed}")
        tiny_zimage_controlnet(model.denoiser, seed, extra, refiner).save_pretrained(nets[-1])
    images = [root / f"control{i}.png" for i in range(2)]
    for i, path in enumerate(images):
        pattern(i).save(path)
    return model, zimage_turbo_folder, nets, images


def settings(model, **kw) -> Settings:
    base = dict(prompt="a red fox", steps=3, seed=7, width=64, height=64, scheduler="euler")
    return Settings(**{**base, **kw}).resolve(model.defaults, model.native_size)


def ours(model, nets, images, scales, s) -> np.ndarray:
    units = [control_units.ControlUnit(str(n), str(i), sc, 0.0, 1.0) for n, i, sc in zip(nets, images, scales)]
    controlnet_loading.attach(model, units)
    try:
        return pixels(pipeline.text_to_image(model, [s])[0])
    finally:
        model.controls = []


def theirs(folder, net, image, scale, s) -> np.ndarray:
    from diffusers import ZImageControlNetModel, ZImageControlNetPipeline

    pipe = ZImageControlNetPipeline.from_pretrained(folder, controlnet=ZImageControlNetModel.from_pretrained(net),
                                                    local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = pipe.scheduler.config
    pipe.scheduler = flow_parity.their_scheduler(pipe, THEIR_SCHEDULERS, s.scheduler)
    out = pipe(s.prompt, control_image=Image.open(image), controlnet_conditioning_scale=scale,
               negative_prompt=s.negative or None, guidance_scale=s.cfg - 1, num_inference_steps=s.steps,
               height=s.height, width=s.width, generator=torch.Generator("cpu").manual_seed(s.seed), output_type="np")
    return as_pixels(out.images[0])


@pytest.mark.parametrize("which, kw", [
    (0, {}),  # Fun ControlNet 1.0's kind: the latents alone, the transformer's refiner
    (1, {"cfg": 3.0, "negative": "blurry"}),  # 2.0's: a zero channel more, its own refiner; with CFG
])
def test_matches_diffusers_zimage_controlnet_pipeline(setup, which, kw):
    model, folder, nets, images = setup
    s = settings(model, **kw)
    mine = ours(model, [nets[which]], [images[which]], [0.8], s)
    assert close(mine, theirs(folder, nets[which], images[which], 0.8, s))
    assert np.abs(mine - pixels(pipeline.text_to_image(model, [s])[0])).max() > 2  # the net acts


def test_two_units_add_their_samples(setup, monkeypatch):
    """Two nets steering the same layer: the transformer is given the sum of their samples."""
    model, _, nets, images = setup
    seen = []
    real = model.denoiser.forward

    def spy(*args, controlnet_block_samples=None, **kw):
        seen.append(controlnet_block_samples)
        return real(*args, controlnet_block_samples=controlnet_block_samples, **kw)

    monkeypatch.setattr(model.denoiser, "forward", spy)
    s = settings(model, steps=1)
    ours(model, nets, images, [0.5, 0.7], s)
    both = seen[-1]
    singles = []
    for net, image, scale in zip(nets, images, [0.5, 0.7]):
        ours(model, [net], [image], [scale], s)
        singles.append(seen[-1])
    assert set(both) == {0}
    assert torch.allclose(both[0], singles[0][0] + singles[1][0], atol=1e-5)


def test_nets_that_cannot_steer_the_model_are_refused(setup, tmp_path):
    from diffusers import ZImageControlNetModel

    model, _, nets, _ = setup
    wide = ZImageControlNetModel(control_layers_places=[0], control_in_dim=16, dim=64, n_refiner_layers=1, n_heads=2,
                                 n_kv_heads=2)
    wide.save_pretrained(tmp_path / "wide")
    with pytest.raises(LdmError, match="is for a Z-Image model 64 wide with 2 heads; this one is 32 wide with 2"):
        controlnet_loading.load(str(tmp_path / "wide"), model)
    lone = nets[0] / "diffusion_pytorch_model.safetensors"
    with pytest.raises(LdmError, match="a Z-Image ControlNet loads from its folder"):
        controlnet_loading.load(str(lone), model)
