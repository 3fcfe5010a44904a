"""A1111's short hashes of LoRA and embedding files, as its PNGs record them:

    Lora hashes: "fox: 1a2b3c4d5e6f, snow: ...", TI hashes: "easyneg: ..."

A LoRA's hash is the `sshs_model_hash` its trainer (kohya's sd-scripts) wrote into the metadata
when there is one, else the sha256 of a safetensors file's tensor data after its header, else
(a pickle) of the whole file; an embedding's is the whole file's sha256. Both are cut to 12 hex
digits. A name loses any ':' and ',' in the record, as in A1111, so the list reads back.
"""
from __future__ import annotations

from pathlib import Path

from ldm_cli import hashing

SHORT = 12
METADATA_KEY = "sshs_model_hash"


def lora_hash(path: Path) -> str:
    from ldm_cli.loading import safety, tensors

    if safety.sniff(path) != "safetensors":
        return hashing.cached_sha256(path)[:SHORT]
    recorded = str(tensors.read_header(path)[1].get(METADATA_KEY) or "")
    return (recorded or hashing.cached_sha256(path, after_header=True))[:SHORT]


def embedding_hash(path: Path) -> str:
    return hashing.cached_sha256(path)[:SHORT]


def record(pairs: list[tuple[str, str]]) -> str | None:
    """[(name, hash)] as A1111 writes the list; None when empty (the field is then left out)."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {digest}" for name, digest in pairs) or None


def parse(text: str | None) -> dict[str, str]:
    """A recorded list read back: name -> hash (a name given twice keeps its first hash)."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        name, sep, digest = item.rpartition(":")
        if sep and name.strip():
            out.setdefault(name.strip(), digest.strip())
    return out
