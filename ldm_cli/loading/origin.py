"""Where a diffusers weight lies in a single file's original layout: the one record every
key map (keymap.py, dit_keymap.py) returns, and their one refusal."""
from __future__ import annotations

from typing import NamedTuple

from ldm_cli.errors import LdmError


class Origin(NamedTuple):
    key: str  # without the component prefix
    part: int | None = None  # which part of a fused tensor (rows): a third of q/k/v unless `split` says
    split: tuple[int, ...] | None = None  # the rows of each part, when they differ (FLUX's q, k, v, mlp)
    transpose: bool = False  # stored as x @ W rather than a Linear's W
    conv: bool = False  # stored as a 1x1 convolution kernel
    swap: bool = False  # stored as (shift, scale) halves; diffusers reads (scale, shift)
    eye: bool = False  # not read: the identity (SD3 uses CLIP-L's pooled output unprojected; a cut-short
    # Mistral has no final norm, a scale of ones)



def unsupported(what: str, key: str) -> LdmError:
    return LdmError(f"ldm cannot place the {what} weight {key!r} in the original layout; this architecture is not supported")


