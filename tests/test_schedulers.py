import pytest

from ldm_cli import schedulers
from ldm_cli.errors import LdmError
from tests.tiny_models import SCHEDULER


@pytest.mark.parametrize("name", list(schedulers.SCHEDULERS))
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
        schedulers.check_schedule("euler_a", "karras")


@pytest.mark.parametrize("name", list(schedulers.SCHEDULERS))
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
        schedulers.validated("Euler A", "KARRAS")
