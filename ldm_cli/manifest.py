"""The record of what `ldm batch` made: one JSON line per finished image, in the output folder.

A record holds the image's path (relative to the folder), the line of the prompts file and the
image's index on that line, every setting (the seed included), the line's base seed and any init
image and mask. An image is done when a record agrees with its line, index and settings and its
file still exists; a rerun skips it. Records are written after their PNG is complete, so a
record never points at a partial file.

Each process appends to a file of its own, `manifest.jsonl` when it runs alone and
`manifest.partN.jsonl` when several share a run, so lines never interleave. The main process
appends the parts to `manifest.jsonl` once every process is done; until then, and after a killed
run, reading takes every file. Other runs may share the folder (batch.py's claims keep them
from rendering an image twice), so `manifest.jsonl` is only ever appended to, and a merge holds
an exclusive lock on it while appenders hold a shared one: a merge never removes a part that
another run is writing.

A record is appended whole, in one write, after a newline when the file does not end with one:
a line torn by a kill or a full disk stays a line apart, skipped on reading, and never swallows
the record after it. A line that is not a record ldm wrote (torn, or edited into a `line` that is
a list, a `path` that is a number or leads out of the folder) is skipped too: its image, if any,
is rendered again, which costs one image, where refusing the whole manifest would leave the user
to repair it by hand before anything could resume. The files are opened without following links
and must be regular files (files.open_regular): ldm never appends through a planted link.
"""
from __future__ import annotations

import fcntl
import json
import os
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ldm_cli import files, untrusted_json
from ldm_cli.errors import LdmError

NAME = "manifest.jsonl"
PART = "manifest.part{}.jsonl"


class Manifest:
    def __init__(self, folder: Path, rank: int = 0, world: int = 1):
        self.folder = folder
        self.own = folder / (NAME if world == 1 else PART.format(rank))
        self._images: dict[tuple, list[dict]] = defaultdict(list)
        self._known: set[str] = set()  # every record once, however often it was read
        self._read: dict[Path, tuple[int, int]] = {}  # each file's inode and the bytes read of it
        self.refresh()
        self._at_start = len(self._known)

    def files(self) -> list[Path]:
        """Every manifest file there, whatever it is: one that is not a regular file is refused on reading."""
        main = self.folder / NAME
        return ([main] if os.path.lexists(main) else []) + sorted(self.folder.glob(PART.format("*")))

    def refresh(self) -> None:
        """Read the records every file gained since it was last read, whichever process or run
        wrote them; a part merged away and written anew is read from its start."""
        for path in self.files():
            try:
                fd = files.open_regular(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # a part merged meanwhile; its records are in manifest.jsonl
            with os.fdopen(fd, "rb") as f:
                inode = os.fstat(fd).st_ino
                seen, start = self._read.get(path, (inode, 0))
                start = start if seen == inode else 0
                f.seek(start)
                data = f.read()
            whole = data[:data.rfind(b"\n") + 1]  # a line still being written is read next time
            self._read[path] = (inode, start + len(whole))
            for record in parse(whole):
                self._index(record)

    def _index(self, record: dict) -> None:
        key = _key(record)
        if key not in self._known:
            self._known.add(key)
            self._images[(record.get("line"), record.get("index"))].append(record)

    def find(self, wanted: dict) -> dict | None:
        """The newest record agreeing with every value of `wanted` (line and index included)
        whose image is still there."""
        for record in reversed(self._images.get((wanted["line"], wanted["index"]), [])):
            if all(record.get(k) == v for k, v in wanted.items()) and (self.folder / record["path"]).is_file():
                return record
        return None

    def add(self, record: dict) -> None:
        """Append one record and sync it: a finished image is on record before the next starts."""
        try:
            with _locked(self.folder / NAME, fcntl.LOCK_SH):
                _append(self.own, (json.dumps(record, ensure_ascii=False) + "\n").encode())
        except OSError as e:  # a full disk: the images recorded before are kept
            raise LdmError(f"cannot record {record['path']} in {str(self.own)!r} ({e.strerror or e}); the images "
                           "recorded before it are kept") from None
        self._index(record)

    def count_new(self) -> int:
        """Records added to any manifest file since this one was opened, by any process or run."""
        self.refresh()
        return len(self._known) - self._at_start

    def merge(self) -> Path:
        """Every record in manifest.jsonl, the parts removed; for the main process once every
        process is done. A kill before the parts are removed leaves records a later merge finds
        already there and does not repeat."""
        main = self.folder / NAME
        if not any(p != main for p in self.files()):
            return main
        with _locked(main, fcntl.LOCK_EX):
            parts = [p for p in self.files() if p != main]
            there = {_key(r) for r in parse(_read(main))}
            records = sorted((r for p in parts for r in parse(_read(p))), key=lambda r: (r["line"], r["index"]))
            lines = dict.fromkeys(json.dumps(r, ensure_ascii=False) + "\n" for r in records if _key(r) not in there)
            if lines:
                _append(main, "".join(lines).encode())
            for part in parts:
                part.unlink()
        return main


def _key(record: dict) -> str:
    return json.dumps(record, sort_keys=True, ensure_ascii=False)


@contextmanager
def _locked(path: Path, how: int) -> Iterator[None]:
    fd = files.open_regular(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, how)
        yield
    finally:
        os.close(fd)


def _append(path: Path, data: bytes) -> None:
    """`data` (whole lines) appended in one write, after a newline if the file's last line is torn."""
    fd = files.open_regular(path, os.O_RDWR | os.O_APPEND | os.O_CREAT)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        while data:  # one write, unless the disk takes only part of it (then the next one fails)
            data = data[os.write(fd, data):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> bytes:
    with os.fdopen(files.open_regular(path, os.O_RDONLY), "rb") as f:
        return f.read()


def parse(data: bytes) -> list[dict]:
    """The records of a manifest file. A line that is not one (torn by a kill mid-write, or
    edited) is skipped: see the module's note."""
    records = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            record = untrusted_json.loads(line, "a manifest line")
        except untrusted_json.BadJson:
            continue
        if valid(record):
            records.append(record)
    return records


def valid(record) -> bool:
    """A record as ldm writes them: an object whose `path` names a file in the folder itself and
    whose `line` and `index` are whole numbers."""
    if not isinstance(record, dict):
        return False
    path, line, index = record.get("path"), record.get("line"), record.get("index")
    return (isinstance(path, str) and path not in ("", ".", "..") and "/" not in path and "\\" not in path
            and "\0" not in path and all(type(n) is int and n >= 0 for n in (line, index)))
