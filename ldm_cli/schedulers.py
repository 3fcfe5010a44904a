"""Scheduler names (ours and A1111's labels) -> a diffusers scheduler built from the model's config.

Each entry is data: the diffusers class, the overrides that make it the named sampler, and the
A1111 label written into PNG metadata. Sigma schedules (karras, exponential, beta) are overrides
on top, accepted only by classes that implement them.

A1111's k-diffusion samplers also run as ldm's own (ksamplers.py) over the sigmas of any of its
schedule types (sigma_schedules.py): the samplers diffusers lacks always, the others when their
schedule type is one diffusers lacks (a diffusers class keeps its pixel parity where it can run).
"""
from __future__ import annotations

import difflib
import functools
import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ldm_cli import sigma_schedules
from ldm_cli.errors import LdmError

# Sigma schedules: our name -> (constructor flag, A1111 "Schedule type" label).
SCHEDULES: dict[str, tuple[str, str]] = {
    "karras": ("use_karras_sigmas", "Karras"),
    "exponential": ("use_exponential_sigmas", "Exponential"),
    "beta": ("use_beta_sigmas", "Beta"),
}
ALL_SCHEDULES = tuple(SCHEDULES)
# Every schedule type, ours -> A1111's label: those above and the ones only ldm's k-diffusion path runs
SCHEDULE_TYPES: dict[str, str] = {name: label for name, (label, _) in sigma_schedules.SCHEDULE_TYPES.items()}


@dataclass(frozen=True)
class SchedulerSpec:
    name: str
    cls: str | None  # the diffusers class; None: ldm's k-diffusion sampler only
    label: str  # A1111's sampler label
    overrides: dict[str, Any] = field(default_factory=dict)
    stochastic: bool = False  # draws fresh noise at each step
    # the sigma schedules its diffusers class takes, as data so that listing them needs no
    # diffusers import (tests/test_schedulers.py checks them against the classes)
    schedules: tuple[str, ...] = ()
    # computes its sigmas from the shift alone, taking neither given sigmas nor a dynamic shift's
    # mu: a family with a spacing of its own (FLUX) cannot run it
    shift_only: bool = False
    # A1111's k-diffusion sampler of the name (a ksamplers function), or None; cls None: that one only
    k: str | None = None
    k_schedule: str = "uniform"  # what A1111's "Automatic" schedule type gives it
    discard_penultimate: bool = False  # one step more, its next-to-last sigma dropped (A1111's DPM2, 3M SDE)
    brownian: bool = False  # its noise from a Brownian tree seeded per image (A1111's SDE samplers)
    takes: tuple[str, ...] = ()  # the A1111 options it takes (eta, s_churn ...: settings.SAMPLER_OPTIONS)
    # A1111's "second_order": about two denoiser calls a step, so its prompt schedules (which count
    # calls) span twice the steps (prompt_steps)
    second_order: bool = False
    # CFG++ (ddim_cfgpp.py): guidance at cfg / 12.5, the step along the negative's prediction (so
    # the negative is always encoded); its own timesteps, no schedule type
    cfg_pp: bool = False

    @property
    def any_schedule(self) -> bool:
        """Whether it walks any schedule type's sigmas on k-diffusion's path, on any model: every
        k-diffusion sampler but DDIM CFG++, which keeps a DDPM model's DDIM timesteps."""
        return self.k is not None and not self.cfg_pp


