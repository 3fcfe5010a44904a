import math
import re

import pytest

from ldm_cli.errors import LdmError
from ldm_cli.settings import BadSetting, Settings


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
        Settings(**{"prompt": "x", **kw}).validate()


def test_a1111_label_with_schedule():
    s = Settings(prompt="x", scheduler="DPM++ 2M Karras")
    s.validate()
    assert (s.scheduler, s.schedule) == ("dpmpp_2m", "karras")


def test_infotext_layout_is_a1111s():
    s = resolved(seed=1234, negative="blurry, dark", cfg=7.5).merged(model_name="v1-5", model_hash="abcdef0123")
    assert s.to_infotext("0.1.0") == (
        "a fox\nNegative prompt: blurry, dark\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1234, Size: 512x512, "
        "Model hash: abcdef0123, Model: v1-5, RNG: CPU, Version: ldm 0.1.0")


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


@pytest.mark.parametrize("text, field, words", [
    ("Steps: many, Sampler: Euler, Seed: 5", "steps", "must be a whole number (got 'many')"),
    ("Steps: 2, CFG scale: high, Seed: 5", "cfg", "must be a number (got 'high')"),
    ("Steps: 2, Size: 512, Seed: 5", "size", "must be WIDTHxHEIGHT"),
    ("Steps: 2, Size: 64xtall, Seed: 5", "size", "must be WIDTHxHEIGHT"),
])
def test_unreadable_numbers_name_their_field(text, field, words):
    with pytest.raises(BadSetting, match=re.escape(words)) as e:
        Settings.from_infotext("p\n" + text)
    assert e.value.field == field


@pytest.mark.parametrize("kw, words", [
    ({"cfg": math.nan}, "--cfg must be between 0 and 100 (got nan)"),
    ({"cfg": math.inf}, "--cfg must be between 0 and 100 (got inf)"),
    ({"cfg": 1e30}, "--cfg must be between 0 and 100 (got 1e+30)"),
    ({"strength": math.nan}, "--strength must be between 0 and 1 (got nan)"),
    ({"steps": 100_000_000}, "--steps must be between 1 and 1000 (got 100000000)"),
    ({"width": 99_999}, "--width must be at most 16384 (got 99999)"),
    ({"mask_blur": -1}, "--mask-blur must be between 0 and 16384"),
    ({"padding": 10**30}, "--padding must be between 0 and 16384"),
    ({"width": 8192, "height": 4104}, "the image size must be at most 16,777,216 pixels (got 8192x4104); set LDM_MAX_PIXELS"),
    ({"shift": math.nan}, "--shift must be between"),
    ({"max_sequence_length": 10**9}, "--max-sequence-length must be between 1 and 512"),
    ({"prompt": "(red circle:" + "9" * 400 + ")"}, "the prompt may weight words by -100 to 100 (nested brackets multiply) "
                                                   "(got inf on 'red circle')"),
    ({"negative": "(" * 1000 + "x"}, "--negative may nest brackets at most 100 deep (got 1000)"),
])
def test_absurd_values_are_refused(kw, words):
    with pytest.raises(BadSetting, match=re.escape(words)):
        Settings(**{"prompt": "x", **kw}).validate()


def test_limits_at_the_edge_are_accepted():
    Settings(prompt="x", cfg=100.0, steps=1000, width=4096, height=4096, strength=1.0, seed=2**32 - 1).validate()


def test_the_pixel_limit_is_an_environment_variable(monkeypatch):
    big = Settings(prompt="x", width=8192, height=8192)
    monkeypatch.setenv("LDM_MAX_PIXELS", "8192x8192")
    big.validate()
    monkeypatch.setenv("LDM_MAX_PIXELS", "4096")
    with pytest.raises(BadSetting, match="at most 4,096 pixels"):
        Settings(prompt="x", width=64, height=128).validate()
    monkeypatch.setenv("LDM_MAX_PIXELS", "lots")
    with pytest.raises(LdmError, match="LDM_MAX_PIXELS must be a number of pixels"):
        big.validate()


