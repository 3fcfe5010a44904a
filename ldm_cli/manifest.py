"""The record of what `ldm batch` made: one JSON line per finished image, in the output folder.

A record holds the image's path (relative to the folder), the line of the prompts file and the
image's index on that line, every setting (the seed included) and any init image and mask. An
image is done when a record agrees with its line, index and settings and its file still exists;
a rerun skips it. Records are written after their PNG is complete, so a record never points at
a partial file.

Each process appends to a file of its own, `manifest.jsonl` when it runs alone and
`manifest.partN.jsonl` when several share a run, so lines never interleave and no lock is
needed, also across machines sharing a folder. The main process merges the parts into
`manifest.jsonl` once every process is done; until then, and after a killed run, reading takes
every file.
"""
from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

NAME = "manifest.jsonl"
PART = "manifest.part{}.jsonl"


class Manifest:
    def __init__(self, folder: Path, rank: int = 0, world: int = 1):
        self.folder = folder
        self.own = folder / (NAME if world == 1 else PART.format(rank))
        self._images: dict[tuple, list[dict]] = defaultdict(list)
        self._read_to: dict[Path, int] = {}  # bytes of each file seen so far, for counting new records
        self.new_records = 0
        for path in self.files():
            data = path.read_bytes()
            self._read_to[path] = len(data)
            for record in parse(data):
                self._index(record)

    def files(self) -> list[Path]:
        main = self.folder / NAME
        return ([main] if main.is_file() else []) + sorted(self.folder.glob(PART.format("*")))

    def _index(self, record: dict) -> None:
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
        data = (json.dumps(record, ensure_ascii=False) + "\n").encode()
        fd = os.open(self.own, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
        finally:
            os.close(fd)
        self._index(record)

    def count_new(self) -> int:
        """Records appended to any manifest file since it was read, by every process of the run."""
        for path in self.files():
            with open(path, "rb") as f:
                f.seek(self._read_to.get(path, 0))
                data = f.read()
            self._read_to[path] = self._read_to.get(path, 0) + len(data)
            self.new_records += data.count(b"\n")
        return self.new_records

    def merge(self) -> Path:
        """Every record once in manifest.jsonl, the parts removed; for the main process once
        every process is done. The file is replaced whole, so a kill leaves the old or the new."""
        main = self.folder / NAME
        parts = [p for p in self.files() if p != main]
        records = parse(main.read_bytes()) if main.is_file() else []
        records += sorted((r for p in parts for r in parse(p.read_bytes())),
                          key=lambda r: (r.get("line", 0), r.get("index", 0)))
        lines = dict.fromkeys(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".manifest-", suffix=".tmp")
        os.fchmod(fd, 0o644)  # as the appended file is, not mkstemp's owner-only mode
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.writelines(lines)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, main)
        for part in parts:
            part.unlink()
        return main


def parse(data: bytes) -> list[dict]:
    """The records of a manifest file. A line that is not a JSON object (torn by a power cut
    mid-write) is no record and is skipped."""
    records = []
    for line in data.decode("utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "path" in record:
            records.append(record)
    return records