CHURN = ("s_churn", "s_tmin", "s_tmax", "s_noise")
ANCESTRAL = ("eta", "s_noise")
SCHEDULERS: dict[str, SchedulerSpec] = {s.name: s for s in [
    SchedulerSpec("ddim", "DDIMScheduler", "DDIM"),
    SchedulerSpec("pndm", "PNDMScheduler", "PLMS", {"skip_prk_steps": True}),
    SchedulerSpec("ddpm", "DDPMScheduler", "DDPM", stochastic=True),
    SchedulerSpec("lms", "LMSDiscreteScheduler", "LMS", schedules=ALL_SCHEDULES, k="lms"),
    SchedulerSpec("euler", "EulerDiscreteScheduler", "Euler", schedules=ALL_SCHEDULES, k="euler", takes=CHURN),
    SchedulerSpec("euler_a", "EulerAncestralDiscreteScheduler", "Euler a", stochastic=True, k="euler_a",
                  takes=ANCESTRAL),
    SchedulerSpec("heun", "HeunDiscreteScheduler", "Heun", schedules=ALL_SCHEDULES, k="heun", takes=CHURN,
                  second_order=True),
    SchedulerSpec("dpm2", "KDPM2DiscreteScheduler", "DPM2", schedules=ALL_SCHEDULES, k="dpm2", k_schedule="karras",
                  discard_penultimate=True, takes=CHURN, second_order=True),
    SchedulerSpec("dpm2_a", "KDPM2AncestralDiscreteScheduler", "DPM2 a", stochastic=True, schedules=ALL_SCHEDULES,
                  k="dpm2_a", k_schedule="karras", discard_penultimate=True, takes=ANCESTRAL, second_order=True),
    SchedulerSpec("dpmpp_2m", "DPMSolverMultistepScheduler", "DPM++ 2M",
                  {"algorithm_type": "dpmsolver++", "solver_order": 2}, schedules=ALL_SCHEDULES, k="dpmpp_2m",
                  k_schedule="karras"),
    SchedulerSpec("dpmpp_2m_sde", "DPMSolverMultistepScheduler", "DPM++ 2M SDE",
                  {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}, stochastic=True, schedules=ALL_SCHEDULES,
                  k="dpmpp_2m_sde", k_schedule="exponential", brownian=True, takes=ANCESTRAL),
    SchedulerSpec("dpmpp_sde", "DPMSolverSDEScheduler", "DPM++ SDE", stochastic=True, schedules=ALL_SCHEDULES,
                  k="dpmpp_sde", k_schedule="karras", brownian=True, takes=ANCESTRAL, second_order=True),
    SchedulerSpec("unipc", "UniPCMultistepScheduler", "UniPC", schedules=ALL_SCHEDULES),
    SchedulerSpec("deis", "DEISMultistepScheduler", "DEIS", schedules=ALL_SCHEDULES),
    SchedulerSpec("lcm", "LCMScheduler", "LCM", stochastic=True),
    # k-diffusion's only
    SchedulerSpec("dpmpp_2m_sde_heun", None, "DPM++ 2M SDE Heun", stochastic=True, k="dpmpp_2m_sde_heun",
                  k_schedule="exponential", brownian=True, takes=ANCESTRAL),
    SchedulerSpec("dpmpp_2s_a", None, "DPM++ 2S a", stochastic=True, k="dpmpp_2s_a", k_schedule="karras",
                  takes=ANCESTRAL, second_order=True),
    SchedulerSpec("dpmpp_3m_sde", None, "DPM++ 3M SDE", stochastic=True, k="dpmpp_3m_sde", k_schedule="exponential",
                  discard_penultimate=True, brownian=True, takes=ANCESTRAL),
    SchedulerSpec("dpm_fast", None, "DPM fast", stochastic=True, k="dpm_fast", takes=ANCESTRAL),
    SchedulerSpec("dpm_adaptive", None, "DPM adaptive", stochastic=True, k="dpm_adaptive", takes=("eta",)),
    SchedulerSpec("restart", None, "Restart", stochastic=True, k="restart", k_schedule="karras", second_order=True),
    SchedulerSpec("ddim_cfgpp", None, "DDIM CFG++", k="ddim_cfgpp", cfg_pp=True),
]}

# Flow-matching models (SD3) take these names through diffusers: its flow-matching Euler and Heun,
# and the multistep solvers on flow sigmas. Karras, exponential and beta spacing exist for Euler
# only (the solvers would compute them from a DDPM beta schedule that flow models do not have).
# k-diffusion's samplers run the rest on the flow form of ksampling.KRun, as Forge offers them.
FLOW_SIGMAS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
FLOW_SCHEDULERS: dict[str, SchedulerSpec] = {s.name: s for s in [
    SchedulerSpec("euler", "FlowMatchEulerDiscreteScheduler", "Euler", schedules=ALL_SCHEDULES),
    SchedulerSpec("heun", "FlowMatchHeunDiscreteScheduler", "Heun", shift_only=True),
    SchedulerSpec("dpmpp_2m", "DPMSolverMultistepScheduler", "DPM++ 2M",
                  {"algorithm_type": "dpmsolver++", "solver_order": 2, **FLOW_SIGMAS}),
    SchedulerSpec("unipc", "UniPCMultistepScheduler", "UniPC", FLOW_SIGMAS),
]}

DEFAULT_SCHEDULER = "dpmpp_2m"
DEFAULT_SCHEDULE = "karras"


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("_", " ").replace("-", " ").split())


