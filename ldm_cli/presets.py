"""Few-step models at the settings they are made for: `--preset lightning|lcm|turbo|hyper`, and
the same found in a checkpoint's or LoRA's own metadata (ModelSpec's texts, kohya's ss_ names)
when it says it is one, with the step count it names. No torch.

Each preset is what its makers publish for SD 1.x/SDXL use in A1111-style UIs: SDXL-Lightning
and Hyper-SD are distilled for Euler with trailing timesteps (A1111's SGM Uniform) and no CFG;
LCM for its own sampler at a little guidance; SD/SDXL-Turbo for an ancestral sampler, no CFG.
"""
from __future__ import annotations

import difflib
import re

from typing import TYPE_CHECKING

from ldm_cli.errors import LdmError

if TYPE_CHECKING:
    from ldm_cli.settings import Settings

PRESETS: dict[str, dict[str, object]] = {
    "lightning": {"steps": 8, "cfg": 1.0, "scheduler": "euler", "schedule": "sgm_uniform"},
    "hyper": {"steps": 8, "cfg": 1.0, "scheduler": "euler", "schedule": "sgm_uniform"},
    "lcm": {"steps": 6, "cfg": 1.5, "scheduler": "lcm", "schedule": "default"},
    "turbo": {"steps": 4, "cfg": 1.0, "scheduler": "euler_a", "schedule": "sgm_uniform"},
}
# The metadata texts that name what a file was made as: ModelSpec's, and kohya's output name and comment
NAMING_KEYS = ("ss_output_name", "ss_training_comment")
STEPS = re.compile(r"(\d{1,2})[\s_-]*steps?\b", re.IGNORECASE)
MOST_STEPS = 16  # more is no longer a few-step model's count


def preset(name: str) -> dict[str, object]:
    """A preset's settings, by name (case ignored); one line naming the choices otherwise."""
    wanted = name.strip().lower()
    if wanted in PRESETS:
        return dict(PRESETS[wanted])
    close = difflib.get_close_matches(wanted, PRESETS, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise LdmError(f"unknown preset {name!r}{hint}; choose one of: {', '.join(PRESETS)}")


def applied(settings: Settings, name: str | None) -> Settings:
    """`settings` with preset `name`'s values where they give none, said on stderr."""
    from ldm_cli.notes import note

    if name is None:
        return settings
    values = {k: v for k, v in preset(name).items() if getattr(settings, k) is None}
    note(f"preset {name.strip().lower()}: {described(values) or 'every setting given otherwise'}")
    return settings.merged(**values)


def from_metadata(metadata: dict[str, str]) -> tuple[str, dict[str, object]] | None:
    """(preset name, settings) for a file whose metadata says it is made for few steps: the
    first preset its ModelSpec or kohya texts name, at the step count they name, if any."""
    texts = [v for k, v in metadata.items() if isinstance(v, str) and (k.startswith("modelspec.") or k in NAMING_KEYS)]
    for text in texts:
        for name in PRESETS:
            if re.search(rf"(?<![a-z]){name}(?![a-z])", text, re.IGNORECASE):
                values = dict(PRESETS[name])
                steps = [int(m) for t in texts for m in STEPS.findall(t) if 1 <= int(m) <= MOST_STEPS]
                if steps:
                    values["steps"] = steps[0]
                return name, values
    return None


def described(values: dict[str, object]) -> str:
    """'--steps 8 --cfg 1 --scheduler euler --schedule sgm_uniform'."""
    return " ".join(f"--{k} {format(v, 'g') if isinstance(v, float) else v}" for k, v in values.items())
