"""One-line notes to the user on stderr ("ldm: ..."), from any layer: something ldm did on its
own that changes what the user gets (a prompt cut short, a part run without)."""
from __future__ import annotations

import sys


def note(message: str) -> None:
    print(f"ldm: {message}", file=sys.stderr, flush=True)


_said: set[str] = set()


def note_once(message: str) -> None:
    """note(), once per process: for what every line of a prompts file would repeat."""
    if message not in _said:
        _said.add(message)
        note(message)
