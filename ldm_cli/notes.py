"""One-line notes to the user on stderr ("ldm: ..."), from any layer: something ldm did on its
own that changes what the user gets (a prompt cut short, a part run without)."""
from __future__ import annotations

import sys


def note(message: str) -> None:
    print(f"ldm: {message}", file=sys.stderr, flush=True)
