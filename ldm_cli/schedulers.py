"""Scheduler names (ours and A1111's labels) -> a diffusers scheduler built from the model's config.

Each entry is data: the diffusers class, the overrides that make it the named sampler, and the
A1111 label written into PNG metadata. Sigma schedules (karras, exponential, beta) are overrides
on top, accepted only by classes that implement them.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

from ldm_cli.errors import LdmError


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    cls: str
    label: str  # A1111's sampler label
    overrides: dict[str, Any] = field(default_factory=dict)
    stochastic: bool = False  # draws fresh noise at each step


SCHEDULERS: dict[str, SchedulerSpec] = {s.name: s for s in [
    SchedulerSpec("ddim", "DDIMScheduler", "DDIM"),
    SchedulerSpec("pndm", "PNDMScheduler", "PLMS", {"skip_prk_steps": True}),
    SchedulerSpec("ddpm", "DDPMScheduler", "DDPM", stochastic=True),
    SchedulerSpec("lms", "LMSDiscreteScheduler", "LMS"),
    SchedulerSpec("euler", "EulerDiscreteScheduler", "Euler"),
    SchedulerSpec("euler_a", "EulerAncestralDiscreteScheduler", "Euler a", stochastic=True),
    SchedulerSpec("heun", "HeunDiscreteScheduler", "Heun"),
    SchedulerSpec("dpm2", "KDPM2DiscreteScheduler", "DPM2"),
    SchedulerSpec("dpm2_a", "KDPM2AncestralDiscreteScheduler", "DPM2 a", stochastic=True),
    SchedulerSpec("dpmpp_2m", "DPMSolverMultistepScheduler", "DPM++ 2M",
                  {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    SchedulerSpec("dpmpp_2m_sde", "DPMSolverMultistepScheduler", "DPM++ 2M SDE",
                  {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, stochastic=True),
    SchedulerSpec("dpmpp_sde", "DPMSolverSDEScheduler", "DPM++ SDE", stochastic=True),
    SchedulerSpec("unipc", "UniPCMultistepScheduler", "UniPC"),
    SchedulerSpec("deis", "DEISMultistepScheduler", "DEIS"),
    SchedulerSpec("lcm", "LCMScheduler", "LCM", stochastic=True),
]}

# Sigma schedules: our name -> (constructor flag, A1111 "Schedule type" label).
SCHEDULES: dict[str, tuple[str, str]] = {
    "karras": ("use_karras_sigmas", "Karras"),
    "exponential": ("use_exponential_sigmas", "Exponential"),
    "beta": ("use_beta_sigmas", "Beta"),
}
DEFAULT_SCHEDULER = "dpmpp_2m"
DEFAULT_SCHEDULE = "karras"


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").replace("-", " ").split())


def resolve(name: str, schedule: str | None = None) -> tuple[str, str | None]:
    """Accept `dpmpp_2m`, `DPM++ 2M`, `DPM++ 2M Karras`, `Euler a` ...; return (name, schedule).

    A schedule inside an A1111 label ("... Karras") is used unless one is given explicitly.
    """
    wanted = _norm(name)
    for label_schedule in [None, *SCHEDULES]:
        for spec in SCHEDULERS.values():
            for form in (spec.name, spec.label):
                full = _norm(form) + (f" {label_schedule}" if label_schedule else "")
                if full == wanted:
                    return spec.name, schedule if schedule is not None else label_schedule
    choices = ", ".join(SCHEDULERS)
    raise LdmError(f"unknown scheduler {name!r}; choose one of: {choices} (or an A1111 label such as 'DPM++ 2M Karras'); `ldm schedulers` lists them")


def check_schedule(name: str, schedule: str | None) -> None:
    if schedule is None or schedule == "default":
        return
    if schedule not in SCHEDULES:
        raise LdmError(f"unknown schedule {schedule!r}; choose one of: default, {', '.join(SCHEDULES)}")
    flag = SCHEDULES[schedule][0]
    if flag not in inspect.signature(_scheduler_class(name).__init__).parameters:
        raise LdmError(f"scheduler {name!r} has no {schedule} schedule; use --schedule default or another scheduler")


def _scheduler_class(name: str) -> type:
    import diffusers

    return getattr(diffusers, SCHEDULERS[name].cls)


def build(name: str, schedule: str | None, model_config: dict[str, Any], seeds: list[int] | None = None):
    """A fresh scheduler (they are stateful) from the model's own scheduler config."""
    check_schedule(name, schedule)
    cls = _scheduler_class(name)
    overrides = dict(SCHEDULERS[name].overrides)
    if schedule and schedule != "default":
        overrides[SCHEDULES[schedule][0]] = True
    if name == "dpmpp_sde" and seeds is not None:
        # Its Brownian-tree noise is seeded, not drawn from a generator: one seed per image.
        overrides["noise_sampler_seed"] = seeds if len(seeds) > 1 else seeds[0]
    config = {k: v for k, v in model_config.items() if not k.startswith("_")}
    return cls.from_config(config, **overrides)


def label(name: str) -> str:
    return SCHEDULERS[name].label


def schedule_label(schedule: str | None) -> str | None:
    return SCHEDULES[schedule][1] if schedule in SCHEDULES else None


def schedule_from_label(text: str) -> str | None:
    for name, (_, lab) in SCHEDULES.items():
        if _norm(lab) == _norm(text):
            return name
    return None
