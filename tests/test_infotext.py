import time

import pytest

from ldm_cli import infotext

A1111_SAMPLE = (
    "masterpiece, a red fox in snow, (detailed:1.2)\n"
    "Negative prompt: blurry, lowres\n"
    "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x768, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "fox: abc123, snow: def456", Version: v1.10.1'
)


def test_parses_a1111_text():
    prompt, negative, params = infotext.parse_infotext(A1111_SAMPLE)
    assert prompt == "masterpiece, a red fox in snow, (detailed:1.2)"
    assert negative == "blurry, lowres"
    assert params["Steps"] == "30"
    assert params["Sampler"] == "DPM++ 2M"
    assert params["Schedule type"] == "Karras"
    assert params["Size"] == "512x768"
    assert params["Lora hashes"] == "fox: abc123, snow: def456"
    assert params["Version"] == "v1.10.1"


def test_round_trip_with_quoting_and_multiline():
    params = {"Steps": "20", "Model": 'odd, name: "x"', "Note": "two\nlines", "Seed": "1"}
    text = infotext.format_infotext("line one\nline two", "neg\nmore", params)
    assert text.splitlines()[-1].startswith("Steps: 20, Model: \"odd, name: \\\"x\\\"\"")
    assert infotext.parse_infotext(text) == ("line one\nline two", "neg\nmore", params)


def test_no_negative_line_when_empty():
    text = infotext.format_infotext("a cat", "", {"Steps": "1", "Seed": "2", "Size": "8x8"})
    assert text == "a cat\nSteps: 1, Seed: 2, Size: 8x8"


def test_short_numbers():
    assert infotext.format_number(7.0) == "7"
    assert infotext.format_number(7.5) == "7.5"
    assert infotext.format_number(0.75) == "0.75"


def test_prompt_only_text_has_no_params():
    assert infotext.parse_infotext("just a prompt, nothing else") == ("just a prompt, nothing else", "", {})


@pytest.mark.parametrize("text", [
    "a" * 1_000_000,                      # one huge prompt line
    "k: " + '"' + "\\\\" * 300_000,        # an unterminated quoted value
    "Steps: 1, " * 100_000,               # a hundred thousand pairs
    "a b" * 300_000 + ":",                # a key that almost matches, everywhere
])
def test_a_forged_megabyte_of_text_parses_at_once(text):
    """PIL reads text chunks up to 1 MB; no such chunk may tie up the parser (no regex backtracking blow-up)."""
    start = time.perf_counter()
    infotext.parse_infotext(text)
    assert time.perf_counter() - start < 2
