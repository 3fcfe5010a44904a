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


# ldm's name -> k-diffusion's function and its keyword arguments
K_FUNCTIONS = {"euler": ("sample_euler", {}), "euler_a": ("sample_euler_ancestral", {}), "heun": ("sample_heun", {}),
               "dpm2": ("sample_dpm_2", {}), "dpm2_a": ("sample_dpm_2_ancestral", {}), "lms": ("sample_lms", {}),
               "dpmpp_2s_a": ("sample_dpmpp_2s_ancestral", {}), "dpmpp_sde": ("sample_dpmpp_sde", {}),
               "dpmpp_2m": ("sample_dpmpp_2m", {}), "dpmpp_2m_sde": ("sample_dpmpp_2m_sde", {}),
               "dpmpp_2m_sde_heun": ("sample_dpmpp_2m_sde", {"solver_type": "heun"}),
               "dpmpp_3m_sde": ("sample_dpmpp_3m_sde", {}), "dpm_fast": ("sample_dpm_fast", {}),
               "dpm_adaptive": ("sample_dpm_adaptive", {}),
               "restart": ("sample_heun", {})}  # A1111's Restart below 20 steps is Heun's method
OWN_STEPS = ("dpm_fast", "dpm_adaptive")  # A1111 gives them the schedule's ends (DPM fast: and the steps)


def start(sampling, model, s, sigmas, image_noise: bool):
    """(the starting latents: the seed's noise at sigmas[0], the function's name, its keyword
    arguments): a Brownian tree seeded by the image's seed for the SDE samplers, A1111's way, or
    with `image_noise` the image's generator continued after its starting noise."""
    import torch

    from ldm_cli import schedulers

    generator = torch.Generator().manual_seed(s.seed)
    f = model.vae_scale_factor
    x = torch.randn((1, model.latent_channels, s.height // f, s.width // f), generator=generator) * sigmas[0]
    name, kwargs = K_FUNCTIONS[s.scheduler]
    if schedulers.SCHEDULERS[s.scheduler].brownian:
        kwargs = {**kwargs, "noise_sampler": sampling.BrownianTreeNoiseSampler(
            x, sigmas[sigmas > 0].min(), sigmas.max(), seed=[s.seed])}
    elif image_noise:
        kwargs = {**kwargs, "noise_sampler": lambda *_: torch.randn(x.shape[1:], generator=generator)[None]}
    return x, name, kwargs
