import pytest

from ldm_cli.errors import LdmError
from ldm_cli.settings import Settings


def resolved(**kw):
    return Settings(prompt="a fox", **kw).resolve({}, (512, 512))


def test_resolve_fills_defaults_and_native_size():
    s = resolved(seed=3)
    assert (s.steps, s.cfg, s.scheduler, s.schedule, s.width, s.height) == (30, 7.5, "dpmpp_2m", "karras", 512, 512)


def test_model_defaults_win_over_fallbacks_and_flags_over_both():
    s = Settings(prompt="x", steps=7).resolve({"steps": 20, "cfg": 5.0}, (64, 64))
    assert (s.steps, s.cfg) == (7, 5.0)


def test_scheduler_alone_runs_its_own_schedule():
    assert resolved(scheduler="euler_a").schedule == "default"


def test_random_seed_is_chosen_and_kept():
    s = resolved()
    assert isinstance(s.seed, int) and 0 <= s.seed < 2**32


@pytest.mark.parametrize("kw, words", [
    ({"steps": 0}, "--steps"), ({"cfg": -1.0}, "--cfg"), ({"width": 100}, "--width"),
    ({"height": 0}, "--height"), ({"scheduler": "nope"}, "unknown scheduler"),
    ({"scheduler": "ddim", "schedule": "karras"}, "no karras"), ({"strength": 1.5}, "--strength"),
    ({"seed": -1}, "--seed"),
])
def test_bad_values_are_named(kw, words):
    with pytest.raises(LdmError, match=words):
        Settings(prompt="x", **kw).validate()


def test_a1111_label_with_schedule():
    s = Settings(prompt="x", scheduler="DPM++ 2M Karras")
    s.validate()
    assert (s.scheduler, s.schedule) == ("dpmpp_2m", "karras")


def test_infotext_layout_is_a1111s():
    s = resolved(seed=1234, negative="blurry, dark", cfg=7.5).merged(model_name="v1-5", model_hash="abcdef0123")
    assert s.to_infotext("0.1.0") == (
        "a fox\nNegative prompt: blurry, dark\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234, Size: 512x512, "
        "Model hash: abcdef0123, Model: v1-5, Version: ldm 0.1.0")


@pytest.mark.parametrize("kw", [
    {}, {"scheduler": "euler_a"}, {"scheduler": "unipc", "schedule": "beta"}, {"strength": 0.6, "mask_blur": 4},
    {"only_masked": True, "padding": 32, "strength": 1.0}, {"negative": "x, y: z\nw"},
])
def test_infotext_round_trip(kw):
    s = resolved(seed=99, **kw).merged(model_name="m", model_hash="0123456789")
    back = Settings.from_infotext(s.to_infotext("0.1.0"))
    assert back.to_dict() == s.to_dict()


def test_reads_old_style_a1111_sampler_labels():
    s = Settings.from_infotext("p\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 5, Size: 512x512")
    assert (s.scheduler, s.schedule, s.cfg, s.seed) == ("dpmpp_2m", "karras", 7.0, 5)


def test_unreadable_numbers_are_a_user_error():
    with pytest.raises(LdmError, match="unreadable"):
        Settings.from_infotext("p\nSteps: many, Sampler: Euler, Seed: 5")
