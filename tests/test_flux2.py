"""FLUX.2 klein against diffusers' Flux2KleinPipeline: the same weights, prompt, seed, scheduler,
steps, CFG and size give the same image within 2/255 per pixel. Tiny step-distilled and base
models (Qwen3 over the real vocabulary at toy width, 28 layers deep for the pipeline's 9/18/27;
FLUX.2's VAE with random BatchNorm statistics), loaded from diffusers folders."""
import numpy as np
import pytest
import torch
from PIL import Image

from ldm_cli import img2img, inpaint, pipeline
from ldm_cli.settings import Settings
from tests import flow_parity
from tests.flow_parity import as_pixels, close, load_pairs, pixels

# Flux2KleinPipeline hands the scheduler FLUX's sigmas and its own mu: flow Euler takes both
THEIR_SCHEDULERS = {"euler": ("FlowMatchEulerDiscreteScheduler", {})}


@pytest.fixture(scope="module")
def models(flux2_klein_folder, flux2_klein_base_folder):
    from diffusers import Flux2KleinPipeline

    return load_pairs(Flux2KleinPipeline, {"distilled": flux2_klein_folder, "base": flux2_klein_base_folder})


def settings(model, **kw) -> Settings:
    base = dict(prompt="a red fox in snow", steps=3, seed=1234, scheduler="euler", width=64, height=64,
                max_sequence_length=64)
    return Settings(**{**base, **kw}).resolve(model.defaults, model.native_size)


def theirs_for(pipe, s: Settings) -> Image.Image:
    """Flux2KleinPipeline's image for these settings; ldm's negative prompt given as its embeddings
    (the pipeline itself always encodes "")."""
    pipe.scheduler = flow_parity.their_scheduler(pipe, THEIR_SCHEDULERS, s.scheduler)
    negative = None
    if s.negative:
        negative, _ = pipe.encode_prompt(s.negative, device=torch.device("cpu"),
                                         max_sequence_length=s.max_sequence_length)
    return pipe(prompt=s.prompt, negative_prompt_embeds=negative, guidance_scale=s.cfg, num_inference_steps=s.steps,
                height=s.height, width=s.width, generator=torch.Generator("cpu").manual_seed(s.seed),
                max_sequence_length=s.max_sequence_length, output_type="np").images[0]


@pytest.mark.parametrize("variant, kw", [
    ("distilled", {}),  # no CFG: the distilled release's default
    ("distilled", {"width": 96, "height": 64, "steps": 4}),
    ("base", {}),  # real CFG at the base release's default 4, against ""
    ("base", {"cfg": 2.5, "negative": "blurry"}),
])
def test_txt2img_matches_diffusers(models, variant, kw):
    ours, theirs = models[variant]
    s = settings(ours, **kw)
    mine = pixels(pipeline.text_to_image(ours, [s])[0])
    assert close(mine, as_pixels(theirs_for(theirs, s)))


def test_variants_are_told_and_recommend_their_settings(models):
    distilled, base = models["distilled"][0], models["base"][0]
    assert (distilled.family.name, distilled.family.flow, distilled.size_multiple, distilled.native_size,
            distilled.latent_channels) == ("flux2", True, 16, (1024, 1024), 32)
    assert (distilled.options["variant"], base.options["variant"]) == ("distilled", "base")
    pick = ("steps", "cfg", "scheduler", "shift", "max_sequence_length")
    assert {k: distilled.defaults[k] for k in pick} == {"steps": 4, "cfg": 1.0, "scheduler": "euler", "shift": None,
                                                        "max_sequence_length": 512}
    assert (base.defaults["steps"], base.defaults["cfg"]) == (50, 4.0)
    assert settings(distilled, guidance=4.0).guidance is None  # no distilled guidance: never recorded


def test_the_empirical_shift_is_diffusers():
    from diffusers.pipelines.flux2.pipeline_flux2_klein import compute_empirical_mu

    from ldm_cli.families import flux2

    for tokens, steps in [(16, 4), (1024, 4), (4096, 50), (4301, 28), (9000, 4)]:
        assert flux2.mu(tokens, steps) == compute_empirical_mu(tokens, steps)


