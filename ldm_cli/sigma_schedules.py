"""A1111's schedule types: pure functions of (the model's sigma table, steps) -> the sigmas a
k-diffusion-style sampler walks, highest first, ending in 0 (KL Optimal ends at the table's
smallest sigma, as A1111's does). No torch: the arithmetic is float64 Python.

The table is k-diffusion's DiscreteSchedule of a noise-prediction model: sigma_t =
sqrt((1 - alphas_cumprod_t) / alphas_cumprod_t) for its training timesteps, with fractional
timesteps interpolated linearly in log sigma. A flow-matching model's (FlowTable) is its shifted
sigmas over the training timesteps, sigma(t) = shift(t / N) for t = 1..N, as Forge's and ComfyUI's
flow "model sampling" makes it; its timestep of a sigma is sigma * N, what the model is fed.
"""
from __future__ import annotations

import array
import bisect
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable

RHO_KARRAS = 7.0
RHO_POLYEXPONENTIAL = 1.0
BETA_ALPHA = BETA_BETA = 0.6  # A1111's defaults for the Beta schedule
# NVIDIA's Align Your Steps tables for 10 steps (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html)
AYS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)


@dataclass(frozen=True)
class Table:
    """A model's sigmas for its training timesteps, lowest (t = 0) first."""
    sigmas: tuple[float, ...]
    sdxl: bool = False  # which Align Your Steps table applies

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0]

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1]

    def t_to_sigma(self, t: float) -> float:
        low = min(int(math.floor(t)), len(self.sigmas) - 1)
        high = min(low + 1, len(self.sigmas) - 1)
        w = t - low
        return math.exp((1 - w) * math.log(self.sigmas[low]) + w * math.log(self.sigmas[high]))

    def sigma_to_t(self, sigma: float) -> float:
        """The fractional timestep of `sigma` (k-diffusion's, unquantized): clamped to the table."""
        logs = self._logs
        log_sigma = math.log(sigma)
        low = min(max(bisect.bisect_right(logs, log_sigma) - 1, 0), len(logs) - 2)
        w = min(max((logs[low] - log_sigma) / (logs[low] - logs[low + 1]), 0.0), 1.0)
        return (1 - w) * low + w * (low + 1)

    def index_to_sigma(self, x: float) -> float:
        """The sigma at a fractional place in the table (here its timestep)."""
        return self.t_to_sigma(x)

    @functools.cached_property
    def _logs(self) -> list[float]:
        return [math.log(s) for s in self.sigmas]


@dataclass(frozen=True)
class FlowTable(Table):
    """A flow-matching model's table: sigma(t) = its shift of t / N (static, or a dynamic shift's
    mu), for t = 1..N. Timesteps and sigmas map as the model takes them (t = sigma * N, sigma(t)
    = shift(t / N)), so SGM Uniform and Normal space the model's timesteps as Forge does for SD3;
    Uniform walks the table's places evenly (A1111's meaning: t = place + 1)."""
    shift: float = 1.0
    mu: float | None = None  # a dynamic shift: shift = exp(mu) ("exponential") or mu ("linear")
    linear: bool = False  # diffusers' time_shift_type "linear"

    def shifted(self, u: float) -> float:
        """The sigma of unshifted time u in [0, 1] (diffusers' FlowMatchEulerDiscreteScheduler)."""
        if u <= 0:
            return 0.0
        if self.mu is None:
            return self.shift * u / (1 + (self.shift - 1) * u)
        factor = self.mu if self.linear else math.exp(self.mu)
        return factor / (factor + (1 / u - 1))

    def t_to_sigma(self, t: float) -> float:
        return self.shifted(t / len(self.sigmas))

    def sigma_to_t(self, sigma: float) -> float:
        return sigma * len(self.sigmas)

    def index_to_sigma(self, x: float) -> float:
        return self.shifted((x + 1) / len(self.sigmas))


def flow_table(config: dict[str, Any], shift: float | None = None, mu: float | None = None) -> FlowTable:
    """The table of a flow-matching scheduler config: `shift` a static one asked for (it replaces
    a dynamic shift, as on ldm's diffusers path), `mu` the dynamic shift for this image's size."""
    n = config.get("num_train_timesteps", 1000)
    if shift is None and not config.get("use_dynamic_shifting"):
        shift = config.get("shift", 1.0)
    linear = config.get("time_shift_type", "exponential") == "linear"
    empty = FlowTable((), shift=shift or 1.0, mu=None if shift is not None else mu, linear=linear)
    return FlowTable(tuple(empty.shifted(t / n) for t in range(1, n + 1)), shift=empty.shift, mu=empty.mu,
                     linear=linear)


def table(config: dict[str, Any], sdxl: bool = False) -> Table:
    """The sigma table of a diffusers scheduler config (its betas), as A1111 computes it: float64
    betas and cumulative product."""
    n = config.get("num_train_timesteps", 1000)
    start, end = config.get("beta_start", 0.00085), config.get("beta_end", 0.012)
    kind = config.get("beta_schedule", "scaled_linear")
    if kind == "scaled_linear":
        betas = [(math.sqrt(start) + (math.sqrt(end) - math.sqrt(start)) * i / (n - 1)) ** 2 for i in range(n)]
    elif kind == "linear":
        betas = [start + (end - start) * i / (n - 1) for i in range(n)]
    else:
        raise ValueError(f"no sigma table for beta schedule {kind!r}")
    sigmas, product = [], 1.0
    for beta in betas:
        product *= 1 - beta
        sigmas.append(math.sqrt((1 - product) / product))
    return Table(tuple(sigmas), sdxl)