def resolve(name: str, schedule: str | None = None) -> tuple[str, str | None]:
    """Accept `dpmpp_2m`, `DPM++ 2M`, `DPM++ 2M Karras`, `Euler a` ... in any case; return (name, schedule).

    A schedule inside an A1111 label ("... Karras") is used unless one is given explicitly.
    """
    forms = _spellings()
    wanted = _norm(name)
    if wanted in forms:
        found, label_schedule, _ = forms[wanted]
        return found, schedule if schedule is not None else label_schedule
    hint = _did_you_mean(wanted, {k: written for k, (_, _, written) in forms.items()})
    hint = hint or f"; choose one of: {', '.join(SCHEDULERS)} (or an A1111 label such as 'DPM++ 2M Karras')"
    raise LdmError(f"unknown scheduler {name!r}{hint}; `ldm schedulers` lists them")


@functools.cache  # prompt files resolve a name per line
def _spellings() -> dict[str, tuple[str, str | None, str]]:
    """Every accepted spelling, normalized -> (scheduler, the schedule it names, as written)."""
    forms: dict[str, tuple[str, str | None, str]] = {}
    for schedule in [None, *SCHEDULES]:
        suffix = f" {SCHEDULES[schedule][1]}" if schedule else ""
        for spec in SCHEDULERS.values():
            for form in (spec.name, spec.label):
                forms.setdefault(_norm(form + suffix), (spec.name, schedule, form + suffix))
    return forms


def schedule_name(text: str) -> str:
    """`default` or a schedule type's name or A1111 label ("SGM Uniform"), case ignored."""
    wanted = _norm(text)
    choices = ["default", *SCHEDULE_TYPES]
    forms = {_norm(c): c for c in choices} | {_norm(label): name for name, label in SCHEDULE_TYPES.items()}
    forms[_norm("Automatic")] = "default"
    if wanted in forms:
        return forms[wanted]
    hint = _did_you_mean(wanted, {c: c for c in choices})
    raise LdmError(f"unknown schedule {text!r}{hint}; choose one of: {', '.join(choices)}")


def _did_you_mean(wanted: str, forms: dict[str, str]) -> str:
    """' (did you mean X?)' for the form whose key is closest to `wanted`, or '' if none is close."""
    close = difflib.get_close_matches(wanted, forms, n=1)
    return f" (did you mean {forms[close[0]]!r}?)" if close else ""


def cfg_pp(name: str | None) -> bool:
    """Whether the sampler guides as CFG++ does (and so always needs the negative)."""
    spec = SCHEDULERS.get(name) if name is not None else None
    return spec is not None and spec.cfg_pp


def prompt_steps(name: str | None, steps: int) -> int:
    """The steps A1111 spreads a prompt schedule (`[a:b:0.5]`, alternation) over: twice `steps`
    for a second-order sampler, since the schedule advances with each denoiser call, on either
    path (diffusers' second-order classes, Heun's and DPM2's, have a timestep per call too)."""
    spec = SCHEDULERS.get(name) if name is not None else None
    return steps * 2 if spec is not None and spec.second_order else steps


def validated(name: str | None, schedule: str | None) -> tuple[str | None, str | None]:
    """(scheduler, schedule) with names checked, case ignored, and the pair checked when both
    are known; None stays None (the model's default fills it)."""
    if schedule is not None:
        schedule = schedule_name(schedule)
    if name is None:
        return None, schedule
    name, schedule = resolve(name, schedule)
    check_schedule(name, schedule)
    return name, schedule


def supports(name: str, schedule: str) -> bool:
    """Whether the sampler runs the schedule: its diffusers class's, or any through k-diffusion's
    path. "simple" is also Forge's name for a flow model's own spacing, checked with the model."""
    spec = SCHEDULERS[name]
    return schedule in ("default", "simple") or schedule in spec.schedules or spec.any_schedule


def uses_k(name: str, schedule: str | None, options: bool = False, flow: bool = False,
           own_sigmas: bool = False) -> bool:
    """Whether the pair runs through ldm's k-diffusion samplers rather than a diffusers class:
    those diffusers lacks, and the others with a schedule type or `options` (eta ...) it lacks.
    `flow`: on a flow-matching model, whose diffusers classes are FLOW_SCHEDULERS (`own_sigmas`:
    a family with its own spacing, which a shift-only class cannot take)."""
    spec = SCHEDULERS[name]
    if flow:
        ours = FLOW_SCHEDULERS.get(name)
        return spec.k is not None and (ours is None or (own_sigmas and ours.shift_only) or options
                                       or schedule not in (None, "default", "simple", *ours.schedules))
    return spec.cls is None or (spec.k is not None and (options or schedule not in (None, "default", *spec.schedules)))


def flow_takes(name: str) -> tuple[str, ...]:
    """The A1111 options a sampler takes on a flow-matching model: not churn, which raises a VE
    model's noise (above sigma 1 on a flow model)."""
    takes = SCHEDULERS[name].takes
    return () if takes == CHURN else takes


