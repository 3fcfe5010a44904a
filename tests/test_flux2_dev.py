"""FLUX.2 dev against diffusers' Flux2Pipeline: the same weights, prompt, seed, steps, embedded
guidance and size give the same image within 2/255 per pixel. A tiny model (Mistral Small 3.x as
Mistral3ForConditionalGeneration over Tekken's vocabulary at toy width, 31 layers deep for the
pipeline's 10/20/30; the transformer with its guidance embedding), loaded from a diffusers folder."""
import numpy as np
import pytest
import torch

from ldm_cli import pipeline
from ldm_cli.settings import Settings
from tests import flow_parity
from tests.flow_parity import as_pixels, close, load_pairs, pixels

THEIR_SCHEDULERS = {"euler": ("FlowMatchEulerDiscreteScheduler", {})}


@pytest.fixture(scope="module")
def models(flux2_dev_folder):
    from diffusers import Flux2Pipeline

    return load_pairs(Flux2Pipeline, {"dev": flux2_dev_folder})["dev"]


def settings(model, **kw) -> Settings:
    base = dict(prompt="a red fox in snow", steps=3, seed=1234, scheduler="euler", width=64, height=64,
                max_sequence_length=64)
    return Settings(**{**base, **kw}).resolve(model.defaults, model.native_size)


def theirs_for(pipe, s: Settings):
    pipe.scheduler = flow_parity.their_scheduler(pipe, THEIR_SCHEDULERS, s.scheduler)
    return pipe(prompt=s.prompt, guidance_scale=s.guidance, num_inference_steps=s.steps, height=s.height,
                width=s.width, generator=torch.Generator("cpu").manual_seed(s.seed),
                max_sequence_length=s.max_sequence_length, output_type="np").images[0]


@pytest.mark.parametrize("kw", [
    {},  # guidance 4, the pipeline's default
    {"guidance": 2.0, "width": 96, "height": 64, "steps": 4},
    {"prompt": "a [IMG]blue house on a hill, at dusk"},  # "[IMG]" removed, as the pipeline does
])
def test_txt2img_matches_diffusers(models, kw):
    ours, theirs = models
    s = settings(ours, **kw)
    assert close(pixels(pipeline.text_to_image(ours, [s])[0]), as_pixels(theirs_for(theirs, s)))


def test_the_prompt_is_the_pipelines(models):
    """The same ids and states as Flux2Pipeline's encode_prompt: system turn, layers 10/20/30."""
    from ldm_cli.families import flux2

    ours, theirs = models
    s = settings(ours)
    mine = flux2.encode(ours, ["a red fox"], s, negative=False)
    their_states, _ = theirs.encode_prompt("a red fox", device=torch.device("cpu"), max_sequence_length=64)
    assert torch.allclose(mine["encoder_hidden_states"], their_states, atol=1e-5)
    assert mine["guidance"].tolist() == [4.0] and mine["guidance"].dtype == torch.float32


def test_dev_is_told_and_recommends_its_settings(models):
    ours, _ = models
    assert (ours.family.name, ours.options["variant"], ours.denoiser.config.guidance_embeds) == ("flux2", "dev", True)
    pick = ("steps", "cfg", "guidance", "scheduler", "shift", "max_sequence_length")
    assert {k: ours.defaults[k] for k in pick} == {"steps": 50, "cfg": 1.0, "guidance": 4.0, "scheduler": "euler",
                                                   "shift": None, "max_sequence_length": 512}
    assert type(ours.text_encoders[0]).__name__ == "MistralModel"  # the language model alone


def test_guidance_changes_the_image_and_is_recorded(models):
    ours, _ = models
    s = settings(ours, steps=2)
    low = pixels(pipeline.text_to_image(ours, [s.merged(guidance=1.0)])[0])
    assert np.abs(low - pixels(pipeline.text_to_image(ours, [s])[0])).max() > 2
    assert "CFG scale: 1, Distilled CFG Scale: 4, Seed: 1234" in s.to_infotext("test")