def _linspace(start: float, end: float, n: int) -> list[float]:
    return [start] if n == 1 else [start + (end - start) * i / (n - 1) for i in range(n)]


def uniform(t: Table, n: int) -> list[float]:
    """n places evenly from the table's last to its first (k-diffusion's get_sigmas)."""
    return [t.index_to_sigma(x) for x in _linspace(len(t.sigmas) - 1, 0, n)] + [0.0]


def sgm_uniform(t: Table, n: int) -> list[float]:
    """n + 1 timesteps evenly from sigma_max's to sigma_min's, the last dropped (SGM's spacing)."""
    return [t.t_to_sigma(x) for x in _linspace(t.sigma_to_t(t.sigma_max), t.sigma_to_t(t.sigma_min), n + 1)[:-1]] + [0.0]


def normal(t: Table, n: int) -> list[float]:
    return [t.t_to_sigma(x) for x in _linspace(t.sigma_to_t(t.sigma_max), t.sigma_to_t(t.sigma_min), n)] + [0.0]


def simple(t: Table, n: int) -> list[float]:
    """Every len/n-th sigma of the table from the top."""
    every = len(t.sigmas) / n
    return [t.sigmas[-(1 + int(x * every))] for x in range(n)] + [0.0]


def ddim(t: Table, n: int) -> list[float]:
    """Every len//n-th sigma from timestep 1 up, as DDIM spaces its timesteps."""
    every = max(len(t.sigmas) // n, 1)
    return list(t.sigmas[1::every][::-1]) + [0.0]


def karras(t: Table, n: int, rho: float = RHO_KARRAS) -> list[float]:
    return karras_between(t.sigma_min, t.sigma_max, n, rho)


def karras_between(sigma_min: float, sigma_max: float, n: int, rho: float = RHO_KARRAS) -> list[float]:
    """Karras et al. (2022): n sigmas evenly spaced in sigma^(1/rho), then 0."""
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return [(hi + r * (lo - hi)) ** rho for r in _linspace(0, 1, n)] + [0.0]


def exponential(t: Table, n: int) -> list[float]:
    """Evenly spaced in log sigma."""
    return [math.exp(x) for x in _linspace(math.log(t.sigma_max), math.log(t.sigma_min), n)] + [0.0]


def polyexponential(t: Table, n: int, rho: float = RHO_POLYEXPONENTIAL) -> list[float]:
    """Evenly spaced in log sigma after a ramp^rho (rho 1: exponential)."""
    lo, hi = math.log(t.sigma_min), math.log(t.sigma_max)
    return [math.exp(r ** rho * (hi - lo) + lo) for r in _linspace(1, 0, n)] + [0.0]


def kl_optimal(t: Table, n: int) -> list[float]:
    """Evenly spaced in arctan(sigma) (Sabour et al., 2024), n + 1 values down to sigma_min."""
    lo, hi = math.atan(t.sigma_min), math.atan(t.sigma_max)
    return [math.tan(i / n * lo + (1 - i / n) * hi) for i in range(n + 1)]


def beta(t: Table, n: int) -> list[float]:
    """Timesteps at the quantiles of a Beta(0.6, 0.6) distribution (Lee et al., 2024)."""
    from scipy import stats

    ramp = [1 - x for x in _linspace(0, 1, n)]
    return [t.sigma_min + float(stats.beta.ppf(x, BETA_ALPHA, BETA_BETA)) * (t.sigma_max - t.sigma_min)
            for x in ramp] + [0.0]


def align_your_steps(t: Table, n: int) -> list[float]:
    """NVIDIA's table for the model (SDXL's or SD1's), interpolated log-linearly to n sigmas
    when n is not its length (A1111 compares n with the table's 11 entries, not its 10 steps)."""
    published = list(AYS_SDXL if t.sdxl else AYS_SD1)
    if n == len(published):
        return published + [0.0]
    return loglinear_interp(published, n) + [0.0]


def loglinear_interp(values: list[float], n: int) -> list[float]:
    """n values of a decreasing sequence, interpolated linearly in log between its points."""
    logs = [math.log(v) for v in reversed(values)]
    out = []
    for x in _linspace(0, 1, n):
        position = x * (len(logs) - 1)
        low = min(int(position), len(logs) - 2)
        w = position - low
        out.append(math.exp(logs[low] + w * (logs[low + 1] - logs[low])))
    return out[::-1]


# Our name -> (A1111 label, function)
SCHEDULE_TYPES: dict[str, tuple[str, Callable[[Table, int], list[float]]]] = {
    "uniform": ("Uniform", uniform),
    "karras": ("Karras", karras),
    "exponential": ("Exponential", exponential),
    "polyexponential": ("Polyexponential", polyexponential),
    "sgm_uniform": ("SGM Uniform", sgm_uniform),
    "kl_optimal": ("KL Optimal", kl_optimal),
    "align_your_steps": ("Align Your Steps", align_your_steps),
    "simple": ("Simple", simple),
    "normal": ("Normal", normal),
    "ddim": ("DDIM", ddim),
    "beta": ("Beta", beta),
}


def float32(values: list[float]) -> list[float]:
    """The values as float32 holds them: the sigmas A1111's tensors carry, kept as host floats."""
    return array.array("f", values).tolist()


def sigmas(schedule: str, t: Table, steps: int, discard_penultimate: bool = False) -> list[float]:
    """The sigmas of `schedule` for `steps` steps; `discard_penultimate`: A1111's DPM2 and 3M SDE
    take one step more and drop the next-to-last sigma."""
    function = SCHEDULE_TYPES[schedule][1]
    if not discard_penultimate:
        return function(t, steps)
    out = function(t, steps + 1)
    return out[:-2] + out[-1:]