def check_schedule(name: str, schedule: str | None) -> None:
    if schedule is None:
        return
    if not supports(name, schedule_name(schedule)):
        raise LdmError(f"scheduler {name!r} has no {schedule} schedule; use --schedule default or another scheduler")


class LabelledFamily(Protocol):
    """What check_for_model reads of a model's family: a families.family.Family, not imported
    because families sit above the settings, which import this module."""
    label: str


def flow_names() -> list[str]:
    """The schedulers a flow-matching model takes: diffusers' flow classes and k-diffusion's samplers
    (not DDIM CFG++, which walks a DDPM model's timesteps)."""
    return [n for n, spec in SCHEDULERS.items() if n in FLOW_SCHEDULERS or spec.any_schedule]


def check_for_model(name: str, schedule: str | None, flow: bool, family: LabelledFamily | None = None) -> None:
    """A flow-matching model takes FLOW_SCHEDULERS' names with their schedules, and k-diffusion's
    samplers with every schedule type but Align Your Steps."""
    if not flow:
        spec = SCHEDULERS[name]  # "simple" passed supports() as a flow model's name; here it is A1111's type
        if schedule not in (None, "default", *spec.schedules) and spec.k is None:
            raise LdmError(f"scheduler {name!r} has no {schedule} schedule; use --schedule default or another scheduler")
        return
    if SCHEDULERS[name].any_schedule:
        if schedule == "align_your_steps":
            raise LdmError("the align_your_steps schedule is NVIDIA's tables for SD 1.x and SDXL, not flow-matching "
                           "models; use another --schedule (sgm_uniform, beta, karras ...)")
        return
    if name not in FLOW_SCHEDULERS:
        raise LdmError(f"scheduler {name!r} does not work with flow-matching models such as SD3; "
                       f"use one of: {', '.join(flow_names())}")
    if schedule not in (None, "default", "simple", *FLOW_SCHEDULERS[name].schedules):
        raise LdmError(f"scheduler {name!r} has no {schedule} schedule for flow-matching models; use --schedule "
                       "default or a k-diffusion sampler (euler, dpmpp_2m ...)")


@dataclass(frozen=True)
class Run:
    """A sampler run as a model's pipeline sets it up: what `finishes` needs to try it."""
    name: str
    schedule: str | None
    model_config: dict[str, Any]
    flow: bool = False
    shift: float | None = None
    image_tokens: int = 4096  # a size-dependent shift's input
    spacing: Callable[[int], list[float]] | None = None  # the family's own sigma spacing (FLUX)
    mu: Callable[[int, int], float] | None = None  # the family's own size-dependent shift (FLUX.2)


def finishes(run: Run, steps: int) -> bool:
    """Whether `steps` steps run to the end: tried on a one-pixel latent with a zero model output,
    which fails as the real run would (diffusers raises, indexes past its tables, or divides by
    a repeated sigma into NaN) at a thousandth of its cost. Remembered per run and step count."""
    key = (run.name, run.schedule, repr(sorted(run.model_config.items())), run.flow, run.shift,
           run.image_tokens, run.spacing, run.mu, steps)
    if key not in _FINISHED:
        _FINISHED[key] = _try(run, steps)
    return _FINISHED[key]


_FINISHED: dict[tuple, bool] = {}


def _try(run: Run, steps: int) -> bool:
    import torch

    try:
        scheduler = prepared(run, steps, "cpu", [0])
        x = torch.ones(1, 1, 1, 1) * float(getattr(scheduler, "init_noise_sigma", 1.0))
        takes = inspect.signature(scheduler.step).parameters
        kwargs = {"generator": torch.Generator().manual_seed(0)} if "generator" in takes else {}
        for t in scheduler.timesteps:
            if hasattr(scheduler, "scale_model_input"):
                x = scheduler.scale_model_input(x, t)
            x = scheduler.step(torch.zeros_like(x), t, x, **kwargs).prev_sample
        return bool(torch.isfinite(x).all())
    except (ValueError, IndexError, AssertionError, ZeroDivisionError):
        return False


def prepared(run: Run, steps: int, device, seeds: list[int]):
    """A fresh scheduler for `run`, its timesteps set for `steps` on `device` (one seed per image)."""
    scheduler = build(run.name, run.schedule, run.model_config, seeds, run.flow, run.shift)
    set_timesteps(scheduler, steps, device, run.model_config, run.image_tokens, run.spacing, run.mu)
    return scheduler


