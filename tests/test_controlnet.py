"""ControlNet: images equal diffusers' ControlNet pipelines (single and multi, folder and single
file), control images fitted as A1111 fits them, and a ControlNet that does not fit refused."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm_cli import control, control_units, loading, pipeline
from ldm_cli.errors import LdmError
from ldm_cli.loading import controlnet as controlnet_loading
from ldm_cli.settings import Settings


def tiny_controlnet(unet, seed: int):
    """A ControlNet copied from `unet`, its zero-initialised output convs made random so it acts."""
    from diffusers import ControlNetModel

    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding.conv_out")):
                p.normal_(0, 0.3)
    return net.eval()


def pattern(seed: int, size=(64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def setups(sd1_folder, sd2_folder, sdxl_folder, tmp_path_factory):
    """Per family: our model, the folder, and two tiny ControlNets saved as diffusers folders."""
    out = {}
    for name, folder in [("sd1", sd1_folder), ("sd2", sd2_folder), ("sdxl", sdxl_folder)]:
        ours = loading.load(str(folder))
        nets = []
        for seed in (11, 12):
            path = tmp_path_factory.mktemp(f"cn-{name}-{seed}")
            tiny_controlnet(ours.denoiser, seed).save_pretrained(path)
            nets.append(path)
        out[name] = (ours, folder, nets)
    return out


def diffusers_image(family, folder, net_paths, images, scales, starts, ends, s):
    from diffusers import (ControlNetModel, DDIMScheduler, StableDiffusionControlNetPipeline,
                           StableDiffusionXLControlNetPipeline)

    nets = [ControlNetModel.from_pretrained(p) for p in net_paths]
    cls = StableDiffusionXLControlNetPipeline if family == "sdxl" else StableDiffusionControlNetPipeline
    pipe = cls.from_pretrained(folder, controlnet=nets if len(nets) > 1 else nets[0], local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    single = len(nets) == 1
    ref = pipe(s.prompt, negative_prompt=s.negative or None, image=images[0] if single else images,
               num_inference_steps=s.steps, guidance_scale=s.cfg, height=64, width=64,
               controlnet_conditioning_scale=scales[0] if single else scales,
               control_guidance_start=starts[0] if single else starts, control_guidance_end=ends[0] if single else ends,
               generator=torch.Generator("cpu").manual_seed(s.seed), output_type="np").images[0]
    return (ref * 255).round().astype(np.int16)


def ours_image(model, nets, image_paths, scales, starts, ends, s):
    units = [control_units.ControlUnit(str(n), str(i), sc, st, en) for n, i, sc, st, en in
             zip(nets, image_paths, scales, starts, ends)]
    model.controls = [(u, controlnet_loading.load(u.controlnet, model)) for u in units]
    try:
        return np.asarray(pipeline.text_to_image(model, [s])[0]).astype(np.int16)
    finally:
        model.controls = []


@pytest.mark.parametrize("family, multi", [("sd1", False), ("sd1", True), ("sd2", False), ("sdxl", False),
                                           ("sdxl", True)])
def test_matches_diffusers_controlnet_pipeline(setups, tmp_path, family, multi):
    model, folder, net_dirs = setups[family]
    n = 2 if multi else 1
    images = [pattern(i) for i in range(n)]
    paths = []
    for i, image in enumerate(images):
        paths.append(tmp_path / f"control{i}.png")
        image.save(paths[-1])
    scales, starts, ends = [0.8, 1.3][:n], [0.0, 0.25][:n], [0.6, 1.0][:n]
    # the single case loads the lone safetensors file (config derived from the base UNet)
    ours_nets = [d / controlnet_loading.FILE_NAME for d in net_dirs[:n]] if not multi else net_dirs[:n]
    s = Settings(prompt="a red fox", negative="" if family == "sdxl" else "blurry", steps=4, cfg=6.0, seed=99,
                 scheduler="ddim").resolve({}, model.native_size)
    mine = ours_image(model, ours_nets, paths, scales, starts, ends, s)
    plain = np.asarray(pipeline.text_to_image(model, [s])[0]).astype(np.int16)
    ref = diffusers_image(family, folder, net_dirs[:n], images, scales, starts, ends, s)
    assert mine.std() > 1
    assert np.abs(mine - plain).max() > 8  # the ControlNet changed the image
    assert np.abs(mine - ref).max() <= 2


def test_crop_and_resize_covers_then_centre_crops():
    image = Image.new("RGB", (200, 100), "black")
    image.paste((255, 0, 0), (50, 0, 150, 100))  # a red centre square between black sides
    out = control.crop_and_resize(image, 64, 64)
    assert out.size == (64, 64)
    assert np.asarray(out)[:, :, 0].min() > 200  # only the centre survives the crop


def test_canny_draws_edges_only_where_the_image_changes():
    image = Image.new("RGB", (64, 64), "black")
    image.paste((255, 255, 255), (16, 16, 48, 48))
    edges = np.asarray(control.canny(image))[:, :, 0]
    assert set(np.unique(edges)) == {0, 255}
    assert edges[32, 32] == 0 and edges[2, 2] == 0
    assert edges[16, 16:48].max() == 255 or edges[15, 16:48].max() == 255


def test_controlnet_of_another_width_is_refused(setups):
    sd1, _, sd1_nets = setups["sd1"]
    sdxl, _, _ = setups["sdxl"]
    with pytest.raises(LdmError, match="SD1/SD2 models with cross-attention width 32"):
        controlnet_loading.load(str(sd1_nets[0]), sdxl)
    with pytest.raises(LdmError, match="SD1/SD2"):
        controlnet_loading.load(str(sd1_nets[0] / controlnet_loading.FILE_NAME), sdxl)


def test_counts_and_options_checked(tmp_path):
    with pytest.raises(LdmError, match="each --controlnet needs its --control-image"):
        control_units.units_from_flags(["a"], [], [], [], [], [])
    with pytest.raises(LdmError, match="does not exist"):
        control_units.units_from_flags([str(tmp_path / "missing")], [str(tmp_path)], [], [], [], [])
    with pytest.raises(LdmError, match="--control-scale is given 2 times"):
        control_units.units_from_flags([str(tmp_path)], [str(tmp_path)], [1.0, 2.0], [], [], [])


def test_cli_records_and_replays_the_units(setups, sd1_folder, tmp_path):
    import json

    from typer.testing import CliRunner

    from ldm_cli import images
    from ldm_cli.cli import app

    _, _, nets = setups["sd1"]
    photo = tmp_path / "photo.png"
    pattern(3, (96, 64)).save(photo)  # another shape: crop and resize, then canny
    runner = CliRunner()
    args = ["generate", "a fox", "--model", str(sd1_folder), "--steps", "2", "--seed", "5", "--scheduler", "ddim",
            "--controlnet", str(nets[0]), "--control-image", str(photo), "--control-scale", "0.8",
            "--control-end", "0.6", "--control-preprocess", "canny", "--json", "--quiet"]
    first = runner.invoke(app, [*args, "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    png = json.loads(first.output.splitlines()[-1])["path"]
    text = images.read_text_chunks(png)["parameters"]
    assert f'ControlNet 0: "Module: canny, Model: {nets[0].name} [' in text
    assert "Weight: 0.8, Resize Mode: Crop and Resize" in text and "Guidance Start: 0, Guidance End: 0.6" in text
    unit = json.loads(json.loads(images.read_text_chunks(png)["ldm"])["controlnet"])[0]
    assert len(unit["image_hash"]) == 10 and unit["controlnet"] == str(nets[0])
    again = runner.invoke(app, ["generate", "--from-png", png, "--out", str(tmp_path / "b"), "--json", "--quiet"])
    assert again.exit_code == 0, again.output
    replay = json.loads(again.output.splitlines()[-1])["path"]
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(replay)))
    pattern(4, (96, 64)).save(photo)  # the control image changed: the replay is refused
    changed = runner.invoke(app, ["generate", "--from-png", png, "--out", str(tmp_path / "c")])
    assert changed.exit_code == 2 and "has changed since it was recorded" in changed.output


def test_cli_refuses_a_controlnet_of_another_family(setups, sd1_folder, tmp_path):
    from typer.testing import CliRunner

    from ldm_cli.cli import app

    _, _, xl_nets = setups["sdxl"]
    image = tmp_path / "c.png"
    pattern(1).save(image)
    out = tmp_path / "out"
    result = CliRunner().invoke(app, ["generate", "a fox", "--model", str(sd1_folder), "--steps", "1", "--out", str(out),
                                      "--controlnet", str(xl_nets[0]), "--control-image", str(image)])
    assert result.exit_code == 2
    assert "is for SDXL models" in result.output and len(result.output.strip().splitlines()) == 1
    assert not out.exists() or not list(out.iterdir())


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_img2img_matches_diffusers_controlnet_img2img_pipeline(setups, tmp_path, family):
    from diffusers import (ControlNetModel, DDIMScheduler, StableDiffusionControlNetImg2ImgPipeline,
                           StableDiffusionXLControlNetImg2ImgPipeline)

    from ldm_cli import img2img
    from tests.test_img2img import picture

    model, folder, net_dirs = setups[family]
    hint = pattern(7)
    hint.save(tmp_path / "hint.png")
    s = Settings(prompt="a red fox", negative="blurry", steps=4, cfg=6.0, seed=3, scheduler="ddim",
                 strength=0.75, width=64, height=64).resolve({}, model.native_size)
    unit = control_units.ControlUnit(str(net_dirs[0]), str(tmp_path / "hint.png"), 1.2, 0.0, 0.8)
    model.controls = [(unit, controlnet_loading.load(unit.controlnet, model))]
    try:
        mine = np.asarray(img2img.image_to_image(model, [s], [picture()])[0]).astype(np.int16)
    finally:
        model.controls = []
    plain = np.asarray(img2img.image_to_image(model, [s], [picture()])[0]).astype(np.int16)
    assert np.abs(mine - plain).max() > 8  # the ControlNet changed the image
    cls = StableDiffusionXLControlNetImg2ImgPipeline if family == "sdxl" else StableDiffusionControlNetImg2ImgPipeline
    pipe = cls.from_pretrained(folder, controlnet=ControlNetModel.from_pretrained(net_dirs[0]), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(s.prompt, negative_prompt=s.negative, image=picture(), control_image=hint, strength=0.75,
               num_inference_steps=4, guidance_scale=6.0, controlnet_conditioning_scale=1.2, control_guidance_end=0.8,
               height=64, width=64, generator=torch.Generator("cpu").manual_seed(3), output_type="np").images[0]
    ref = (ref * 255).round().astype(np.int16)
    assert mine.std() > 1
    assert np.abs(mine - ref).max() <= 2


def test_inpaint_matches_diffusers_controlnet_inpaint_pipeline(setups, tmp_path):
    from diffusers import ControlNetModel, DDIMScheduler, StableDiffusionControlNetInpaintPipeline

    from ldm_cli import inpaint
    from tests.test_img2img import picture
    from tests.test_inpaint import box_mask

    model, folder, net_dirs = setups["sd1"]
    hint = pattern(8)
    hint.save(tmp_path / "hint.png")
    s = Settings(prompt="a red fox", negative="blurry", steps=4, cfg=6.0, seed=4, scheduler="ddim", strength=1.0,
                 mask_blur=0, only_masked=False, width=64, height=64).resolve({}, model.native_size)
    unit = control_units.ControlUnit(str(net_dirs[1]), str(tmp_path / "hint.png"), 1.0, 0.25, 1.0)
    model.controls = [(unit, controlnet_loading.load(unit.controlnet, model))]
    try:
        mine = np.asarray(inpaint.inpaint(model, [s], [picture()], [box_mask()])[0]).astype(np.int16)
    finally:
        model.controls = []
    plain = np.asarray(inpaint.inpaint(model, [s], [picture()], [box_mask()])[0]).astype(np.int16)
    pipe = StableDiffusionControlNetInpaintPipeline.from_pretrained(
        folder, controlnet=ControlNetModel.from_pretrained(net_dirs[1]), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(s.prompt, negative_prompt=s.negative, image=picture(), mask_image=box_mask(), control_image=hint,
               controlnet_conditioning_scale=1.0,  # this pipeline's default is 0.5
               strength=1.0, num_inference_steps=4, guidance_scale=6.0, control_guidance_start=0.25, height=64,
               width=64, generator=torch.Generator("cpu").manual_seed(4), output_type="np").images[0]
    ref = (ref * 255).round().astype(np.int16)
    inside = np.asarray(box_mask()) >= 128
    assert np.abs(mine - plain)[inside].max() > 8  # the ControlNet changed the repainted part
    assert np.abs(mine - ref)[inside].max() <= 2


def original_layout(net) -> dict:
    """lllyasviel's layout of a diffusers ControlNet, in fp16 as the "pruned" copies ship."""
    from ldm_cli.loading.keymap import UNetNames

    names, out = UNetNames({**net.config, "up_block_types": ()}), {}  # the encoder half alone
    blocks = len(net.controlnet_cond_embedding.blocks)
    for key, value in net.state_dict().items():
        module, _, leaf = key.rpartition(".")
        parts = module.split(".")
        if parts[0] == "controlnet_cond_embedding":
            index = {"conv_in": 0, "conv_out": 2 * (blocks + 1)}.get(parts[1]) if parts[1] != "blocks" else 2 * (int(parts[2]) + 1)
            name = f"input_hint_block.{index}.{leaf}"
        elif parts[0] == "controlnet_down_blocks":
            name = f"zero_convs.{parts[1]}.0.{leaf}"
        elif parts[0] == "controlnet_mid_block":
            name = f"middle_block_out.0.{leaf}"
        else:
            name = names.origin(key).key
        out["control_model." + name] = value.half().contiguous()
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_original_layout_file_loads_every_tensor_in_place(setups, tmp_path, family):
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    model, _, net_dirs = setups[family]
    net = ControlNetModel.from_pretrained(net_dirs[0])
    save_file(original_layout(net), tmp_path / "control_sd_test.safetensors")
    loaded = controlnet_loading.load(str(tmp_path / "control_sd_test.safetensors"), model)
    theirs, ours = net.state_dict(), loaded.state_dict()
    assert theirs.keys() == ours.keys()
    for key, value in theirs.items():
        assert torch.equal(ours[key], value.half().float()), key


