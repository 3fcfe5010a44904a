"""Prompt editing, alternation and AND in the one sampling loop: the conditioning each step
uses, how the denoiser's rows combine, and whole images on a tiny SD1 model."""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_cli import conditioning, guidance, loading, pipeline, sampling
from ldm_cli.families.family import Family
from ldm_cli.guidance import Schedule
from ldm_cli.settings import Settings


def cond(value, length=3):
    return {"encoder_hidden_states": torch.full((1, length, 2), float(value))}


class Recorder:
    """A model whose denoiser answers each row with its conditioning's value, and a scheduler
    that keeps the last answer: the loop's arithmetic laid bare."""

    def __init__(self):
        self.calls = []
        family = Family("fake", encode=None, predict=self.predict)
        self.model = SimpleNamespace(family=family)

    def predict(self, model, x, t, c):
        context = c["encoder_hidden_states"]
        self.calls.append((int(t), context[:, 0, 0].tolist(), context.shape[1]))
        return context.mean(dim=(1, 2)).view(-1, 1, 1, 1).expand(x.shape[0], *x.shape[1:]).clone()

    def step(self, out, t, latents, return_dict=False):
        return (out,)

    def run(self, positive, negative, cfg, steps=4, images=1):
        latents = torch.zeros(images, 1, 1, 1)
        return sampling.denoise(self.model, self, latents, positive, negative, cfg, [], torch.arange(steps))


def test_a1111s_step_choice():
    s = Schedule([2, 5], [cond(1), cond(2)])
    assert [s.at(i)["encoder_hidden_states"][0, 0, 0].item() for i in range(8)] == [1, 1, 1, 2, 2, 2, 1, 1]


def test_the_loop_switches_conditioning_at_the_schedules_steps():
    rec = Recorder()
    rec.run([[(1.0, Schedule([1, 4], [cond(1), cond(2)]))]], [Schedule([0, 4], [cond(-1), cond(-2)])], 3.0)
    # rows: the negative first, then the positive; one call per step while their shapes agree
    assert [values for _, values, _ in rec.calls] == [[-1, 1], [-2, 1], [-2, 2], [-2, 2]]


def test_and_parts_pull_by_their_weights():
    rec = Recorder()
    positive = [[(1.0, Schedule.fixed(cond(1))), (0.5, Schedule.fixed(cond(5)))], [(2.0, Schedule.fixed(cond(3)))]]
    out = rec.run(positive, [Schedule.fixed(cond(0)), Schedule.fixed(cond(1))], 2.0, steps=1, images=2)
    # image 0: 0 + (1 - 0) * 1 * 2 + (5 - 0) * 0.5 * 2; image 1: 1 + (3 - 1) * 2 * 2
    assert out.flatten().tolist() == [7.0, 9.0]
    assert rec.calls[0][1] == [0, 1, 1, 3, 5]  # negatives, first parts, second parts


def test_cfg_one_with_a_single_weight_one_part_skips_the_negative():
    rec = Recorder()
    out = rec.run([[(1.0, Schedule.fixed(cond(4)))]], [Schedule.fixed(cond(9))], 1.0, steps=1)
    assert rec.calls[0][1] == [4] and out.item() == 4
    rec = Recorder()
    out = rec.run([[(2.0, Schedule.fixed(cond(4)))]], [Schedule.fixed(cond(1))], 1.0, steps=1)
    assert out.item() == 7  # a weight of 2 still guides: 1 + (4 - 1) * 2


def test_rows_of_other_lengths_run_in_their_own_calls():
    rec = Recorder()
    out = rec.run([[(1.0, Schedule.fixed(cond(3, length=6)))]], [Schedule.fixed(cond(1, length=3))], 2.0, steps=1)
    assert sorted((values, length) for _, values, length in rec.calls) == [([1.0], 3), ([3.0], 6)]
    assert out.item() == 5


def test_batched_conds_still_work():
    rec = Recorder()
    both = {"encoder_hidden_states": torch.tensor([[[1.0]], [[2.0]]])}
    out = rec.run(both, {"encoder_hidden_states": torch.zeros(2, 1, 1)}, 2.0, steps=1, images=2)
    assert out.flatten().tolist() == [2.0, 4.0]


def test_an_images_parts_are_padded_with_their_last_vector():
    short, long = cond(1, length=2), cond(2, length=5)
    short["encoder_hidden_states"][0, -1] = 7.0
    parts = guidance.padded_parts([(1.0, Schedule.fixed(short)), (1.0, Schedule.fixed(long))])
    padded = parts[0][1].conds[0]["encoder_hidden_states"]
    assert padded.shape == (1, 5, 2) and padded[0, 2:].eq(7.0).all()


# -- whole images -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model(sd1_folder):
    return loading.load(str(sd1_folder))


def render(model, prompts, first_seed=3):
    group = [Settings(prompt=p, negative="blurry", steps=4, cfg=6.0, seed=first_seed + i, scheduler="euler_a")
             .resolve({}, model.native_size) for i, p in enumerate(prompts)]
    return [np.asarray(im).astype(np.int16) for im in pipeline.text_to_image(model, group)]


