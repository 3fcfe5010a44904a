"""A1111's `parameters` text ("infotext"): write it and read it back.

Layout, as A1111 writes it and tools that read A1111 images expect it:

    <prompt, may span lines>
    Negative prompt: <negative, may span lines>      (only when non-empty)
    Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 1, Size: 512x512

Values holding a comma, a colon or a newline are JSON-quoted.
"""
from __future__ import annotations

import json
import re

NEGATIVE_PREFIX = "Negative prompt:"
POSTPROCESSING = "postprocessing"  # A1111's PNG chunk for what its Extras tab did to an image
# One `Key: value` pair of the last line; a value is a JSON string or runs to the next comma.
_PARAM = re.compile(r'\s*([\w][\w \-/+]*):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def quote(value: str) -> str:
    """Quote a value the way A1111 does, only where the plain form would be ambiguous."""
    if any(c in value for c in ",:\n"):
        return json.dumps(value, ensure_ascii=False)
    return value


def unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            text = json.loads(value)
            text.encode("utf-8")  # a lone surrogate escape ("\ud800") is no text: kept as written
            return text
        except (json.JSONDecodeError, UnicodeEncodeError):
            return value
    return value


def format_number(x: float) -> str:
    """Short form of a number: 7.0 -> '7', 7.5 -> '7.5', 0.123456789 -> '0.123457'."""
    return format(float(x), ".6g")


def format_infotext(prompt: str, negative: str, params: dict[str, str]) -> str:
    lines = [prompt]
    if negative:
        lines.append(f"{NEGATIVE_PREFIX} {negative}")
    lines.append(format_params(params))
    return "\n".join(lines)


def format_params(params: dict[str, str]) -> str:
    """`Key: value, Key: value`, values quoted as A1111 quotes them."""
    return ", ".join(f"{k}: {quote(str(v))}" for k, v in params.items())


def _parse_params(line: str) -> dict[str, str] | None:
    params, pos = {}, 0
    while pos < len(line):
        m = _PARAM.match(line, pos)
        if not m or m.end() == pos:
            return None
        params[m.group(1).strip()] = unquote(m.group(2).strip())
        pos = m.end()
    return params


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """Split infotext into (prompt, negative prompt, parameters)."""
    lines = text.strip().split("\n")
    params = _parse_params(lines[-1]) if lines else None
    # A1111 treats the last line as parameters only when it has at least three pairs.
    if params is not None and len(params) >= 3:
        lines = lines[:-1]
    else:
        params = {}
    prompt_lines, negative_lines = [], []
    for line in lines:
        if line.startswith(NEGATIVE_PREFIX) and not negative_lines:
            negative_lines.append(line[len(NEGATIVE_PREFIX):].strip())
        elif negative_lines:
            negative_lines.append(line)
        else:
            prompt_lines.append(line)
    return "\n".join(prompt_lines), "\n".join(negative_lines), params
