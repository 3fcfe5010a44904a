"""Whether a model predicts the noise (epsilon) or the velocity (v).

Nothing in a file's tensors says so, and SD2 comes both ways (512-base: epsilon, 768-v: v), so
the answer comes from, in order: --prediction; --config's scheduler; an A1111-style
`<checkpoint>.yaml` beside the file; the file's own metadata; and for an SD2 file with none of
these, A1111's probe: one forward pass at the last timestep, where an epsilon model returns
about its input and a v model strays far below it. Other files are epsilon.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable

from ldm_cli.errors import LdmError
from ldm_cli.loading.recipe import Recipe
from ldm_cli.loading.detect import Found

SCHEDULER_NAMES = {"epsilon": "epsilon", "v_prediction": "v"}
YAML_KEY = re.compile(r"^\s*parameterization:\s*[\"']?(\w+)", re.MULTILINE)
SD2_SIZES = {"v": 96, "epsilon": 64}  # latent sizes: SD2 768-v and 512-base


def decide(flag: str | None, r: Recipe, found: Found, path: Path, probe: Callable[[], bool]) -> tuple[str, str]:
    """(epsilon or v, what decided it)."""
    if flag:
        return flag, "--prediction"
    if r.sources["scheduler"] == "--config":
        return from_scheduler(r.configs["scheduler"]), "--config"
    if (yaml := beside_yaml(path)) is not None:
        return yaml, path.with_suffix(".yaml").name
    if r.sources["scheduler"] == "metadata":
        return from_scheduler(r.configs["scheduler"]), "metadata"
    if found.family == "sd2" and not found.inpainting:
        return ("v" if probe() else "epsilon"), "probe"
    return "epsilon", "default"


def from_scheduler(config: dict) -> str:
    kind = config.get("prediction_type", "epsilon")
    if kind not in SCHEDULER_NAMES:
        raise LdmError(f"the scheduler config asks for prediction_type {kind!r}; ldm runs epsilon and v_prediction models")
    return SCHEDULER_NAMES[kind]


def beside_yaml(path: Path) -> str | None:
    """A1111 reads <checkpoint>.yaml; only its `parameterization` matters here ("v" or absent)."""
    yaml = path.with_suffix(".yaml")
    if not yaml.is_file():
        return None
    match = YAML_KEY.search(yaml.read_text(errors="replace"))
    return "v" if match and match[1] == "v" else "epsilon"


def apply(r: Recipe, prediction: str) -> None:
    """Write the decision into the scheduler config (and SD2's native size, which goes with it)."""
    r.configs["scheduler"]["prediction_type"] = "v_prediction" if prediction == "v" else "epsilon"
    if r.family == "sd2" and r.sources["unet"] == "shipped":
        r.configs["unet"]["sample_size"] = SD2_SIZES[prediction]


def is_v_model(unet) -> bool:
    """A1111's probe (is_using_v_parameterization_for_sd2), on the UNet as loaded."""
    import torch

    p = next(unet.parameters())
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=p.device, dtype=p.dtype)
    context = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=p.device, dtype=p.dtype)
    with torch.inference_mode():
        out = unet(x, torch.tensor([999], device=p.device), encoder_hidden_states=context, return_dict=False)[0]
    return (out.float() - x.float()).mean().item() < -1
