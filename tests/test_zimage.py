"""Z-Image against diffusers' own Z-Image pipelines: the same weights, prompt, seed, scheduler,
steps, CFG and size give the same image within 2/255 per pixel. A tiny Turbo-like model (Qwen3
over the real vocabulary at toy width, FLUX's VAE), loaded from a diffusers folder."""
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_cli import img2img, inpaint, pipeline
from ldm_cli.loading import folder as folders
from ldm_cli.settings import Settings
from tests import flow_parity
from tests.flow_parity import as_pixels, close, load_pairs, pixels

# ZImagePipeline hands every scheduler its sigmas, which only the flow-matching Euler takes
THEIR_SCHEDULERS = {"euler": ("FlowMatchEulerDiscreteScheduler", {})}


@pytest.fixture(scope="module")
def models(zimage_turbo_folder):
    from diffusers import ZImagePipeline

    return load_pairs(ZImagePipeline, {"turbo": zimage_turbo_folder})["turbo"]


def settings(model, **kw) -> Settings:
    base = dict(prompt="a red fox in snow", steps=3, seed=1234, scheduler="euler", width=64, height=64)
    return Settings(**{**base, **kw}).resolve(model.defaults, model.native_size)


def generator(s: Settings) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(s.seed)


def their_kwargs(pipe, s: Settings) -> dict:
    """ZImagePipeline's arguments for these settings: its guidance_scale g is pos + g (pos - neg),
    ldm's --cfg c is neg + c (pos - neg), so g = c - 1 (0: off)."""
    pipe.scheduler = flow_parity.their_scheduler(pipe, THEIR_SCHEDULERS, s.scheduler)
    return dict(negative_prompt=s.negative or None, guidance_scale=s.cfg - 1, num_inference_steps=s.steps,
                height=s.height, width=s.width, generator=generator(s), output_type="np")


@pytest.mark.parametrize("kw", [
    {},
    {"cfg": 3.0, "negative": "blurry"},  # real CFG, as Z-Image Base runs
    {"width": 96, "height": 64, "max_sequence_length": 64},
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


def test_turbo_is_told_and_recommends_its_settings(models):
    ours, _ = models
    assert (ours.family.name, ours.family.flow, ours.size_multiple, ours.native_size) == ("zimage", True, 16,
                                                                                        (1024, 1024))
    assert ours.options["variant"] == "turbo"
    assert {k: ours.defaults[k] for k in ("steps", "cfg", "scheduler", "shift", "max_sequence_length")} == {
        "steps": 9, "cfg": 1.0, "scheduler": "euler", "shift": 3.0, "max_sequence_length": 512}
    assert settings(ours, guidance=4.0).guidance is None  # no distilled guidance: never recorded


def test_a_release_not_named_turbo_is_base_with_cfg(zimage_turbo_folder, tmp_path):
    from ldm_cli import loading

    base = shutil.copytree(zimage_turbo_folder, tmp_path / "Z-Image")
    model = loading.load(str(base))
    assert (model.options["variant"], model.defaults["steps"], model.defaults["cfg"]) == ("base", 50, 5.0)


def test_a_folder_without_its_tokenizer_reads_ldms_copy(models, zimage_turbo_folder, tmp_path):
    from ldm_cli import loading

    bare = shutil.copytree(zimage_turbo_folder, tmp_path / "no-tokenizer-turbo",
                           ignore=shutil.ignore_patterns("tokenizer"))
    model = loading.load(str(bare))
    assert model.tokenizers[0].name_or_path == str(folders.QWEN3_TOKENIZER)
    s = settings(model, steps=2)
    assert np.array_equal(pixels(pipeline.text_to_image(model, [s])[0]),
                          pixels(pipeline.text_to_image(models[0], [s])[0]))


def test_an_image_in_a_batch_is_the_image_alone(models):
    ours, _ = models
    group = [settings(ours, steps=2, prompt="a red fox", seed=1),
             settings(ours, steps=2, prompt="a blue house on a green hill at dusk", seed=2)]
    together = pipeline.text_to_image(ours, group)
    for s, image in zip(group, together):
        assert close(pixels(image), pixels(pipeline.text_to_image(ours, [s])[0]))


def picture() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8))


