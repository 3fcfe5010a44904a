"""A1111's k-diffusion samplers and schedule types on flow-matching models (Forge's offer): on a
tiny SD3 and FLUX.1 dev, each image equals k-diffusion's own sampler run with a flow denoiser
(denoised = x - sigma v, the model fed sigma * 1000) over the schedule's sigmas as Forge and
ComfyUI compute them from the shifted flow table, within 2/255; the samplers that draw fresh noise
keep a flow model's mix (1 - sigma) x0 + sigma noise."""
import json
import math
import re

import numpy as np
import pytest
import torch
from PIL import Image, PngImagePlugin
from typer.testing import CliRunner

from ldm_cli import dpm_solver, ksamplers, loading, pipeline, render, schedulers, sigma_schedules, vae
from ldm_cli.cli import app
from ldm_cli.settings import Settings
from tests import kdiffusion

N = 1000  # the models' training timesteps


@pytest.fixture(scope="module")
def models(sd3_folder, flux_dev_folder):
    return {"sd3": loading.load(str(sd3_folder)), "flux": loading.load(str(flux_dev_folder))}


def settings(model, scheduler: str, schedule: str, **extra) -> Settings:
    """The model's cfg; a negative prompt where it is guided (unguided, ldm's once-a-process note
    that it is unused would be said here rather than where other tests look for it)."""
    negative = "blurry" if model.defaults.get("cfg", 7.5) != 1 else None
    s = Settings(prompt="a red fox in snow", negative=negative, steps=4, seed=1234, scheduler=scheduler,
                 schedule=schedule, width=64, height=64, **extra)
    return render.resolved(s, model)


