"""Where ldm keeps what it computes once and reuses across runs (model hashes, compiled code,
components' weight shapes)."""
from __future__ import annotations

import hashlib
import marshal
import os
import sys
from pathlib import Path
from typing import Any, Callable


def root() -> Path:
    """LDM_CACHE_DIR, else $XDG_CACHE_HOME/ldm, else ~/.cache/ldm."""
    folder = os.environ.get("LDM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ldm")
    return Path(folder)


def stamp(*paths: str) -> list:
    """What a value computed from these files depends on: the Python, their times and sizes."""
    out: list = [sys.version, *paths]
    for path in paths:
        stat = os.stat(path)
        out += [stat.st_mtime_ns, stat.st_size]
    return out


def kept(folder: Path, stamp: list, compute: Callable[[], Any]) -> Any:
    """compute(), kept in `folder` under `stamp` (which names everything it depends on) as Python
    keeps bytecode: marshalled, written whole, recomputed when missing or damaged."""
    name = hashlib.sha256(repr(stamp).encode()).hexdigest()[:32] + ".bin"
    path = folder / name
    try:
        return marshal.loads(path.read_bytes())
    except (OSError, ValueError, EOFError, TypeError):  # not kept yet, or damaged
        pass
    value = compute()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f".{name}.{os.getpid()}")
        partial.write_bytes(marshal.dumps(value))
        os.replace(partial, path)
    except OSError:  # no cache folder to write: computed again next time
        pass
    return value