def test_img2img_matches_diffusers(models):
    from diffusers import ZImageImg2ImgPipeline

    ours, theirs = models
    s = settings(ours, strength=0.6, steps=4, cfg=2.0)
    mine = pixels(img2img.image_to_image(ours, [s], [picture()])[0])
    pipe = ZImageImg2ImgPipeline(**theirs.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = theirs.original_scheduler_config
    ref = pipe(s.prompt, image=picture(), strength=0.6, **their_kwargs(pipe, s)).images[0]
    assert close(mine, as_pixels(ref))


# -- the shipped Qwen tokenizer: Qwen2/Qwen3's published ids
def test_shipped_tokenizer_gives_qwens_ids():
    from tests.tiny_models import qwen3_tokenizer

    tokenizer = qwen3_tokenizer()
    assert len(tokenizer) == 151669
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]) == [
        151643, 151644, 151645, 151667, 151668]
    assert tokenizer("Hello, world!").input_ids == [9707, 11, 1879, 0]
    assert tokenizer("你好").input_ids == [108386]
    assert (tokenizer.pad_token_id, tokenizer.eos_token) == (151643, "<|im_end|>")


def test_the_prompt_goes_in_qwen3s_chat_template():
    from ldm_cli.families import llm_text
    from tests.tiny_models import qwen3_tokenizer

    tokenizer = qwen3_tokenizer()
    text = llm_text.chat(tokenizer, "a red fox", thinking=True)
    assert text == "<|im_start|>user\na red fox<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer(text).input_ids == [151644, 872, 198, 64, 2518, 38835, 151645, 198, 151644, 77091, 198]


@pytest.mark.parametrize("strength", [1.0, 0.8])
def test_inpaint_matches_diffusers(models, strength):
    from diffusers import ZImageInpaintPipeline

    ours, theirs = models
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    s = settings(ours, strength=strength, mask_blur=0, only_masked=False)
    mine = pixels(inpaint.inpaint(ours, [s], [picture()], [mask])[0])
    pipe = ZImageInpaintPipeline(**theirs.components)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = theirs.original_scheduler_config
    ref = pipe(s.prompt, image=picture(), mask_image=mask, strength=strength, **their_kwargs(pipe, s)).images[0]
    assert close(mine[:, :32], as_pixels(ref)[:, :32])
    assert np.array_equal(mine[:, 32:], pixels(picture())[:, 32:])  # kept exactly


