"""Where ldm keeps what it computes once and reuses across runs (model hashes, compiled code)."""
from __future__ import annotations

import os
from pathlib import Path


def root() -> Path:
    """LDM_CACHE_DIR, else $XDG_CACHE_HOME/ldm, else ~/.cache/ldm."""
    folder = os.environ.get("LDM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ldm")
    return Path(folder)