def shift_of(model, s: Settings):
    """sigma of unshifted time u: SD3's static shift 3, FLUX dev's mu for the image's tokens."""
    config = model.scheduler_config
    if not config.get("use_dynamic_shifting"):
        return lambda u: config["shift"] * u / (1 + (config["shift"] - 1) * u)
    tokens = (s.width // 16) * (s.height // 16)
    m = (config["max_shift"] - config["base_shift"]) / (config["max_image_seq_len"] - config["base_image_seq_len"])
    mu = tokens * m + config["base_shift"] - m * config["base_image_seq_len"]
    return lambda u: math.exp(mu) / (math.exp(mu) + 1 / u - 1)


def flow_sigmas(shift, schedule: str, n: int) -> list[float]:
    """The schedule types on a flow table, Forge's SD3 way: table[t - 1] = shift(t / N), a sigma's
    timestep sigma * N and a timestep's sigma shift(t / N); Uniform walks the table's places."""
    sampling, _ = kdiffusion.load()
    table = [shift(t / N) for t in range(1, N + 1)]
    lo, hi = table[0], table[-1]
    if schedule in ("karras", "exponential", "polyexponential"):
        return getattr(sampling, f"get_sigmas_{schedule}")(n, lo, hi).tolist()
    if schedule == "uniform":
        return [shift((x + 1) / N) for x in np.linspace(N - 1, 0, n)] + [0.0]
    if schedule in ("sgm_uniform", "normal"):
        ts = np.linspace(hi * N, lo * N, n + 1)[:-1] if schedule == "sgm_uniform" else np.linspace(hi * N, lo * N, n)
        return [shift(t / N) for t in ts] + [0.0]
    if schedule == "simple":
        return [table[-(1 + int(x * N / n))] for x in range(n)] + [0.0]
    if schedule == "ddim":
        return table[1::max(N // n, 1)][::-1] + [0.0]
    if schedule == "kl_optimal":
        return [math.tan(i / n * math.atan(lo) + (1 - i / n) * math.atan(hi)) for i in range(n + 1)]
    assert schedule == "beta"
    from scipy import stats
    return [lo + stats.beta.ppf(x, 0.6, 0.6) * (hi - lo) for x in 1 - np.linspace(0, 1, n)] + [0.0]


def diffusers_sigmas(model, s: Settings, n: int) -> list[float]:
    """FlowMatchEuler's own sigmas, as the model's diffusers pipeline sets them."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(model.scheduler_config)
    if model.family.sigmas is None:
        scheduler.set_timesteps(n)
    else:
        mu = math.log(shift_of(model, s)(0.5) / (1 - shift_of(model, s)(0.5)))  # shift(1/2) = e^mu / (e^mu + 1)
        scheduler.set_timesteps(sigmas=list(np.linspace(1.0, 1 / n, n)), mu=mu)
    return scheduler.sigmas.tolist()


def sigmas_for(model, s: Settings, schedule: str, discard_penultimate: bool) -> torch.Tensor:
    n = s.steps + discard_penultimate
    values = diffusers_sigmas(model, s, n) if schedule == "default" else flow_sigmas(shift_of(model, s), schedule, n)
    if discard_penultimate:
        values = values[:-2] + values[-1:]
    return torch.tensor(values, dtype=torch.float32)


def flow_denoiser(model, s: Settings):
    """k-diffusion's view of a flow model: denoised = x - sigma * v at timestep sigma * 1000, CFG
    on the denoised images (FLUX dev's cfg 1: its distilled guidance alone)."""
    positive, negative = pipeline.encode_prompts(model, [s])
    cond = positive[0][0][1].conds[0]
    uncond = None if negative is None else negative[0].conds[0]

    def den(x, sigma, c):
        return x - sigma.view(-1, 1, 1, 1) * model.family.predict(model, x, (sigma * N).view(-1), c)

    def cfg_model(x, sigma, **_):
        out = den(x, sigma, cond)
        return out if uncond is None else den(x, sigma, uncond) + (out - den(x, sigma, uncond)) * s.cfg
    return cfg_model


OWN_STEPS = kdiffusion.OWN_STEPS


def reference_image(model, s: Settings, schedule: str, **options) -> np.ndarray:
    sampling, _ = kdiffusion.load()
    spec = schedulers.SCHEDULERS[s.scheduler]
    sigmas = sigmas_for(model, s, schedule, spec.discard_penultimate)
    x, name, kwargs = kdiffusion.start(sampling, model, s, sigmas, "eta" in spec.takes)
    if s.scheduler in OWN_STEPS:
        kwargs = {**kwargs, "sigma_min": sigmas[-2].item(), "sigma_max": sigmas[0].item(),
                  **({"n": s.steps} if s.scheduler == "dpm_fast" else {})}
    with torch.inference_mode():
        latents = getattr(sampling, name)(flow_denoiser(model, s), x, *([] if s.scheduler in OWN_STEPS else [sigmas]),
                                          disable=True, **kwargs, **options)
        return np.asarray(vae.decode(model, latents)[0]).astype(np.int16)


def ours(model, s: Settings) -> np.ndarray:
    return np.asarray(pipeline.text_to_image(model, [s])[0]).astype(np.int16)


CASES = [  # the samplers that solve the ODE as they do on any model, and every schedule type on one
    ("euler", "sgm_uniform", {}), ("heun", "karras", {}), ("dpm2", "beta", {}), ("lms", "normal", {}),
    ("dpmpp_2m", "kl_optimal", {}), ("lms", "default", {}), ("dpm2", "default", {}),
    ("euler", "uniform", {}), ("dpm2", "exponential", {}), ("lms", "polyexponential", {}), ("heun", "ddim", {}),
    # the ancestral ones without their fresh noise are k-diffusion's (the noise: below)
    ("euler_a", "default", {"eta": 0.0}), ("dpm2_a", "karras", {"eta": 0.0}),
    ("dpmpp_2s_a", "sgm_uniform", {"eta": 0.0}), ("dpmpp_sde", "beta", {"eta": 0.0}),
    ("dpm_fast", "default", {"eta": 0.0}), ("dpm_adaptive", "karras", {"eta": 0.0}), ("restart", "sgm_uniform", {}),
]


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("name, schedule, options", CASES)
def test_each_sampler_and_schedule_equals_k_diffusions(models, family, name, schedule, options):
    model = models[family]
    s = settings(model, name, schedule, **options)
    assert s.sampler_options() == options  # eta is run and recorded on a flow model too
    mine = ours(model, s)
    assert mine.std() > 1
    assert np.abs(mine - reference_image(model, s, schedule, **options)).max() <= 2


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_default_schedule_is_the_diffusers_paths_sigmas(models, family, monkeypatch):
    model = models[family]
    s = settings(model, "euler", "default")
    monkeypatch.setattr(pipeline, "k_path", lambda *_: True)
    run = pipeline.make_scheduler(model, [s])
    assert type(run).__name__ == "KRun"
    assert torch.equal(run.sigmas, torch.tensor(diffusers_sigmas(model, s, s.steps), dtype=torch.float32))


@pytest.mark.parametrize("folder", ["sd3_folder", "flux_dev_folder", "flux_schnell_folder", "chroma_folder",
                                    "zimage_turbo_folder", "flux2_klein_folder", "qwen_image_folder"])
def test_euler_on_the_k_path_is_the_diffusers_path(request, folder, monkeypatch):
    """Every flow family's timestep, output and spacing read alike on both paths (Z-Image's
    1 - t, FLUX.2's mu of steps, Qwen-Image's terminal stretch): Euler gives the same image."""
    model = loading.load(str(request.getfixturevalue(folder)))
    s = settings(model, "euler", "default").merged(steps=3)
    diffusers_path = ours(model, s)
    monkeypatch.setattr(pipeline, "k_path", lambda *_: True)
    k_path = ours(model, s)
    assert diffusers_path.std() > 1 and np.abs(k_path - diffusers_path).max() <= 2


@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("schedule", [t for t in sigma_schedules.SCHEDULE_TYPES if t != "align_your_steps"])
@pytest.mark.parametrize("steps", [1, 7, 30])
def test_the_schedules_on_a_flow_table_are_forges(models, family, schedule, steps):
    model = models[family]
    s = settings(model, "euler", "default")
    shift = shift_of(model, s)
    mu = None if family == "sd3" else math.log(shift(0.5) / (1 - shift(0.5)))
    table = sigma_schedules.flow_table(model.scheduler_config, None, mu)
    mine = sigma_schedules.sigmas(schedule, table, steps)
    ref = flow_sigmas(shift, schedule, steps)
    assert len(mine) == len(ref) and mine[0] <= 1.0
    assert all(math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7) for a, b in zip(mine, ref)), (mine, ref)


def test_a_static_shift_asked_for_replaces_fluxs_dynamic_one(models):
    table = sigma_schedules.flow_table(models["flux"].scheduler_config, 2.0, mu=0.9)
    assert table.sigmas[499] == pytest.approx(2.0 * 0.5 / 1.5)


@pytest.mark.parametrize("name", ["dpmpp_2m_sde", "dpmpp_2m_sde_heun", "dpmpp_3m_sde"])
def test_sde_samplers_are_k_diffusions_in_the_flow_models_ve_form(models, name):
    """With lambda = log(alpha / sigma), a flow model's SDE step is k-diffusion's on x / alpha at
    sigma / alpha (the same model, the same noise): equal below sigma 1, where that form is finite."""
    sampling, _ = kdiffusion.load()
    model = models["sd3"]
    s = settings(model, name, "karras")
    sigmas = sigmas_for(model, s, "karras", schedulers.SCHEDULERS[name].discard_penultimate)[1:]
    den = flow_denoiser(model, s)
    draws = [torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(20)]
    x = draws[-1] * sigmas[0]

    def noise():
        it = iter(draws)
        return lambda *_: next(it)

    def ve_den(x_ve, sigma_ve, **_):
        sigma = sigma_ve / (1 + sigma_ve)
        return den(x_ve * (1 - sigma), sigma)

    with torch.inference_mode():
        mine = getattr(ksamplers, f"{name}_flow")(lambda x, sigma: den(x, sigma.view(1)), x, sigmas, noise(),
                                                  lambda i, x: x, eta=1.0)
        function, kwargs = ("sample_dpmpp_3m_sde", {}) if name == "dpmpp_3m_sde" else (
            "sample_dpmpp_2m_sde", {"solver_type": "heun" if name.endswith("heun") else "midpoint"})
        theirs = getattr(sampling, function)(ve_den, x / (1 - sigmas[0]), sigmas / (1 - sigmas), disable=True,
                                             noise_sampler=noise(), **kwargs)
    assert torch.allclose(mine, theirs, atol=1e-4), (mine - theirs).abs().max()


FLOW_NOISE = [ksamplers.euler_a_flow, ksamplers.dpm2_a_flow, ksamplers.dpmpp_2s_a_flow, ksamplers.dpmpp_sde_flow,
              ksamplers.dpmpp_2m_sde_flow, ksamplers.dpmpp_2m_sde_heun_flow, ksamplers.dpmpp_3m_sde_flow,
              dpm_solver.dpm_fast_flow, dpm_solver.dpm_adaptive_flow]


@pytest.mark.parametrize("sampler", FLOW_NOISE, ids=lambda f: f.__name__)
@pytest.mark.parametrize("eta", [1.0, 0.5])
def test_fresh_noise_keeps_a_flow_models_mix(sampler, eta):
    """With a perfect denoiser (it returns x0), x stays (1 - sigma) x0 + sigma noise with unit noise
    at every sigma: what a flow model expects. A VE sampler's steps keep the noise's share but not
    the image's: x0's weight ends at 1 - sigma_down."""
    x0 = torch.full((1, 4, 256, 256), 0.4)
    sigmas = torch.tensor([1.0, 0.8, 0.55, 0.3])
    generator = torch.Generator().manual_seed(0)

    def run(function):
        x = torch.randn(x0.shape, generator=generator)
        noise = lambda *_: torch.randn(x0.shape, generator=generator)  # noqa: E731
        return function(lambda x, sigma: x0, x, sigmas, noise, lambda i, x: x, eta=eta)

    left = run(sampler) - (1 - sigmas[-1]) * x0
    assert abs(left.mean()) < 0.01 and left.std() == pytest.approx(float(sigmas[-1]), rel=0.01)
    if sampler is ksamplers.euler_a_flow and eta == 1:
        ve = run(ksamplers.euler_a) - (1 - sigmas[-1]) * x0
        assert ve.std() == pytest.approx(float(sigmas[-1]), rel=0.01) and ve.mean() > 0.04


@pytest.mark.parametrize("flow_form", [True, False])
def test_restart_climbs_back_at_a1111s_signal_to_noise_keeping_the_flow_mix(flow_form):
    """From 20 steps Restart goes back up from the sigma nearest 1/11 to the one nearest 2/3 (VE
    sigmas 0.1 and 2: x / (1 - sigma) = x0 + sigma / (1 - sigma) noise), and its fresh noise keeps
    (1 - sigma) x0 + sigma noise with a perfect denoiser; A1111's own climb (noise added on top)
    does not."""
    from ldm_cli import restart

    sigmas = torch.tensor(sigma_schedules.sigmas("karras", sigma_schedules.flow_table({"shift": 3.0}), 25))
    pairs = restart.walk(sigmas, restart.FLOW_RESTART_AT, restart.FLOW_RESTART_TO)
    k = next(k for k, ((_, last), (start, _)) in enumerate(zip(pairs, pairs[1:])) if start > last)
    descent = [pairs[0][0]] + [b for _, b in pairs[:k + 1]]
    assert pairs[k][1] == min(descent, key=lambda v: abs(v - 1 / 11))
    assert pairs[k + 1][0] == pytest.approx(min(descent, key=lambda v: abs(v - 2 / 3)))
    x0, states = torch.full((1, 4, 256, 256), 0.4), {}
    generator = torch.Generator().manual_seed(0)

    def done(i, x):
        states[i] = x
        return x
    function = restart.restart_flow if flow_form else restart.restart
    function(lambda x, sigma: x0, torch.randn(x0.shape, generator=generator), sigmas,
             lambda *_: torch.randn(x0.shape, generator=generator), done)
    sigma = float(pairs[k + 1][1])  # one step after the climb
    left = states[k + 1] - (1 - sigma) * x0
    kept = math.isclose(left.std(), sigma, rel_tol=0.01) and abs(left.mean()) < 0.01
    assert kept == flow_form


def test_img2img_noises_the_image_the_flow_way_and_keeps_the_sigmas(models):
    from ldm_cli import img2img
    from tests.test_img2img import picture

    sampling, _ = kdiffusion.load()
    model = models["sd3"]
    s = settings(model, "heun", "sgm_uniform", strength=0.6).merged(steps=6)
    mine = np.asarray(img2img.image_to_image(model, [s], [picture()])[0]).astype(np.int16)
    generators = pipeline.generators_for([s])
    latents = img2img.encode_images(model, [s], [picture()], generators)
    noise = pipeline.initial_noise(model, [s], generators)
    # diffusers' flow rounding: int(steps - steps x strength) skipped
    kept = sigmas_for(model, s, "sgm_uniform", False)[int(6 - 6 * 0.6):]
    x = latents * (1 - kept[0]) + noise * kept[0]
    with torch.inference_mode():
        out = sampling.sample_heun(flow_denoiser(model, s), x, kept, disable=True)
    ref = np.asarray(vae.decode(model, out)[0]).astype(np.int16)
    assert np.abs(mine - ref).max() <= 2 and np.abs(mine - np.asarray(picture())).mean() > 1


def test_inpainting_keeps_the_original_outside(models):
    from ldm_cli import inpaint
    from tests.test_img2img import picture
    from tests.test_inpaint import box_mask

    model = models["flux"]
    s = settings(model, "euler_a", "beta", strength=0.8, mask_blur=0, only_masked=False)
    mine = np.asarray(inpaint.inpaint(model, [s], [picture()], [box_mask()])[0]).astype(np.int16)
    outside = np.asarray(box_mask()) == 0
    assert np.abs(mine[outside] - np.asarray(picture()).astype(np.int16)[outside]).max() <= 2
    assert np.abs(mine - np.asarray(picture()))[~outside].mean() > 1


def cli(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def test_a_forge_flux_png_replays(flux_dev_folder, tmp_path):
    text = ("a red fox\nSteps: 3, Sampler: Euler a, Schedule type: Beta, CFG scale: 1, Distilled CFG Scale: 3.5, "
            "Seed: 5, Size: 64x64, Eta: 0.7, Version: f2.0.1v1.10.1-previous-669-gdfdcbab6")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png", pnginfo=info)
    result = cli("generate", "--from-png", tmp_path / "a.png", "--model", flux_dev_folder, "--out", tmp_path / "out",
                 "--json", "--quiet")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.splitlines()[-1])
    assert (row["scheduler"], row["schedule"], row["eta"], row["guidance"]) == ("euler_a", "beta", 0.7, 3.5)
    written = Image.open(row["path"]).text["parameters"]
    assert "Sampler: Euler a, Schedule type: Beta," in written and "Eta: 0.7" in written
    back = render.settings_from_png(row["path"])
    assert (back.scheduler, back.schedule, back.eta) == ("euler_a", "beta", 0.7)
    again = cli("generate", "--from-png", row["path"], "--model", flux_dev_folder, "--out", tmp_path / "again", "--json",
                "--quiet")
    replayed = json.loads(again.stdout.splitlines()[-1])["path"]
    assert np.array_equal(np.asarray(Image.open(replayed)), np.asarray(Image.open(row["path"])))


@pytest.mark.parametrize("args, message", [
    (["--scheduler", "euler_a", "--schedule", "align_your_steps"], "the align_your_steps schedule is NVIDIA's tables"),
    (["--scheduler", "ddim"], "scheduler 'ddim' does not work with flow-matching models"),
    (["--scheduler", "DDIM CFG++"], "scheduler 'ddim_cfgpp' does not work with flow-matching models"),
    (["--scheduler", "unipc", "--schedule", "karras"], "scheduler 'unipc' has no karras schedule for flow-matching"),
    (["--scheduler", "euler_b"], "unknown scheduler 'euler_b' (did you mean 'euler_a'?)"),
])
def test_user_errors_are_one_line_writing_nothing(sd3_folder, tmp_path, args, message):
    result = cli("generate", "a fox", "--model", sd3_folder, "--steps", 2, *args, "--out", tmp_path / "o")
    assert result.exit_code == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("ldm: error: ") and message in line
    assert not (tmp_path / "o").exists() or not list((tmp_path / "o").rglob("*.png"))


def test_the_listing_says_which_samplers_flow_models_take():
    out = cli("schedulers").stdout
    flow = out[out.index("flow-matching models"):]
    for name in schedulers.SCHEDULERS:
        taken = re.search(rf"^{name} +{re.escape(schedulers.label(name))} ", flow, re.M) is not None
        assert taken == (name in schedulers.flow_names()), name
    assert "every schedule type but align_your_steps" in flow
