"""JSON from files anyone could have made (a PNG's `ldm` chunk, a prompts-file line, a
safetensors header, a manifest line), read with bounds: its size is capped before parsing, a
nesting deeper than Python's recursion limit or than `max_depth` is refused, an integer too
large for a float is refused as it is read (converting it later would raise OverflowError), and
so is a string that is no text (a lone surrogate escape)."""
from __future__ import annotations

import json
from typing import Any

from ldm_cli import limits
from ldm_cli.errors import LdmError

MAX_INT_DIGITS = 308  # 10**308 still converts to a float; every number ldm reads must


class BadJson(LdmError):
    """Text that is not JSON ldm will use; the message says why, after the caller's `what`."""


def loads(text: str | bytes, what: str, max_chars: int = limits.MAX_JSON_CHARS,
          max_depth: int = limits.MAX_JSON_DEPTH) -> Any:
    """The value `text` holds; BadJson (naming `what`) for text that is too long, too deep, has a
    number too large, or is not JSON."""
    if len(text) > max_chars:
        raise BadJson(f"{what} is {len(text):,} characters long; at most {max_chars:,} are read")
    try:
        value = json.loads(text, parse_int=_int)
    except RecursionError:
        raise BadJson(f"{what} nests deeper than {max_depth} levels") from None
    except _TooLarge:
        raise BadJson(f"{what} holds a number of more than {MAX_INT_DIGITS} digits") from None
    except UnicodeDecodeError:
        raise BadJson(f"{what} is not UTF-8 text") from None
    except ValueError as e:
        raise BadJson(f"{what} is not valid JSON ({getattr(e, 'msg', e)}, column {getattr(e, 'colno', '?')})") from None
    if depth(value) > max_depth:
        raise BadJson(f"{what} nests deeper than {max_depth} levels")
    if (bad := _not_text(value)) is not None:
        raise BadJson(f"{what} holds {bad!r}, a lone surrogate (\\u escape) that is not text")
    return value


class _TooLarge(ValueError):
    pass


def _int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise _TooLarge
    return int(text)


def _not_text(value: Any) -> str | None:
    """The first string (key or value) that is no Unicode text (JSON's "\\ud800" escape decodes
    to one), which ldm could neither write to a PNG nor print; None when all are text."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and not _is_text(item):
            return item
    return None


def _is_text(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def depth(value: Any) -> int:
    """How deeply lists and tables nest in `value` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else None
        if children is not None:
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children)
    return deepest
