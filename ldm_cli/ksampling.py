"""A k-diffusion sampler's run, set up for a batch as A1111 sets it up: the sigmas of its
schedule type, the denoiser's scalings for the model's prediction type, and the noise its
samplers draw, from the images' seeds.

It answers the loop's questions the way a diffusers scheduler does (timesteps, the starting
noise's scale, noising an image to a step, where img2img starts), so that strength and
inpainting treat both alike; its timesteps are sigmas. The samplers walk the same sigmas as host
floats (`sigma_values`), so that no step waits on the GPU to read one back.
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator

import torch

from ldm_cli import ddim_cfgpp, dpm_solver, ksamplers, restart, sigma_schedules
from ldm_cli.ksamplers import (dpm2, dpm2_a, dpm2_a_flow, dpmpp_2m, dpmpp_2m_sde, dpmpp_2m_sde_flow,
                               dpmpp_2m_sde_heun, dpmpp_2m_sde_heun_flow, dpmpp_2s_a, dpmpp_2s_a_flow, dpmpp_3m_sde,
                               dpmpp_3m_sde_flow, dpmpp_sde, dpmpp_sde_flow, euler, euler_a, euler_a_flow, heun, lms)
from ldm_cli.sigma_schedules import Table

if TYPE_CHECKING:
    from ldm_cli import schedulers

SAMPLERS = {f.__name__: f for f in [euler, euler_a, heun, dpm2, dpm2_a, lms, dpmpp_2s_a, dpmpp_sde, dpmpp_2m,
                                    dpmpp_2m_sde, dpmpp_2m_sde_heun, dpmpp_3m_sde, dpm_solver.dpm_fast,
                                    dpm_solver.dpm_adaptive, restart.restart, ddim_cfgpp.ddim_cfgpp]}
# on a flow-matching model, the samplers that draw fresh noise take their flow form (ksamplers.py,
# dpm_solver.py, restart.py); the others solve the same ODE unchanged
FLOW_SAMPLERS = {**SAMPLERS, **{f.__name__.removesuffix("_flow"): f for f in [
    euler_a_flow, dpm2_a_flow, dpmpp_2s_a_flow, dpmpp_sde_flow, dpmpp_2m_sde_flow, dpmpp_2m_sde_heun_flow,
    dpmpp_3m_sde_flow, dpm_solver.dpm_fast_flow, dpm_solver.dpm_adaptive_flow, restart.restart_flow]}}
# steps of their own, not the schedule's: inpainting's blend after each scheduled step cannot follow them
OWN_STEPS = ("dpm_fast", "dpm_adaptive", "restart")


@dataclass
class KRun:
    sampler: str  # a SAMPLERS name
    sigmas: torch.Tensor  # float32, highest first
    table: Table
    v_prediction: bool
    seeds: list[int]
    rngs: list[str]  # each image's noise source: "cpu" or "nv"
    brownian: bool  # A1111 draws its SDE samplers' noise from a Brownian tree seeded by the image's seed
    options: dict[str, Any] = field(default_factory=dict)  # eta, s_churn ... where the sampler takes them
    sigma_values: list[float] = field(default_factory=list)  # `sigmas` as host floats
    cfg_pp: bool = False  # CFG++ (ddim_cfgpp.py): its denoiser answers the unguided image too
    # a flow-matching model: x = (1 - sigma) x0 + sigma noise, its output the velocity, its
    # timestep sigma * N (table.sigma_to_t of a FlowTable)
    flow: bool = False
    order = 1

    @property
    def timesteps(self) -> torch.Tensor:
        return self.sigmas[:-1]

    @property
    def init_noise_sigma(self) -> float:
        if self.cfg_pp:  # A1111's DDIM starts from the noise unscaled, x / sqrt(alpha) in scaled latents
            return (self.sigma_values[0] ** 2 + 1) ** 0.5
        return self.sigma_values[0]

    def kept(self, steps: int) -> list[float]:
        """The sigmas of the schedule's last `steps` steps, as host floats (img2img keeps a tail)."""
        return self.sigma_values[len(self.sigma_values) - 1 - steps:]

    def set_begin_index(self, begin: int) -> None:
        """Nothing to keep: img2img hands the loop the sigmas it keeps as its timesteps."""

    def add_noise(self, latents: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        sigma = sigma.to(latents.device, latents.dtype).view(-1, *[1] * (latents.ndim - 1))
        if self.flow:  # as diffusers' scale_noise
            return latents * (1 - sigma) + noise * sigma
        return latents + noise * sigma

    def timestep(self, sigma: float, device: torch.device | str) -> torch.Tensor:
        """The model's (fractional) training timestep for `sigma`, on `device`."""
        return to_device(torch.tensor(self.table.sigma_to_t(sigma), dtype=torch.float32), device)

    def denoised(self, x: torch.Tensor, sigma: float, out: torch.Tensor) -> torch.Tensor:
        """x's denoised image from the model's output on x * c_in (k-diffusion's CompVis wrappers;
        a flow model's velocity v = noise - x0)."""
        if self.flow:
            return x - out * sigma
        if self.v_prediction:
            return out * (-sigma / (sigma ** 2 + 1) ** 0.5) + x * (1 / (sigma ** 2 + 1))
        return x + out * -sigma

    def c_in(self, sigma: float) -> float:
        return 1.0 if self.flow else 1 / (sigma ** 2 + 1) ** 0.5

    def sample(self, denoiser: ksamplers.Denoiser, x: torch.Tensor, sigmas: list[float],
               generators: list[torch.Generator], done: ksamplers.Done) -> torch.Tensor:
        noise = self.brownian_noise(x, sigmas) if self.brownian else ImageNoise(x, self.seeds, self.rngs, generators)
        return (FLOW_SAMPLERS if self.flow else SAMPLERS)[self.sampler](denoiser, x, sigmas, noise, done, **self.options)

    def brownian_noise(self, x: torch.Tensor, sigmas: list[float]) -> ksamplers.Noise:
        return BrownianNoise(x, min(s for s in sigmas if s > 0), max(sigmas), self.seeds)


def to_device(tensor: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """A CPU tensor on `device` without the host waiting: an ordinary copy to a GPU waits for its
    queue to drain; one from pinned memory, non-blocking, does not."""
    if torch.device(device).type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


class ImageNoise:
    """Each image's next draw from its own source, as A1111's per-image generators give it:
    its CPU generator continued after the starting noise, or CUDA's Philox numbers at the next
    offset (`--rng nv`)."""

    def __init__(self, x: torch.Tensor, seeds: list[int], rngs: list[str], generators: list[torch.Generator]):
        self.shape, self.device, self.dtype = x.shape[1:], x.device, x.dtype
        self.seeds, self.rngs, self.generators = seeds, rngs, generators
        self.offset = 0

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        from ldm_cli import philox

        self.offset += 1
        draws = [philox.randn(seed, tuple(self.shape), self.offset) if rng == "nv"
                 else torch.randn(tuple(self.shape), generator=g) for seed, rng, g in
                 zip(self.seeds, self.rngs, self.generators)]
        return to_device(torch.stack(draws), self.device).to(self.dtype)


class BrownianNoise:
    """k-diffusion's BrownianTreeNoiseSampler with one torchsde tree per image, seeded by its seed:
    the noise between two sigmas, normalised to unit variance."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float, seeds: list[int]):
        import torchsde

        w0 = torch.zeros_like(x)[0]
        with _quiet_torchsde():
            self.trees = [torchsde.BrownianTree(sigma_min, w0, sigma_max, entropy=s) for s in seeds]

    def __call__(self, sigma: float, sigma_next: float) -> torch.Tensor:
        lo, hi, sign = (sigma, sigma_next, 1) if sigma < sigma_next else (sigma_next, sigma, -1)
        with _quiet_torchsde():
            w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        return w / abs(sigma_next - sigma) ** 0.5


@contextlib.contextmanager
def _quiet_torchsde() -> Iterator[None]:
    """torchsde warns when a float32 sigma rounds a hair outside its float64 interval (the ends
    themselves, as in k-diffusion and A1111): nothing the user can act on."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Should have t", category=UserWarning)
        yield


def prepared(model, group: list, run: schedulers.Run | None = None) -> KRun:
    """The run of the group's sampler and schedule type on `model`, A1111's "Automatic" schedule
    type being the sampler's own choice; a flow-matching model's from `run` (its schedulers.Run)."""
    from ldm_cli import schedulers

    s = group[0]
    spec = schedulers.SCHEDULERS[s.scheduler]
    if model.family.flow:
        return _prepared_flow(model, group, run, spec)
    schedule = spec.k_schedule if s.schedule in (None, "default") else s.schedule
    table = sigma_schedules.table(model.scheduler_config, sdxl=model.family.name == "sdxl")
    values = sigma_schedules.float32(ddim_cfgpp.sigmas(table, s.steps) if spec.cfg_pp else
                                     sigma_schedules.sigmas(schedule, table, s.steps, spec.discard_penultimate))
    options = {k: v for k, v in s.sampler_options().items() if k in spec.takes}
    if options.get("s_tmax") == 0:
        options["s_tmax"] = float("inf")  # A1111's 0: no limit
    return _run(spec, model, group, table, values, options, v_prediction=model.prediction_type == "v_prediction",
                cfg_pp=spec.cfg_pp)


def _run(spec: schedulers.SchedulerSpec, model, group: list, table: Table, values: list[float], options: dict,
         v_prediction: bool = False, cfg_pp: bool = False, flow: bool = False) -> KRun:
    """A run on `values`: the sigmas on the model's device (the loop's timesteps) and as host
    floats (the samplers'), each image's seed and noise source."""
    return KRun(spec.k, torch.tensor(values, dtype=torch.float32).to(model.device), table, v_prediction,
                [g.seed for g in group], [g.rng or "cpu" for g in group], spec.brownian, options, values, cfg_pp, flow)


def _prepared_flow(model, group: list, run: schedulers.Run, spec: schedulers.SchedulerSpec) -> KRun:
    """A flow-matching model's run: its own spacing ("default", Forge's "Simple") is exactly the
    sigmas of ldm's diffusers path (FlowMatchEuler's, with the family's spacing and mu); the other
    schedule types are computed from its shifted table at the shift that path would use."""
    from ldm_cli import schedulers

    s = group[0]
    table = sigma_schedules.flow_table(model.scheduler_config, run.shift, _mu(model, run, s.steps))
    if s.schedule in (None, "default", "simple"):
        values = _own_spacing(run, s.steps, spec.discard_penultimate)
    else:
        values = sigma_schedules.float32(sigma_schedules.sigmas(s.schedule, table, s.steps, spec.discard_penultimate))
    options = {k: v for k, v in s.sampler_options().items() if k in schedulers.flow_takes(s.scheduler)}
    return _run(spec, model, group, table, values, options, flow=True)


def _own_spacing(run: schedulers.Run, steps: int, discard_penultimate: bool) -> list[float]:
    """FlowMatchEuler's sigmas on ldm's diffusers path; A1111's DPM2 and 3M SDE take one step
    more and drop the next-to-last."""
    from ldm_cli import schedulers

    euler = dataclasses.replace(run, name="euler", schedule="default")
    if not discard_penultimate:
        return schedulers.prepared(euler, steps, "cpu", [0]).sigmas.float().tolist()
    more = schedulers.prepared(euler, steps + 1, "cpu", [0]).sigmas.float().tolist()
    return more[:-2] + more[-1:]


def _mu(model, run: schedulers.Run, steps: int) -> float | None:
    """The dynamic shift ldm's diffusers path gives this image size (None: a static shift)."""
    from ldm_cli import schedulers

    if run.shift is not None or not model.scheduler_config.get("use_dynamic_shifting"):
        return None
    if run.mu:
        return run.mu(run.image_tokens, steps)
    return schedulers.dynamic_shift(run.image_tokens, model.scheduler_config)