def test_prompt_editing_changes_the_image_and_equal_halves_do_not(model):
    plain, edited, same = render(model, ["a red fox"]) + render(model, ["a [blue:red:2] fox"]) \
        + render(model, ["a [red:red:2] fox"])
    assert np.abs(plain - edited).max() > 2
    assert np.abs(plain - same).max() <= 1


def test_and_of_two_halves_is_the_prompt(model):
    plain, halves = render(model, ["a red fox"])[0], render(model, ["a red fox:0.5 AND a red fox:0.5"])[0]
    assert np.abs(plain - halves).max() <= 1
    assert np.abs(plain - render(model, ["a red fox AND snow:0.7"])[0]).max() > 2


def test_images_of_a_batch_keep_their_own_schedules(model):
    prompts = ["a red fox", "a [red|blue] fox", "[a fox:a cat:0.5] in snow", "a fox AND a cat:0.4", "a fox, " * 30]
    together = render(model, prompts)
    alone = [render(model, [p], first_seed=3 + i)[0] for i, p in enumerate(prompts)]
    for t, a in zip(together, alone):
        assert np.abs(t - a).max() <= 2


def test_lora_tags_are_not_encoded(model):
    assert np.abs(render(model, ["a red fox <lora:x:0.8>"])[0] - render(model, ["a red fox "])[0]).max() == 0
    assert conditioning.positive_text("<hypernet:h:1>a fox") == "a fox"


# A1111 1.10's samplers flagged "second_order" (sd_samplers_kdiffusion.py; none of
# sd_samplers_timesteps.py's): their prompt schedules span twice the steps (processing.py)
A1111_SECOND_ORDER = {"heun", "dpm2", "dpm2_a", "dpmpp_sde", "dpmpp_2s_a", "restart"}


def positive_rows(model, monkeypatch, s: Settings) -> list[torch.Tensor]:
    """The positive row's text states of each denoiser call while `s` renders (the negative's row
    comes first)."""
    import dataclasses

    seen, predict = [], model.family.predict

    def recording(m, x, t, c):
        seen.append(c["encoder_hidden_states"][1].clone())
        return predict(m, x, t, c)
    monkeypatch.setattr(model, "family", dataclasses.replace(model.family, predict=recording))
    pipeline.text_to_image(model, [s])
    return seen


@pytest.mark.parametrize("name, schedule", [
    ("heun", "default"), ("dpm2", "default"), ("dpm2_a", "karras"), ("dpmpp_sde", "default"),  # diffusers' classes
    ("heun", "sgm_uniform"), ("dpmpp_2s_a", "default"), ("restart", "default"),  # the k-diffusion path
    ("euler", "default"), ("dpmpp_2m_sde_heun", "default"), ("lms", "sgm_uniform"),  # first order
])
def test_prompt_editing_switches_at_the_call_a1111s_rule_gives(model, monkeypatch, name, schedule):
    """A1111 counts a schedule in denoiser calls over steps x 2 for a second-order sampler:
    `[a:b:0.5]` of 4 Heun steps is `a` for calls 0-4 of its 7 (step counting would switch after 2)."""
    s = Settings(prompt="[a red fox:a blue cat:0.5]", negative="blurry", steps=4, cfg=6.0, seed=3, scheduler=name,
                 schedule=schedule).resolve({}, model.native_size)
    red, blue = (pipeline.encode_prompts(model, [s.merged(prompt=p)])[0][0][0][1].conds[0]["encoder_hidden_states"][0]
                 for p in ("a red fox", "a blue cat"))
    rows = positive_rows(model, monkeypatch, s)
    assert len(rows) == (7 if name in A1111_SECOND_ORDER else 4)
    switch = int(0.5 * s.steps * (2 if name in A1111_SECOND_ORDER else 1))  # A1111's end step of `a red fox`
    for call, row in enumerate(rows):
        expected, other = (red, blue) if call <= switch else (blue, red)
        assert torch.allclose(row, expected, atol=1e-5) and not torch.allclose(row, other, atol=1e-3), call


def test_a_second_order_image_records_and_replays_as_before(sd1_folder, tmp_path):
    """The doubled schedule is A1111's reading of the same settings: the PNG records the prompt
    and steps as given, and --from-png renders the same image."""
    import json

    from typer.testing import CliRunner

    from ldm_cli.cli import app

    def generate(*args):
        result = CliRunner().invoke(app, ["generate", *args, "--json", "--quiet"])
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout.splitlines()[-1])

    first = generate("a [red fox:blue cat:0.5]", "--model", str(sd1_folder), "--scheduler", "heun", "--steps", "4",
                     "--seed", "5", "--width", "64", "--height", "64", "--out", str(tmp_path / "a"))
    written = Image.open(first["path"]).text["parameters"]
    assert written.startswith("a [red fox:blue cat:0.5]\n") and "Steps: 4, Sampler: Heun," in written
    again = generate("--from-png", first["path"], "--model", str(sd1_folder), "--out", str(tmp_path / "b"))
    assert np.array_equal(np.asarray(Image.open(first["path"])), np.asarray(Image.open(again["path"])))