def test_cfg_changes_the_image_and_1_is_off(models):
    ours, _ = models["base"]
    s = settings(ours, negative="blurry", cfg=1.0)
    plain = pixels(pipeline.text_to_image(ours, [s])[0])
    assert np.array_equal(plain, pixels(pipeline.text_to_image(ours, [s.merged(negative="")])[0]))
    assert np.abs(plain - pixels(pipeline.text_to_image(ours, [s.merged(cfg=3.0)])[0])).max() > 2


def test_an_image_in_a_batch_is_the_image_alone(models):
    ours, _ = models["distilled"]
    group = [settings(ours, steps=2, prompt="a red fox", seed=1),
             settings(ours, steps=2, prompt="a blue house on a green hill at dusk", seed=2)]
    together = pipeline.text_to_image(ours, group)
    for s, image in zip(group, together):
        assert close(pixels(image), pixels(pipeline.text_to_image(ours, [s])[0]))


def test_the_packed_latents_round_trip_through_the_vae(models):
    """to_latents packs and normalises as the pipeline's _encode_vae_image; from_latents undoes it
    as its decode does."""
    from ldm_cli.families import flux2

    ours, theirs = models["distilled"]
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        mine = flux2.to_latents(ours.vae, ours.vae.encode(image).latent_dist, None)
        assert torch.allclose(mine, theirs._encode_vae_image(image, None), atol=1e-5)
        raw = theirs._unpatchify_latents(mine * torch.sqrt(theirs.vae.bn.running_var.view(1, -1, 1, 1) + 1e-4)
                                         + theirs.vae.bn.running_mean.view(1, -1, 1, 1))
        assert torch.allclose(flux2.from_latents(ours.vae, mine), raw, atol=1e-5)


def picture() -> Image.Image:
    y, x = np.mgrid[0:64, 0:64]
    return Image.fromarray(np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.uint8))


def test_img2img_is_ldms_path_and_keeps_the_picture_at_low_strength(models):
    """diffusers has no FLUX.2 img2img (klein's image input is a reference it attends to, and its
    inpainting pipeline adds one too): ldm's own path, noising the packed latents to the strength's
    first step, as for every flow family."""
    ours, _ = models["distilled"]
    s = settings(ours, steps=4)
    low = pixels(img2img.image_to_image(ours, [s.merged(strength=0.25)], [picture()])[0])
    high = pixels(img2img.image_to_image(ours, [s.merged(strength=1.0)], [picture()])[0])
    source = pixels(picture())
    assert np.abs(low - source).mean() < np.abs(high - source).mean()


def test_inpaint_keeps_what_is_outside_the_mask(models):
    """ldm's inpainting (diffusers' klein inpainting also attends to the image as a reference: not
    compared): the packed latents blended by a mask at a sixteenth of the image."""
    ours, _ = models["distilled"]
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    s = settings(ours, strength=1.0, mask_blur=0, only_masked=False)
    mine = pixels(inpaint.inpaint(ours, [s], [picture()], [mask])[0])
    assert np.array_equal(mine[:, 32:], pixels(picture())[:, 32:])
    assert np.abs(mine[:, :32] - pixels(picture())[:, :32]).mean() > 10


def test_fp8_weights_match_diffusers_layerwise_casting(models, flux2_klein_folder):
    """--weights fp8 stores the transformer in float8 as diffusers' layerwise casting does, with its
    default skips less "norm" (ldm's rule for every DiT: FLUX.2 has no norm with a Linear worth keeping)."""
    from diffusers.hooks import apply_layerwise_casting

    from ldm_cli import loading
    from ldm_cli.loading import LoadOptions

    ours = loading.load(str(flux2_klein_folder), LoadOptions(device="cpu", weights="fp8", offload="model"))
    stored = {n: p.dtype for n, p in ours.denoiser.named_parameters()}
    assert stored["transformer_blocks.0.attn.to_q.weight"] == torch.float8_e4m3fn
    s = settings(ours)
    mine = pixels(pipeline.text_to_image(ours, [s])[0])
    _, theirs = models["distilled"]
    pipe = type(theirs).from_pretrained(flux2_klein_folder, dtype=torch.float32, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.original_scheduler_config = theirs.original_scheduler_config
    apply_layerwise_casting(pipe.transformer, torch.float8_e4m3fn, torch.float32,
                            ("pos_embed", "patch_embed", "^proj_in$", "^proj_out$"))
    assert close(mine, as_pixels(theirs_for(pipe, s)))
    assert np.abs(mine - pixels(pipeline.text_to_image(models["distilled"][0], [s])[0])).max() > 0  # it did store float8