def test_fp8_weights_match_diffusers_layerwise_casting(models, zimage_turbo_folder):
    """The timestep and caption embedders cast their input to their weights' dtype: diffusers
    keeps them out of float8 for Z-Image (its _skip_layerwise_casting_patterns), and so does ldm."""
    from diffusers.hooks import apply_layerwise_casting

    from ldm_cli import loading
    from ldm_cli.loading import LoadOptions

    ours = loading.load(str(zimage_turbo_folder), LoadOptions(device="cpu", weights="fp8", offload="model"))
    stored = {n: p.dtype for n, p in ours.denoiser.named_parameters()}
    assert stored["layers.0.attention.to_q.weight"] == torch.float8_e4m3fn
    assert stored["t_embedder.mlp.0.weight"] == stored["cap_embedder.1.weight"] == torch.float32
    s = settings(ours)
    mine = pixels(pipeline.text_to_image(ours, [s])[0])
    _, theirs = models
    pipe = type(theirs).from_pretrained(zimage_turbo_folder, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = theirs.original_scheduler_config
    skipped = ("pos_embed", "patch_embed", "^proj_in$", "^proj_out$", "t_embedder", "cap_embedder")
    apply_layerwise_casting(pipe.transformer, torch.float8_e4m3fn, torch.float32, skipped)
    assert close(mine, as_pixels(pipe(s.prompt, **their_kwargs(pipe, s)).images[0]))
    assert np.abs(mine - pixels(pipeline.text_to_image(models[0], [s])[0])).max() > 0  # it did store float8


def test_a_prompt_past_the_sequence_length_is_cut_with_a_note(models, capsys):
    ours, theirs = models
    s = settings(ours, prompt="a red fox in deep snow under a pale winter sky", max_sequence_length=12)
    mine = pixels(pipeline.text_to_image(ours, [s])[0])
    assert "the prompt is 19 Qwen3 tokens with its chat template, more than --max-sequence-length 12; cut off: ' winter" in (
        capsys.readouterr().err)
    ref = theirs(s.prompt, max_sequence_length=12, **their_kwargs(theirs, s)).images[0]
    assert close(mine, as_pixels(ref))  # cut where diffusers cuts


# -- LoRAs: the shared LoRA code, Z-Image's names (most of its original names are diffusers')
LORA_LAYERS = ("attention.to_q", "attention.to_k", "attention.to_v", "attention.to_out.0", "feed_forward.w1",
               "adaLN_modulation.0")


@pytest.mark.parametrize("prefix", ["transformer", "diffusion_model"])  # diffusers' and ai-toolkit's / ComfyUI's
def test_a_peft_lora_equals_diffusers(zimage_turbo_folder, tmp_path, prefix):
    from diffusers import ZImagePipeline

    from tests import lora_files
    from tests.test_networks_lora import assert_same, load, merged, reference

    model = load(zimage_turbo_folder)
    layers = lora_files.layers(model.denoiser, LORA_LAYERS)
    path = lora_files.write(tmp_path / "fox.safetensors", lora_files.peft(layers, prefix))
    merged(model, path, 0.7, 0.7)  # each layer once: its original name is its diffusers name
    assert_same(model.denoiser, reference(ZImagePipeline, zimage_turbo_folder, path, 0.7).transformer)


def test_a_lora_on_the_original_fused_qkv_is_split_in_thirds(zimage_turbo_folder, tmp_path):
    """Tongyi's names (`attention.qkv`, `attention.out`), which diffusers' loader does not read."""
    from tests import lora_files
    from tests.test_networks_lora import load, merged

    model = load(zimage_turbo_folder)
    attention = model.denoiser.layers[0].attention
    before = {n: getattr(attention, n).weight.clone() for n in ("to_q", "to_k", "to_v")}
    key = "diffusion_model.layers.0.attention.qkv"
    lora = {f"{key}.lora_A.weight": torch.randn(4, 32), f"{key}.lora_B.weight": torch.randn(96, 4)}
    merged(model, lora_files.write(tmp_path / "qkv.safetensors", lora), 0.5, 0.5)
    rows = (0.5 * lora[f"{key}.lora_B.weight"] @ lora[f"{key}.lora_A.weight"]).chunk(3)
    for (name, old), delta in zip(before.items(), rows):
        assert torch.allclose(getattr(attention, name).weight, old + delta, atol=1e-5)


def test_a_kohya_lora_merges_as_the_same_peft_one(zimage_turbo_folder, tmp_path):
    from tests import lora_files
    from tests.test_networks_lora import assert_same, load, merged

    kohya, peft = load(zimage_turbo_folder), load(zimage_turbo_folder)
    layers = lora_files.layers(kohya.denoiser, LORA_LAYERS)  # the same factors in both (one seed, one order)
    merged(kohya, lora_files.write(tmp_path / "kohya.safetensors", lora_files.kohya(layers, "lora_unet_")), 0.7, 0.7)
    merged(peft, lora_files.write(tmp_path / "peft.safetensors", lora_files.peft(layers, "transformer")), 0.7, 0.7)
    assert_same(kohya.denoiser, peft.denoiser)
    plain = load(zimage_turbo_folder).denoiser.layers[0].feed_forward.w1.weight
    assert not torch.equal(kohya.denoiser.layers[0].feed_forward.w1.weight, plain)