def test_batch_lines_each_with_their_own_unit(setups, sd1_folder, tmp_path):
    import json

    from typer.testing import CliRunner

    from ldm_cli import images
    from ldm_cli.cli import app

    _, _, nets = setups["sd1"]
    pattern(1).save(tmp_path / "hint.png")
    lines = [f'--prompt "a fox" --seed 5 --controlnet {nets[0]} --control_image hint.png --control_scale 0.7',
             '--prompt "a fox" --seed 5',
             json.dumps({"prompt": "a fox", "seed": 5, "controlnet": str(nets[1]), "control_image": "hint.png"})]
    (tmp_path / "a.txt").write_text("\n".join(lines[:2]) + "\n")
    (tmp_path / "b.jsonl").write_text(lines[2] + "\n")
    runner = CliRunner()
    saved = []
    for name in ("a.txt", "b.jsonl"):
        result = runner.invoke(app, ["batch", str(tmp_path / name), "--model", str(sd1_folder), "--steps", "2",
                                     "--out", str(tmp_path / name.split(".")[0]), "--json", "--quiet"])
        assert result.exit_code == 0, result.output
        saved += [json.loads(line)["path"] for line in result.output.splitlines() if line.startswith("{")]
    pictures = [np.asarray(Image.open(p)).astype(np.int16) for p in saved]
    assert len(pictures) == 3
    assert np.abs(pictures[0] - pictures[1]).max() > 8 and np.abs(pictures[2] - pictures[1]).max() > 8
    assert 'ControlNet 0: "Module: none, Model: ' in images.read_text_chunks(saved[0])["parameters"]
    assert "ControlNet 0" not in images.read_text_chunks(saved[1])["parameters"]
    with_flags = runner.invoke(app, ["batch", str(tmp_path / "a.txt"), "--model", str(sd1_folder), "--steps", "2",
                                     "--out", str(tmp_path / "f"), "--json", "--quiet", "--controlnet", str(nets[1]),
                                     "--control-image", str(tmp_path / "hint.png")])
    assert with_flags.exit_code == 0, with_flags.output
    texts = sorted(images.read_text_chunks(json.loads(line)["path"])["parameters"]
                   for line in with_flags.output.splitlines() if line.startswith("{"))
    assert [f"Model: {nets[0].name} [" in t for t in texts].count(True) == 1  # the line's own unit replaces
    assert [f"Model: {nets[1].name} [" in t for t in texts].count(True) == 1  # the command's, for the other line
    bad = tmp_path / "bad.txt"
    bad.write_text(f'--prompt "a fox" --controlnet {nets[0]}\n')
    result = runner.invoke(app, ["batch", str(bad), "--model", str(sd1_folder), "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "bad.txt:1: each --controlnet needs its --control-image" in result.output


def test_cli_refuses_unpaired_flags_before_loading(tmp_path):
    from typer.testing import CliRunner

    from ldm_cli.cli import app

    result = CliRunner().invoke(app, ["generate", "a fox", "--model", str(tmp_path / "none"), "--out", str(tmp_path / "o"),
                                      "--controlnet", str(tmp_path), "--controlnet", str(tmp_path),
                                      "--control-image", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip() == ("ldm: error: each --controlnet needs its --control-image "
                                     "(got 2 --controlnet and 1 --control-image)")


def test_crop_and_resize_scales_straight_to_the_target():
    """A 1x60000 strip covering 512x512 would be 512x30720000 pixels scaled whole; straight to the
    target, it is 512x512 at once, and normal images keep the pixels scaling and cropping give (to a rounding)."""
    assert control.crop_and_resize(Image.new("RGB", (1, 60000), "red"), 512, 512).getpixel((5, 5)) == (255, 0, 0)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (480, 640, 3), dtype=np.uint8))
    whole = image.resize((683, 512), Image.Resampling.LANCZOS).crop((85, 0, 597, 512))
    difference = np.asarray(control.crop_and_resize(image, 512, 512), int) - np.asarray(whole, int)
    assert np.abs(difference).max() <= 1 and (difference != 0).mean() < 0.001  # a rounding here and there