def check_steps(run: Run, steps: int) -> None:
    """Refuse, in one line naming the most it takes, a step count the sampler cannot finish with
    this model (LCM's 50-step distilled schedule; with SD's offset spacing, about as many steps
    as training timesteps)."""
    if finishes(run, steps):
        return
    low, high = 0, steps  # finishes(low) (or low is 0), not finishes(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if finishes(run, middle) else (low, middle)
    raise LdmError(f"--steps {steps} is more than the {label(run.name)} sampler can run with this model "
                   f"(at most {low}); use fewer steps or another --scheduler")


def _scheduler_class(name: str, flow: bool = False) -> type:
    import diffusers

    return getattr(diffusers, (FLOW_SCHEDULERS if flow else SCHEDULERS)[name].cls)


def _shift(cls: type, shift: float) -> dict[str, float]:
    """The flow model's timestep shift, under the name `cls` gives it."""
    return {"shift": shift} if cls.__name__.startswith("FlowMatch") else {"flow_shift": shift}


def build(name: str, schedule: str | None, model_config: dict[str, Any], seeds: list[int] | None = None,
          flow: bool = False, shift: float | None = None):
    """A fresh scheduler (they are stateful) from the model's own scheduler config; `flow` takes
    the flow-matching form of the name, `shift` overrides the model's timestep shift."""
    name, schedule = validated(name, schedule)
    check_for_model(name, schedule, flow)
    cls = _scheduler_class(name, flow)
    overrides = dict((FLOW_SCHEDULERS if flow else SCHEDULERS)[name].overrides)
    if flow:
        overrides.update(_shift(cls, shift if shift is not None else model_config.get("shift", 1.0)))
        if shift is not None and model_config.get("use_dynamic_shifting"):
            overrides["use_dynamic_shifting"] = False  # a shift asked for replaces the size-dependent one
    if schedule and schedule not in ("default", "simple"):  # simple: Forge's label of a flow model's own
        overrides[SCHEDULES[schedule][0]] = True
    if name == "dpmpp_sde" and seeds is not None:
        # Its Brownian-tree noise is seeded, not drawn from a generator: one seed per image.
        overrides["noise_sampler_seed"] = seeds if len(seeds) > 1 else seeds[0]
    config = {k: v for k, v in model_config.items() if not k.startswith("_")}
    return cls.from_config(config, **overrides)


def set_timesteps(scheduler, steps: int, device, model_config: dict[str, Any], image_tokens: int,
                  spacing: Callable[[int], list[float]] | None = None,
                  mu: Callable[[int, int], float] | None = None) -> None:
    """Timesteps as the family's diffusers pipeline sets them: its own spacing (FLUX's) where the
    scheduler takes given sigmas (the multistep solvers keep their flow sigmas, as there), and a
    dynamic shift's mu from the image's token count where the schedule shifts by size (the
    family's own `mu` of tokens and steps where it has one: FLUX.2)."""
    kwargs: dict[str, Any] = {}
    takes = inspect.signature(scheduler.set_timesteps).parameters
    if spacing is not None and "sigmas" in takes and not scheduler.config.get("use_flow_sigmas"):
        kwargs["sigmas"] = spacing(steps)
    if scheduler.config.get("use_dynamic_shifting"):
        kwargs["mu"] = mu(image_tokens, steps) if mu else dynamic_shift(image_tokens, model_config)
    scheduler.set_timesteps(steps, device=device, **kwargs)
    if hasattr(scheduler, "set_begin_index"):
        # the run starts at the first timestep, even where the schedule repeats it: many steps of a
        # Beta schedule round several sigmas to one integer timestep, and diffusers' lookup of the
        # first one would start at its repeat and step past the end (img2img sets its own start)
        scheduler.set_begin_index(0)


def dynamic_shift(image_tokens: int, config: dict[str, Any]) -> float:
    """mu, the log of the shift: linear in the image's token count, from base_shift at
    base_image_seq_len to max_shift at max_image_seq_len (diffusers' calculate_shift, same arithmetic)."""
    base_len, max_len = config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096)
    base, most = config.get("base_shift", 0.5), config.get("max_shift", 1.15)
    m = (most - base) / (max_len - base_len)
    return image_tokens * m + (base - m * base_len)


def label(name: str) -> str:
    return SCHEDULERS[name].label


def schedule_label(schedule: str | None) -> str | None:
    return SCHEDULE_TYPES.get(schedule)


def schedule_from_label(text: str) -> str | None:
    for name, lab in SCHEDULE_TYPES.items():
        if _norm(lab) == _norm(text):
            return name
    return None
