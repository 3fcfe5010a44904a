"""Crafted PNG records (the `ldm` JSON chunk, A1111's text) read by `ldm info` and `--from-png`:
every bad one is one line naming the PNG, never a traceback; `ldm info` shows what it can."""
import json

import pytest
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from ldm_cli import untrusted_json
from ldm_cli.cli import app
from ldm_cli.settings import BadSetting, Settings

A1111 = "a fox\nSteps: 20, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 512x512"


def png(path, **chunks):
    info = PngImagePlugin.PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


def units(**fields):
    return json.dumps([{"controlnet": "/cn.safetensors", "image": "/c.png", **fields}])


def one_line_error(result, *words):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldm: error: "), result.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_a1111_text_without_a_sampler_is_shown(tmp_path):
    text = "a fox\nSteps: 20, CFG scale: 7, Seed: 1, Size: 512x512"
    result = CliRunner().invoke(app, ["info", str(png(tmp_path / "a.png", parameters=text))])
    assert result.exit_code == 0 and result.stdout == text + "\n" and result.stderr == ""


BAD_CHUNKS = [
    ({"prompt": "a", "scheduler": "\x00"}, "unknown scheduler '\\x00'"),
    ({"prompt": "a", "controlnet": units(scale="abc")}, "'scale' is \"abc\", not a number"),
    ({"prompt": "a", "controlnet": units(mode="x")}, "'mode' is \"x\", not a whole number"),
    ({"prompt": "a", "controlnet": json.dumps([{"controlnet": 1, "image": 2}])}, "'controlnet' is 1, not text"),
    ({"prompt": "a", "controlnet": "[" * 5000}, "nests deeper than 20 levels"),
]


@pytest.mark.parametrize("record, words", BAD_CHUNKS)
def test_a_bad_ldm_chunk_is_one_line(tmp_path, record, words):
    path = png(tmp_path / "x.png", ldm=json.dumps(record))
    one_line_error(CliRunner().invoke(app, ["info", str(path)]), "'" + str(path) + "'", words)
    result = CliRunner().invoke(app, ["generate", "--from-png", str(path), "--out", str(tmp_path / "o")])
    one_line_error(result, words)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("record, words", BAD_CHUNKS)
def test_info_shows_the_a1111_text_and_names_what_is_bad(tmp_path, record, words):
    path = png(tmp_path / "x.png", parameters=A1111, ldm=json.dumps(record))
    result = CliRunner().invoke(app, ["info", str(path)])
    assert result.exit_code == 0 and result.stdout == A1111 + "\n"
    assert result.stderr.count("\n") == 1 and words in result.stderr and "Traceback" not in result.output
    data = json.loads(CliRunner().invoke(app, ["info", str(path), "--json"]).stdout)
    assert data["parameters"] == A1111 and words in data["problem"]


@pytest.mark.parametrize("chunk, words", [
    ('{"prompt": "a", "cfg": 1' + "0" * 400 + "}", "holds a number of more than 308 digits"),
    ('{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}", "nests deeper than 20 levels"),
    ("[1, 2]", "is not a JSON object"),
])
def test_an_unreadable_ldm_chunk_is_named(tmp_path, chunk, words):
    path = png(tmp_path / "x.png", ldm=chunk)
    one_line_error(CliRunner().invoke(app, ["info", str(path)]), f"the ldm metadata of '{path}'", words)


def test_a_whole_number_too_large_for_a_float_is_a_bad_setting():
    with pytest.raises(BadSetting, match="must be a number a float can hold"):
        Settings.from_dict({"cfg": 10**400})  # a manifest's record, read by plain json


def test_untrusted_json_bounds():
    assert untrusted_json.loads('{"a": [1, {"b": 2.5}]}', "x") == {"a": [1, {"b": 2.5}]}
    assert untrusted_json.depth([[[]]]) == 3 and untrusted_json.depth(5) == 0
    for text, words in [("[" * 21 + "]" * 21, "x nests deeper than 20"), ("1" * 309, "more than 308 digits"),
                        ("x" * 11, "x is 11 characters long; at most 10"), (b"\xff", "not UTF-8")]:
        with pytest.raises(untrusted_json.BadJson, match=words):
            untrusted_json.loads(text, "x", max_chars=10 if len(text) == 11 else 2**20)
