"""SDXL refiner settings as A1111's infotext records them (`Refiner: NAME [hash]`, `Refiner
switch at: 0.8`), read by Settings; no torch (refiner.py runs it)."""
from __future__ import annotations

from ldm_cli import infotext


def infotext_params(s) -> dict[str, str]:
    if not s.refiner_name:
        return {}
    p = {"Refiner": s.refiner_name + (f" [{s.refiner_hash}]" if s.refiner_hash else "")}
    if s.refiner_switch_at is not None:
        p["Refiner switch at"] = infotext.format_number(s.refiner_switch_at)
    return p


def name_and_hash(text: str) -> tuple[str, str | None]:
    """A1111's "NAME [hash]" (a name alone where no hash was recorded)."""
    name, _, rest = text.rpartition(" [")
    return (name, rest[:-1] or None) if name and rest.endswith("]") else (text, None)
