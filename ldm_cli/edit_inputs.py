"""An edit's input images as its record keeps them: each one's path and hash, in order (the
edited image, then the references), so `ldm edit --from-png` finds them again and knows they
are unchanged. No torch."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ldm_cli import files, untrusted_json
from ldm_cli.errors import LdmError


@dataclass(frozen=True)
class Input:
    path: str
    hash: str  # A1111's short form: 10 hex digits of the file's sha256


def recorded(path: Path) -> Input:
    from ldm_cli import hashing

    return Input(str(Path(path).expanduser().absolute()), hashing.sha256_file(path)[:10])


def to_text(inputs: list[Input]) -> str:
    return json.dumps([{"path": i.path, "hash": i.hash} for i in inputs], ensure_ascii=False)


def from_text(text: str | None, what: str = "the recorded edit_images") -> list[Input]:
    """The inputs a record holds (none for None); an error naming what is malformed."""
    if text is None:
        return []
    data = untrusted_json.loads(text, what)
    if not isinstance(data, list) or not data:
        raise LdmError(f"{what} is not a list of input images")
    for entry in data:
        if not isinstance(entry, dict) or not all(isinstance(entry.get(k), str) for k in ("path", "hash")):
            raise LdmError(f"{what} holds {json.dumps(entry)[:60]}, not a path and a hash")
    return [Input(entry["path"], entry["hash"]) for entry in data]


def found(inputs: list[Input], mask: bool = False) -> list[Path]:
    """The recorded inputs' paths (or the mask's), each checked to hold the image it held: one
    line otherwise."""
    from ldm_cli import hashing

    paths = []
    for number, entry in enumerate(inputs):
        name = "the mask" if mask else "the edited image" if number == 0 else f"reference {number}"
        path = files.user_path(entry.path)
        if not files.exists(path) or not path.is_file():
            raise LdmError(f"{name} this edit was made from, {entry.path!r}, is gone; give the images again")
        if hashing.sha256_file(path)[:10] != entry.hash:
            raise LdmError(f"{name} this edit was made from, {entry.path!r}, has changed since (hash "
                           f"{entry.hash} recorded); give the images again")
        paths.append(path)
    return paths
