import re

import pytest

from ldm_cli import schedulers
from ldm_cli.errors import LdmError
from tests.tiny_models import SCHEDULER

DIFFUSERS = [name for name, spec in schedulers.SCHEDULERS.items() if spec.cls]  # the rest: tests/test_ksamplers.py


@pytest.mark.parametrize("name", DIFFUSERS)
def test_every_scheduler_builds_from_a_model_config_and_runs_its_timesteps(name):
    import torch

    s = schedulers.build(name, None, {**SCHEDULER, "_class_name": "PNDMScheduler"}, seeds=[1])
    s.set_timesteps(4)
    assert type(s).__name__ == schedulers.SCHEDULERS[name].cls
    assert s.config.beta_schedule == "scaled_linear"
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * s.init_noise_sigma
    kwargs = {"generator": torch.Generator().manual_seed(1)} if schedulers.SCHEDULERS[name].stochastic and name != "dpmpp_sde" else {}
    for t in s.timesteps:
        x = s.step(torch.zeros_like(x), t, s.scale_model_input(x, t), **kwargs).prev_sample
    assert torch.isfinite(x).all()


def test_sigma_schedules_are_overrides():
    s = schedulers.build("dpmpp_2m", "karras", SCHEDULER)
    assert s.config.use_karras_sigmas and s.config.algorithm_type == "dpmsolver++"
    assert schedulers.build("euler", "exponential", SCHEDULER).config.use_exponential_sigmas
    assert schedulers.build("euler", "beta", SCHEDULER).config.use_beta_sigmas


@pytest.mark.parametrize("text, expected", [
    ("dpmpp_2m", ("dpmpp_2m", None)), ("DPM++ 2M", ("dpmpp_2m", None)),
    ("DPM++ 2M Karras", ("dpmpp_2m", "karras")), ("Euler a", ("euler_a", None)), ("DDIM", ("ddim", None)),
    ("dpm++ 2m sde exponential", ("dpmpp_2m_sde", "exponential")), ("PLMS", ("pndm", None)),
])
def test_names_and_a1111_labels(text, expected):
    assert schedulers.resolve(text) == expected


def test_unknown_names_list_the_choices():
    with pytest.raises(LdmError, match="dpmpp_2m.*ldm schedulers"):
        schedulers.resolve("dpmpp_9x")
    with pytest.raises(LdmError, match="no karras schedule"):
        schedulers.check_schedule("ddim", "karras")


@pytest.mark.parametrize("name", DIFFUSERS)
def test_the_schedule_table_is_what_the_diffusers_classes_take(name):
    import inspect

    import diffusers

    spec = schedulers.SCHEDULERS[name]
    taken = inspect.signature(getattr(diffusers, spec.cls).__init__).parameters
    assert spec.schedules == tuple(s for s, (flag, _) in schedulers.SCHEDULES.items() if flag in taken)


def test_names_ignore_case_and_typos_get_a_suggestion():
    assert schedulers.validated("EULER_A", "Default") == ("euler_a", "default")
    assert schedulers.validated(None, "Karras") == (None, "karras")
    assert schedulers.validated("dpm++ 2m KARRAS", None) == ("dpmpp_2m", "karras")
    with pytest.raises(LdmError, match=r"unknown schedule 'karas' \(did you mean 'karras'\?\)"):
        schedulers.validated(None, "karas")
    with pytest.raises(LdmError, match=r"unknown scheduler 'eular a' \(did you mean 'euler_a'\?\)"):
        schedulers.validated("eular a", None)
    with pytest.raises(LdmError, match=r"did you mean 'DPM\+\+ 2M Karras'\?"):
        schedulers.validated("DPM++ 2M Karas", None)
    with pytest.raises(LdmError, match="no karras schedule"):
        schedulers.validated("DDIM", "KARRAS")
    # A1111's schedule types by label, on any of its k-diffusion samplers
    assert schedulers.validated("Euler A", "KARRAS") == ("euler_a", "karras")
    assert schedulers.validated("DPM++ 3M SDE", "SGM Uniform") == ("dpmpp_3m_sde", "sgm_uniform")
    assert schedulers.validated("dpm++ 2s a", "automatic") == ("dpmpp_2s_a", "default")
    with pytest.raises(LdmError, match=r"unknown schedule 'SGM Unifrom' \(did you mean 'sgm_uniform'\?\)"):
        schedulers.validated("euler", "SGM Unifrom")
    with pytest.raises(LdmError, match=r"unknown scheduler 'DPM\+\+ 3M SDF' \(did you mean 'DPM\+\+ 3M SDE'\?\)"):
        schedulers.validated("DPM++ 3M SDF", None)


