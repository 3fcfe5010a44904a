"""Which LoRAs a prompt asks for, as A1111 reads its extra-network tags.

`<lora:NAME>`, `<lora:NAME:W>` (text encoder and U-Net alike), `<lora:NAME:TE_W:UNET_W>`, and
the named forms `te=W`, `unet=W`; `lyco` is A1111's other name for `lora`. The tags stay in the
prompt (and so in the PNG's metadata); prompt_syntax.extra_networks, which finds them here, also
takes them out of the text the encoders see. A1111 reads them from the positive prompt only.

`--lora FILE[:W]` is written as a tag appended to the prompt, as A1111's "add a LoRA to every
prompt" setting does, so the metadata says what ran in A1111's own terms.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ldm_cli import prompt_syntax
from ldm_cli.errors import LdmError
from ldm_cli.limits import MAX_LORA_WEIGHT

LORA_TYPES = ("lora", "lyco")


@dataclass(frozen=True)
class LoraTag:
    name: str
    te: float = 1.0  # multiplier of the text encoders' layers
    unet: float = 1.0  # multiplier of the denoiser's layers


def lora_tags(prompt: str) -> list[LoraTag]:
    """The LoRA tags of `prompt`, in order (a name given twice is applied twice, as in A1111)."""
    found = prompt_syntax.extra_networks(prompt or "")[1]
    return [_tag(tag.args) for tag in found if tag.kind in LORA_TYPES]


def _tag(items: tuple[str, ...]) -> LoraTag:
    arguments = ":".join(items)
    positional = [item for item in items if "=" not in item]
    named = dict(item.split("=", 1) for item in items if "=" in item)
    name = positional[0].strip() if positional else ""
    if not name:
        raise LdmError(f"<lora:{arguments}> names no LoRA; write <lora:NAME:WEIGHT>")
    te = _weight(named.get("te", positional[1] if len(positional) > 1 else "1"), arguments)
    unet = _weight(named.get("unet", positional[2] if len(positional) > 2 else str(te)), arguments)
    return LoraTag(name, te, unet)


def _weight(text: str, arguments: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise LdmError(f"<lora:{arguments}>: the weight {text.strip()!r} is not a number")
    return _bounded(value, f"<lora:{arguments}>")


def _bounded(weight: float, written: str) -> float:
    """A multiplier far past any LoRA's use only overflows the merged weights (a black image)."""
    if not -MAX_LORA_WEIGHT <= weight <= MAX_LORA_WEIGHT:
        raise LdmError(f"{written}: a LoRA's weight must be between -{MAX_LORA_WEIGHT} and {MAX_LORA_WEIGHT} "
                       f"(got {weight:g})")
    return weight


def parse_flag(text: str) -> tuple[Path, float]:
    """`--lora FILE[:W]` -> (file, weight); a Windows drive's colon is not a weight."""
    head, sep, tail = text.rpartition(":")
    try:
        weight = float(tail) if sep and head else None
    except ValueError:
        weight = None
    if weight is None:
        return Path(text).expanduser(), 1.0
    if not math.isfinite(weight):
        raise LdmError(f"--lora {text!r}: the weight {tail!r} is not a number")
    return Path(head).expanduser(), _bounded(weight, f"--lora {text!r}")


def with_flag_loras(prompt: str, flags: list[str]) -> str:
    """`prompt` with a tag appended for each --lora whose name it does not already hold (a PNG's
    prompt replayed with --lora FILE keeps its own tag and weight; the flag then only says where
    the file is). Appended with nothing between, as A1111 does, so the text encoded is the same."""
    named = {tag.name for tag in lora_tags(prompt)}
    added = [f"<lora:{path.stem}:{weight:g}>" for path, weight in map(parse_flag, flags) if path.stem not in named]
    return (prompt or "") + "".join(added)
