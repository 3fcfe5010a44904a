"""k-diffusion (Katherine Crowson, MIT), the samplers' reference, as A1111 uses it: its own
sampling.py and external.py (the CompVis denoiser wrappers), loaded without the package's
__init__, which imports torchvision and scikit-image (not ldm's dependencies). Their one helper
from utils.py, append_dims, is compiled from k-diffusion's own source rather than importing
utils.py (whose top level imports torchvision).

k-diffusion is installed `--no-deps` (`make install` does it: its declared dependencies would
pull torchvision, wandb and more); without it these tests skip, saying so.
"""
from __future__ import annotations

import ast
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import pytest

NAME = "_kdiffusion_reference"  # a name of our own: nothing else sees a half-loaded k_diffusion


def load() -> tuple[types.ModuleType, types.ModuleType]:
    """(k_diffusion.sampling, k_diffusion.external)."""
    if NAME in sys.modules:
        return sys.modules[f"{NAME}.sampling"], sys.modules[f"{NAME}.external"]
    spec = importlib.util.find_spec("k_diffusion")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("k-diffusion is not installed (make install adds it with --no-deps)")
    folder = Path(list(spec.submodule_search_locations)[0])
    package = types.ModuleType(NAME)
    package.__path__ = [str(folder)]
    sys.modules[NAME] = package
    sys.modules[f"{NAME}.utils"] = _utils(folder / "utils.py")
    return importlib.import_module(f"{NAME}.sampling"), importlib.import_module(f"{NAME}.external")


def _utils(path: Path) -> types.ModuleType:
    """A module holding utils.py's append_dims, compiled from its source."""
    tree = ast.parse(path.read_text())
    wanted = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "append_dims"]
    module = types.ModuleType(f"{NAME}.utils")
    exec(compile(ast.Module(body=wanted, type_ignores=[]), str(path), "exec"), module.__dict__)
    return module
