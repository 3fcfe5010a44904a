"""Qwen-Image against diffusers' own Qwen-Image pipelines: the same weights, prompt, seed, scheduler,
steps, CFG and size give the same image within 2/255 per pixel. A tiny model (Qwen2.5-VL over the
real vocabulary at toy width with its vision tower, the video VAE), loaded from a diffusers folder."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_cli import img2img, inpaint, pipeline
from ldm_cli.settings import Settings
from tests import flow_parity
from tests.flow_parity import as_pixels, close, load_pairs, pixels

# QwenImagePipeline hands every scheduler its sigmas and mu, which only the flow-matching Euler takes
THEIR_SCHEDULERS = {"euler": ("FlowMatchEulerDiscreteScheduler", {})}


@pytest.fixture(scope="module")
def models(qwen_image_folder):
    from diffusers import QwenImagePipeline

    return load_pairs(QwenImagePipeline, {"qwen": qwen_image_folder})["qwen"]


def settings(model, **kw) -> Settings:
    base = dict(prompt="a red fox in snow", steps=3, seed=1234, scheduler="euler", width=64, height=64, cfg=1.0)
    return Settings(**{**base, **kw}).resolve(model.defaults, model.native_size)


def their_kwargs(pipe, s: Settings) -> dict:
    """QwenImagePipeline's arguments for these settings: ldm's --cfg is its true_cfg_scale, which it
    applies only with a negative prompt (an empty one is a prompt)."""
    pipe.scheduler = flow_parity.their_scheduler(pipe, THEIR_SCHEDULERS, s.scheduler)
    return dict(negative_prompt=s.negative if s.cfg > 1 else None, true_cfg_scale=s.cfg,
                num_inference_steps=s.steps, height=s.height, width=s.width,
                generator=torch.Generator("cpu").manual_seed(s.seed), output_type="np")


@pytest.mark.parametrize("kw", [
    {},
    {"cfg": 4.0, "negative": "blurry"},  # true CFG with its norm rescale, as Qwen-Image runs
    {"cfg": 30.0, "negative": "blurry"},  # far enough from the conditional output that the rescale shows
    {"cfg": 2.5, "negative": "", "prompt": "a blue house on a green hill at dusk, with long shadows"},
    {"width": 96, "height": 64, "max_sequence_length": 8},  # the prompt cut
])
def test_txt2img_matches_diffusers(models, kw):
    ours, theirs = models
    s = settings(ours, **kw)
    mine = pixels(pipeline.text_to_image(ours, [s])[0])
    ref = theirs(s.prompt, max_sequence_length=s.max_sequence_length, **their_kwargs(theirs, s)).images[0]
    assert close(mine, as_pixels(ref))


def test_cfg_changes_the_image_and_1_is_off(models):
    ours, _ = models
    s = settings(ours, negative="blurry")
    plain = pixels(pipeline.text_to_image(ours, [s])[0])
    assert np.array_equal(plain, pixels(pipeline.text_to_image(ours, [s.merged(negative="")])[0]))
    assert np.abs(plain - pixels(pipeline.text_to_image(ours, [s.merged(cfg=3.0)])[0])).max() > 2


def test_the_norm_rescale_is_the_pipelines_and_acts(models):
    """QwenImagePipeline's arithmetic on its packed tokens; without it the tiny model's image at cfg
    30 is off by 8/255, more than the 2/255 the parity tests allow."""
    import dataclasses

    from ldm_cli.families import flux, qwen_image

    cond, comb = torch.randn(2, 16, 8, 6), torch.randn(2, 16, 8, 6) * 3
    packed = flux.pack(comb) * (torch.norm(flux.pack(cond), dim=-1, keepdim=True)
                                / torch.norm(flux.pack(comb), dim=-1, keepdim=True))
    assert torch.allclose(qwen_image.renorm(cond, comb), flux.unpack(packed, 8, 6))
    ours, _ = models
    s = settings(ours, cfg=30.0, negative="blurry")
    plain = dataclasses.replace(ours, family=dataclasses.replace(ours.family, guided=None))
    assert np.abs(pixels(pipeline.text_to_image(ours, [s])[0]) - pixels(pipeline.text_to_image(plain, [s])[0])).max() > 4


def test_the_family_is_told_and_recommends_the_pipelines_settings(models):
    ours, _ = models
    assert (ours.family.name, ours.family.flow, ours.size_multiple, ours.native_size, ours.latent_channels) == (
        "qwen-image", True, 16, (1024, 1024), 16)
    assert {k: ours.defaults[k] for k in ("steps", "cfg", "scheduler", "shift", "max_sequence_length")} == {
        "steps": 50, "cfg": 4.0, "scheduler": "euler", "shift": None, "max_sequence_length": 512}
    assert type(ours.text_encoders[0]).__name__ == "Qwen2_5_VLTextModel"  # the vision tower is not loaded


def test_a_folder_without_its_tokenizer_reads_ldms_copy(models, qwen_image_folder, tmp_path):
    from ldm_cli import loading
    from ldm_cli.loading.recipe import QWEN25VL_TOKENIZER

    bare = shutil.copytree(qwen_image_folder, tmp_path / "no-tokenizer", ignore=shutil.ignore_patterns("tokenizer"))
    model = loading.load(str(bare))
    assert model.tokenizers[0].name_or_path == str(QWEN25VL_TOKENIZER)
    s = settings(model, steps=2)
    assert np.array_equal(pixels(pipeline.text_to_image(model, [s])[0]),
                          pixels(pipeline.text_to_image(models[0], [s])[0]))


def test_an_image_in_a_batch_is_the_image_alone(models):
    ours, _ = models
    group = [settings(ours, steps=2, prompt="a red fox", seed=1, cfg=3.0),
             settings(ours, steps=2, prompt="a blue house on a green hill at dusk", seed=2, cfg=3.0)]
    together = pipeline.text_to_image(ours, group)
    for s, image in zip(group, together):
        assert close(pixels(image), pixels(pipeline.text_to_image(ours, [s])[0]))


def picture() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8))


def their_pipe(cls, theirs):
    pipe = cls(**theirs.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = theirs.original_scheduler_config
    return pipe


@pytest.mark.parametrize("cfg", [1.0, 3.0])
def test_img2img_matches_diffusers(models, cfg):
    from diffusers import QwenImageImg2ImgPipeline

    ours, theirs = models
    s = settings(ours, strength=0.6, steps=4, cfg=cfg, negative="blurry")
    mine = pixels(img2img.image_to_image(ours, [s], [picture()])[0])
    pipe = their_pipe(QwenImageImg2ImgPipeline, theirs)
    ref = pipe(s.prompt, image=picture(), strength=0.6, **their_kwargs(pipe, s)).images[0]
    assert close(mine, as_pixels(ref))


@pytest.mark.parametrize("strength", [1.0, 0.8])
def test_inpaint_matches_diffusers(models, strength):
    from diffusers import QwenImageInpaintPipeline

    ours, theirs = models
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    s = settings(ours, strength=strength, mask_blur=0, only_masked=False)
    mine = pixels(inpaint.inpaint(ours, [s], [picture()], [mask])[0])
    pipe = their_pipe(QwenImageInpaintPipeline, theirs)
    ref = pipe(s.prompt, image=picture(), mask_image=mask, strength=strength, **their_kwargs(pipe, s)).images[0]
    assert close(mine[:, :32], as_pixels(ref)[:, :32])
    assert np.array_equal(mine[:, 32:], pixels(picture())[:, 32:])  # kept exactly


def test_a_prompt_past_the_sequence_length_is_cut_with_a_note(models, capsys):
    ours, _ = models
    s = settings(ours, prompt="a red fox in deep snow under a pale winter sky", max_sequence_length=8)
    pipeline.text_to_image(ours, [s])
    assert "more than --max-sequence-length 8; cut off: ' pale winter sky" in capsys.readouterr().err


# -- the shipped Qwen2.5-VL tokenizer: Qwen2's vocabulary, Qwen2.5's added tokens
def test_shipped_tokenizer_is_qwen25s():
    from tests.tiny_models import qwen25vl_tokenizer

    tokenizer = qwen25vl_tokenizer()
    assert len(tokenizer) == 151665
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|file_sep|>"]) == [
        151643, 151644, 151645, 151664]
    assert tokenizer("Hello, world!").input_ids == [9707, 11, 1879, 0]
    assert tokenizer("<think>").input_ids == [13708, 766, 29]  # Qwen3's token, plain text to Qwen2.5
    assert (tokenizer.pad_token_id, tokenizer.padding_side) == (151643, "right")


def test_the_template_head_is_the_34_tokens_dropped():
    from ldm_cli.families import qwen_image
    from tests.tiny_models import qwen25vl_tokenizer

    tokenizer = qwen25vl_tokenizer()
    ids = tokenizer(qwen_image.TEMPLATE.format("a red fox")).input_ids
    assert ids[qwen_image.DROP - 3:qwen_image.DROP] == tokenizer("<|im_start|>user\n").input_ids
    assert tokenizer.decode(ids[qwen_image.DROP:]) == "a red fox<|im_end|>\n<|im_start|>assistant\n"


# -- through the CLI
def test_metadata_and_replay(qwen_image_folder, tmp_path):
    from typer.testing import CliRunner

    from ldm_cli.cli import app

    first = CliRunner().invoke(app, ["generate", "a red fox", "--model", str(qwen_image_folder), "--steps", "2",
                                     "--seed", "5", "-W", "64", "-H", "64", "--negative", "blurry",
                                     "--out", str(tmp_path / "a")])
    assert first.exit_code == 0, first.output
    [png] = (tmp_path / "a").glob("*.png")
    text = Image.open(png).text["parameters"]
    assert "Negative prompt: blurry\nSteps: 2, Sampler: Euler, Schedule type: Simple, CFG scale: 4, Seed: 5," in text
    assert "Model: tiny-qwen-image, Max sequence length: 512," in text and "Shift" not in text
    again = CliRunner().invoke(app, ["generate", "--from-png", str(png), "--model", str(qwen_image_folder),
                                     "--out", str(tmp_path / "b")])
    assert again.exit_code == 0, again.output
    [replay] = (tmp_path / "b").glob("*.png")
    assert np.array_equal(np.asarray(Image.open(png)), np.asarray(Image.open(replay)))


# -- LoRAs: the shared LoRA code; Qwen-Image's original names are diffusers' own
LORA_LAYERS = ("attn.to_q", "attn.to_k", "attn.add_v_proj", "attn.to_out.0", "attn.to_add_out", "img_mlp.net.0.proj",
               "txt_mlp.net.2", "img_mod.1")


@pytest.mark.parametrize("prefix", ["transformer", "diffusion_model"])  # diffusers' and ai-toolkit's / ComfyUI's
def test_a_peft_lora_equals_diffusers(qwen_image_folder, tmp_path, prefix):
    from diffusers import QwenImagePipeline

    from tests import lora_files
    from tests.test_networks_lora import assert_same, load, merged, reference

    model = load(qwen_image_folder)
    layers = lora_files.layers(model.denoiser, LORA_LAYERS)
    assert len(layers) == len(LORA_LAYERS)
    path = lora_files.write(tmp_path / "fox.safetensors", lora_files.peft(layers, prefix))
    merged(model, path, 0.7, 0.7)
    assert_same(model.denoiser, reference(QwenImagePipeline, qwen_image_folder, path, 0.7).transformer)
    plain = load(qwen_image_folder).denoiser.transformer_blocks[0].attn.to_add_out.weight
    assert not torch.equal(model.denoiser.transformer_blocks[0].attn.to_add_out.weight, plain)


def test_a_kohya_lora_merges_as_the_same_peft_one(qwen_image_folder, tmp_path):
    from tests import lora_files
    from tests.test_networks_lora import assert_same, load, merged

    kohya, peft = load(qwen_image_folder), load(qwen_image_folder)
    layers = lora_files.layers(kohya.denoiser, LORA_LAYERS)
    merged(kohya, lora_files.write(tmp_path / "kohya.safetensors", lora_files.kohya(layers, "lora_unet_")), 0.7, 0.7)
    merged(peft, lora_files.write(tmp_path / "peft.safetensors", lora_files.peft(layers, "transformer")), 0.7, 0.7)
    assert_same(kohya.denoiser, peft.denoiser)
    plain = load(qwen_image_folder).denoiser.transformer_blocks[0].img_mlp.net[0].proj.weight
    assert not torch.equal(kohya.denoiser.transformer_blocks[0].img_mlp.net[0].proj.weight, plain)


def test_fp8_weights_match_diffusers_layerwise_casting(models, qwen_image_folder):
    """--weights fp8: the transformer's Linears stored in float8 but its position embedding and
    output projection (diffusers' defaults; ldm's choice about "norm" as for every family)."""
    from diffusers.hooks import apply_layerwise_casting

    from ldm_cli import loading, memory
    from ldm_cli.loading import LoadOptions

    ours = loading.load(str(qwen_image_folder), LoadOptions(device="cpu", weights="fp8", offload="model"))
    stored = {n: p.dtype for n, p in ours.denoiser.named_parameters()}
    assert stored["transformer_blocks.0.attn.to_q.weight"] == torch.float8_e4m3fn
    assert stored["proj_out.weight"] == torch.float32
    s = settings(ours, cfg=3.0, negative="blurry")
    mine = pixels(pipeline.text_to_image(ours, [s])[0])
    _, theirs = models
    pipe = type(theirs).from_pretrained(qwen_image_folder, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = theirs.original_scheduler_config
    apply_layerwise_casting(pipe.transformer, torch.float8_e4m3fn, torch.float32, memory.fp8_skipped(pipe.transformer))
    assert close(mine, as_pixels(pipe(s.prompt, **their_kwargs(pipe, s)).images[0]))
    assert np.abs(mine - pixels(pipeline.text_to_image(models[0], [s])[0])).max() > 0  # it did store float8


def test_a_lightning_style_lora_equals_diffusers(qwen_image_folder, tmp_path):
    """Qwen-Image-Lightning's layout: diffusers' module names alone, kohya's factors and alphas."""
    from diffusers import QwenImagePipeline

    from tests import lora_files
    from tests.test_networks_lora import assert_same, load, merged, reference

    model = load(qwen_image_folder)
    g, lora = torch.Generator().manual_seed(0), {}
    for name, module in lora_files.layers(model.denoiser, LORA_LAYERS):
        lora[f"{name}.lora_down.weight"], lora[f"{name}.lora_up.weight"] = lora_files.factors(module, 4, g)
        lora[f"{name}.alpha"] = torch.tensor(2.0)
    path = lora_files.write(tmp_path / "Qwen-Image-Lightning-8steps.safetensors", lora)
    merged(model, path, 0.7, 0.7)
    assert_same(model.denoiser, reference(QwenImagePipeline, qwen_image_folder, path, 0.7).transformer)
    plain = load(qwen_image_folder).denoiser.transformer_blocks[0].attn.to_add_out.weight
    assert not torch.equal(model.denoiser.transformer_blocks[0].attn.to_add_out.weight, plain)
