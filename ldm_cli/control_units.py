"""ControlNet units as the user gives them and as images record them.

A unit is one --controlnet with its --control-image and options. Settings keep a run's units as
one JSON text (their `controlnet` field) so that every serial form carries them unchanged: the
`ldm` chunk replays them with --from-png, finding the files by their recorded paths and checking
the control image by its hash; the A1111 text gets sd-webui-controlnet's `ControlNet N` entries.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from ldm_cli import files, untrusted_json
from ldm_cli.errors import LdmError

PREPROCESSORS = ("none", "canny")
CANNY_THRESHOLDS = (100, 200)  # A1111's sd-webui-controlnet defaults
# a union ControlNet's modes by name, in InstantX's and Shakker's FLUX union order (a number works for any net)
UNION_MODES = ("canny", "tile", "depth", "blur", "pose", "gray", "lq")


@dataclass
class ControlUnit:
    """One --controlnet and its options; the names and hashes are filled once its files are read."""
    controlnet: str
    image: str
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    preprocess: str = "none"
    mode: int | None = None  # a union ControlNet's control type (UNION_MODES), None for others
    model_name: str | None = None
    model_hash: str | None = None  # sd-webui-controlnet's: 8 hex of the weights' sha256
    image_hash: str | None = None  # 10 hex of the control image file's sha256, as A1111's init image hash

    def validate(self) -> None:
        if self.preprocess not in PREPROCESSORS:
            raise LdmError(f"--control-preprocess must be {' or '.join(PREPROCESSORS)} (got {self.preprocess!r})")
        if not 0.0 <= self.start < self.end <= 1.0:
            raise LdmError(f"--control-start and --control-end must satisfy 0 <= start < end <= 1 "
                           f"(got {self.start:g} and {self.end:g})")
        if not -10.0 <= self.scale <= 10.0:
            raise LdmError(f"--control-scale must be between -10 and 10 (got {self.scale:g})")
        if self.mode is not None and not 0 <= self.mode < 100:
            raise LdmError(f"--control-mode must be one of {', '.join(UNION_MODES)} or a number from 0 (got {self.mode})")
        for flag, path in (("--controlnet", self.controlnet), ("--control-image", self.image)):
            if not files.exists(files.user_path(path)):
                raise LdmError(f"{flag} {path!r} does not exist")

    def infotext(self) -> str:
        """sd-webui-controlnet's entry for the unit (its fixed fields as it writes them for ours)."""
        low, high = CANNY_THRESHOLDS if self.preprocess == "canny" else (-1, -1)
        model = f"{self.model_name} [{self.model_hash}]" if self.model_hash else self.model_name
        return (f"Module: {self.preprocess}, Model: {model}, Weight: {self.scale:g}, "
                f"Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: {low}, Threshold B: {high}, "
                f"Guidance Start: {self.start:g}, Guidance End: {self.end:g}, Pixel Perfect: False, "
                "Control Mode: Balanced")


def mode_number(text: str | int) -> int:
    """A --control-mode: a name of UNION_MODES or the number itself."""
    name = str(text).strip().lower()
    if name in UNION_MODES:
        return UNION_MODES.index(name)
    if name.isdigit():
        return int(name)
    raise LdmError(f"--control-mode must be one of {', '.join(UNION_MODES)} or a number (got {text!r})")


def units_from_flags(controlnets: list[str], images: list[str], scales: list[float], starts: list[float],
                     ends: list[float], preprocesses: list[str], modes: list[str] = ()) -> list[ControlUnit]:
    """The i-th --controlnet with the i-th --control-image; each other option is given not at all
    (its default), once (for every unit) or once per unit."""
    if len(controlnets) != len(images):
        raise LdmError(f"each --controlnet needs its --control-image (got {len(controlnets)} --controlnet "
                       f"and {len(images)} --control-image)")
    n = len(controlnets)
    options = {"scale": scales, "start": starts, "end": ends, "preprocess": preprocesses,
               "mode": [mode_number(m) for m in modes]}
    for name, values in options.items():
        if len(values) not in (0, 1, n) or (values and not n):
            raise LdmError(f"--control-{name} is given {len(values)} times for {n} --controlnet; "
                           "give it once, or once per --controlnet")
    units = [ControlUnit(_absolute(c), _absolute(i), **{k: v[0 if len(v) == 1 else j] for k, v in options.items() if v})
             for j, (c, i) in enumerate(zip(controlnets, images))]
    for unit in units:
        unit.validate()
    return units


def _absolute(path: str) -> str:
    """Recorded so, a --from-png replay finds the file from any folder."""
    return str(files.user_path(path).absolute())


def to_text(units: list[ControlUnit]) -> str | None:
    """The units as Settings keep them (None: no ControlNet)."""
    if not units:
        return None
    return json.dumps([{k: v for k, v in dataclasses.asdict(u).items() if v is not None} for u in units],
                      ensure_ascii=False)


def from_text(text: str | None) -> list[ControlUnit]:
    """The units of a Settings' `controlnet` text (a PNG or a manifest may hold anything there):
    a malformed record, or a field of the wrong type, is an error naming it."""
    if not text:
        return []
    try:
        data = untrusted_json.loads(text, "the record")
        if not isinstance(data, list) or not all(isinstance(unit, dict) for unit in data):
            raise LdmError("not a list of units")
        return [_typed_unit(unit) for unit in data]
    except LdmError as e:
        raise LdmError(f"the recorded ControlNet units are malformed ({e}); give --controlnet again") from None


# What each field of a recorded unit must hold (by its dataclass type, as text under `annotations`).
_KINDS = {"str": (str,), "str | None": (str, type(None)), "float": (int, float), "int | None": (int, type(None))}
_WORDS = {"str": "text", "float": "a number", "int": "a whole number"}


def _typed_unit(record: dict[str, Any]) -> ControlUnit:
    fields = {f.name: f.type for f in dataclasses.fields(ControlUnit)}
    if unknown := [k for k in record if k not in fields]:
        raise LdmError(f"unknown field {unknown[0]!r}")
    if missing := [k for k in ("controlnet", "image") if k not in record]:
        raise LdmError(f"a unit has no {missing[0]!r}")
    for key, value in record.items():
        if isinstance(value, bool) or not isinstance(value, _KINDS[fields[key]]):
            raise LdmError(f"{key!r} is {json.dumps(value)[:40]}, not {_WORDS[fields[key].split(' ')[0]]}")
    return ControlUnit(**{k: float(v) if fields[k] == "float" else v for k, v in record.items()})


def infotext_params(text: str | None) -> dict[str, str]:
    return {f"ControlNet {i}": unit.infotext() for i, unit in enumerate(from_text(text))}
