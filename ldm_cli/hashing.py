"""A1111's short model hash (first 10 hex digits of the file's sha256), cached.

Hashing a 2-7 GB checkpoint takes seconds, and a CLI loads on every run, so the digest is kept
in a small cache keyed by path, size and modification time. The same cache serves the digest
A1111 gives LoRA files: the sha256 of a safetensors file's tensor data, after its header (kohya's
"addnet" hash), which stays the same when only the metadata is edited.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from ldm_cli.cache import root as cache_root


_DIGEST = re.compile(r"[0-9a-f]{64}")


def cache_file() -> Path:
    return cache_root() / "hashes.json"


def sha256_file(path: Path, after_header: bool = False) -> str:
    """The file's sha256; `after_header`: of a safetensors file's bytes after its header."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if after_header:
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def short_hash(path: Path) -> str:
    return cached_sha256(path)[:10]


def cached_sha256(path: Path, after_header: bool = False) -> str:
    """sha256_file, kept in the cache by path, size and modification time."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}" + ("|after-header" if after_header else "")
    cache = cache_file()
    table = _read_table(cache)
    if not _is_digest(table.get(key)):
        table[key] = sha256_file(path, after_header)
        try:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(table))
            os.replace(tmp, cache)
        except OSError:
            pass  # a read-only home only costs the next run a re-hash
    return table[key]


def _read_table(cache: Path) -> dict:
    """The cache's table; a file that does not parse or is not a table (edited, or written by
    something else) reads as empty and is rewritten, never an error."""
    if not cache.is_file():  # missing, or a FIFO whose read would block
        return {}
    try:
        table = json.loads(cache.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    return table if isinstance(table, dict) else {}


def _is_digest(value) -> bool:
    return isinstance(value, str) and _DIGEST.fullmatch(value) is not None