def test_a_model_with_fewer_timesteps_caps_steps_once_loaded():
    Settings(prompt="x", steps=600).validate()  # no model known: 1000 is the cap
    with pytest.raises(BadSetting, match="between 1 and 500 .*trained on 500 timesteps"):
        Settings(prompt="x", steps=600).resolve({}, (64, 64), max_steps=500)


@pytest.mark.parametrize("data, field, words", [
    ({"steps": "many"}, "steps", "must be a whole number (got 'many')"),
    ({"steps": 2.5}, "steps", "must be a whole number"),
    ({"seed": True}, "seed", "must be a whole number (got True)"),
    ({"cfg": "7"}, "cfg", "must be a number"),
    ({"prompt": 5}, "prompt", "must be text (got 5)"),
    ({"only_masked": "yes"}, "only_masked", "must be true or false"),
])
def test_from_dict_checks_each_fields_type(data, field, words):
    with pytest.raises(BadSetting, match=re.escape(words)) as e:
        Settings.from_dict({"prompt": "x", **data})
    assert e.value.field == field


def test_from_dict_keeps_good_values_and_skips_unknown_keys():
    s = Settings.from_dict({"prompt": "x", "steps": 3, "cfg": 7, "only_masked": True, "future_key": [1], "seed": None})
    assert (s.steps, s.cfg, s.only_masked, s.seed) == (3, 7.0, True, None) and isinstance(s.cfg, float)


@pytest.mark.parametrize("field", ["prompt", "negative"])
@pytest.mark.parametrize("text, message", [
    ("x" * (32 * 1024 + 1), "must be at most 32,768 bytes (got 32,769 bytes)"),
    ("x BREAK " * 200, "must fit in 64 chunks of 75 tokens (BREAK starts a chunk) (got at least 201 chunks)"),
    ("word " * 4801, "must fit in 64 chunks of 75 tokens (BREAK starts a chunk) (got at least 65 chunks)"),
])
def test_a_prompt_too_long_is_refused_before_loading(field, text, message):
    with pytest.raises(BadSetting, match=re.escape(message)) as e:
        Settings(**{"prompt": "a fox", field: text}).validate()
    assert e.value.field == field


def test_a_few_thousand_tokens_still_pass():
    Settings(prompt="a red fox, " * 1000, negative="blurry BREAK " * 40).validate()  # 4000 tokens; 41 chunks


def test_the_tokenizer_counts_chunks_exactly_once_loaded():
    """Marks the tokenizer splits finely are counted as nothing before it runs."""
    from ldm_cli.families import clip_text
    from tests import tiny_models

    assert Settings(prompt="!? " * 6000).validate() is None
    with pytest.raises(LdmError, match="takes 80 chunks of 75 tokens; at most 64 are encoded"):
        clip_text.chunks(tiny_models.tokenizer(), "!? " * 6000)


def test_a_forged_png_prompt_is_refused_in_one_line(tmp_path):
    from PIL import Image, PngImagePlugin
    from typer.testing import CliRunner

    from ldm_cli.cli import app

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a fox, " * 1_500_000 + "\nSteps: 2, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64")
    Image.new("RGB", (8, 8)).save(tmp_path / "x.png", pnginfo=info)  # a 10 MB prompt
    result = CliRunner().invoke(app, ["generate", "--from-png", str(tmp_path / "x.png"), "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and result.stderr.splitlines() == [
        f"ldm: error: the prompt recorded in '{tmp_path / 'x.png'}' must be at most 32,768 bytes (got 10,500,000 bytes); "
        "override it with a prompt of your own"]
    result = CliRunner().invoke(app, ["generate", "a fox BREAK " * 1000, "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "the prompt must fit in 64 chunks" in result.stderr
    assert not (tmp_path / "o").exists()