SMALL = {**SCHEDULER, "num_train_timesteps": 100}  # the same limits at a tenth of the steps


def run_all_steps(name: str, schedule: str, steps: int) -> bool:
    """Whether a real-sized latent with a random model output gets through `steps` steps."""
    import torch

    s = schedulers.build(name, schedule, SMALL, seeds=[1])
    g = torch.Generator().manual_seed(0)
    kwargs = {"generator": torch.Generator().manual_seed(1)} if schedulers.SCHEDULERS[name].stochastic and name != "dpmpp_sde" else {}
    try:
        schedulers.set_timesteps(s, steps, "cpu", SMALL, 0)
        x = torch.randn(1, 4, 8, 8, generator=g) * s.init_noise_sigma
        for t in s.timesteps:
            x = s.step(torch.randn(x.shape, generator=g), t, s.scale_model_input(x, t), **kwargs).prev_sample
    except (ValueError, IndexError, AssertionError):
        return False
    return bool(torch.isfinite(x).all())


@pytest.mark.parametrize("name", DIFFUSERS)
def test_the_steps_a_sampler_is_refused_are_those_it_cannot_run(name):
    """The one-pixel probe agrees with a real-sized run (random model outputs) on whether the run
    gets through, at the edge: LCM's 50-step schedule; with SD's offset spacing, about as many
    steps as timesteps (errors, or repeated sigmas dividing into NaN). A Beta schedule of many
    steps repeats integer timesteps and must still run: it starts at the first."""
    run = schedulers.Run(name, "default", SMALL)
    steps = 100
    if not schedulers.finishes(run, steps):
        with pytest.raises(LdmError) as refused:
            schedulers.check_steps(run, steps)
        limit = int(re.search(r"at most (\d+)", str(refused.value)).group(1))
        assert run_all_steps(name, "default", limit) and not run_all_steps(name, "default", limit + 1)
        steps = limit
    for schedule in ("default", *schedulers.SCHEDULERS[name].schedules):
        assert run_all_steps(name, schedule, steps), schedule
        schedulers.check_steps(schedulers.Run(name, schedule, SMALL), steps)


def test_simple_is_a1111s_type_for_unet_models_and_forges_default_for_flow_models():
    schedulers.check_for_model("euler", "simple", False)  # the k-diffusion path runs it
    schedulers.check_for_model("unipc", "simple", True)  # a flow model's own spacing
    with pytest.raises(LdmError, match="'unipc' has no simple schedule"):
        schedulers.check_for_model("unipc", "simple", False)
    schedulers.check_for_model("dpmpp_3m_sde", "default", True)  # k-diffusion's, in its flow form
    with pytest.raises(LdmError, match="align_your_steps schedule is NVIDIA's tables"):
        schedulers.check_for_model("restart", "align_your_steps", True)


def test_the_listing_names_every_sampler_schedule_type_and_which_models_take_them():
    from typer.testing import CliRunner

    from ldm_cli.cli import app

    out = CliRunner().invoke(app, ["schedulers"]).stdout
    for spec in schedulers.SCHEDULERS.values():
        assert re.search(rf"^{re.escape(spec.name)} +{re.escape(spec.label)} ", out, re.M), spec.name
    assert all(label in out for label in schedulers.SCHEDULE_TYPES.values())
    assert "noise-prediction models (SD 1.x, SD 2.x, SDXL)" in out and "flow-matching models" in out
