"""A1111's k-diffusion samplers and schedule types: each image equals what k-diffusion's own
sampler gives (A1111's way: its CompVis denoiser wrapper, CFG on the denoised images, its
sigmas, its noise) on tiny SD1 and SDXL models, within 2/255."""
import inspect
import math

import numpy as np
import pytest
import torch

from ldm_cli import loading, pipeline, schedulers, sigma_schedules, vae
from ldm_cli.settings import Settings
from tests import kdiffusion

# NVIDIA's published 10-step tables (research.nvidia.com/labs/toronto-ai/AlignYourSteps/howto.html)
AYS = {"sd1": [14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029],
       "sdxl": [14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029]}


@pytest.fixture(scope="module")
def models(sd1_folder, sd2_folder, sdxl_folder):
    return {"sd1": loading.load(str(sd1_folder)), "sd2": loading.load(str(sd2_folder)),
            "sdxl": loading.load(str(sdxl_folder))}


class Inner:
    """The model as k-diffusion's CompVis wrappers see an LDM: alphas_cumprod and apply_model."""

    def __init__(self, model):
        config = model.scheduler_config
        betas = np.linspace(config["beta_start"] ** 0.5, config["beta_end"] ** 0.5, 1000, dtype=np.float64) ** 2
        self.alphas_cumprod = torch.tensor(np.cumprod(1 - betas), dtype=torch.float32)  # A1111: float64, kept float32
        self.model = model

    def apply_model(self, x, t, cond):
        return self.model.family.predict(self.model, x, t[0], cond)


def reference_denoiser(model, s: Settings):
    """A1111's CFGDenoiser over k-diffusion's CompVisDenoiser (CompVisVDenoiser for v models)."""
    sampling, external = kdiffusion.load()
    wrap = (external.CompVisVDenoiser if model.prediction_type == "v_prediction" else external.CompVisDenoiser)
    den = wrap(Inner(model), quantize=False)
    positive, negative = pipeline.encode_prompts(model, [s])
    cond, uncond = positive[0][0][1].conds[0], negative[0].conds[0]

    def cfg_model(x, sigma, **_):
        u, c = den(x, sigma, cond=uncond), den(x, sigma, cond=cond)
        return u + (c - u) * s.cfg
    return den, cfg_model


def a1111_sigmas(den, schedule: str, n: int, sdxl: bool) -> torch.Tensor:
    """The schedule types as A1111 1.10 computes them, on k-diffusion's DiscreteSchedule."""
    sampling, _ = kdiffusion.load()
    lo, hi = den.sigmas[0].item(), den.sigmas[-1].item()
    t_of = lambda sigma: den.sigma_to_t(torch.tensor(sigma))  # noqa: E731
    if schedule == "uniform":
        return den.get_sigmas(n)
    if schedule in ("karras", "exponential", "polyexponential"):
        return getattr(sampling, f"get_sigmas_{schedule}")(n, lo, hi)
    if schedule in ("sgm_uniform", "normal"):
        ts = torch.linspace(t_of(hi), t_of(lo), n + 1)[:-1] if schedule == "sgm_uniform" else torch.linspace(t_of(hi), t_of(lo), n)
        return torch.FloatTensor([den.t_to_sigma(t) for t in ts] + [0.0])
    if schedule == "simple":
        return torch.FloatTensor([float(den.sigmas[-(1 + int(x * len(den.sigmas) / n))]) for x in range(n)] + [0.0])
    if schedule == "ddim":
        every = max(len(den.sigmas) // n, 1)
        return torch.FloatTensor([float(v) for v in den.sigmas[1::every]][::-1] + [0.0])
    if schedule == "kl_optimal":
        i = torch.arange(n + 1)
        return torch.tan(i / n * torch.arctan(torch.tensor(lo)) + (1 - i / n) * torch.arctan(torch.tensor(hi)))
    if schedule == "beta":
        from scipy import stats
        return torch.FloatTensor([lo + stats.beta.ppf(x, 0.6, 0.6) * (hi - lo) for x in 1 - np.linspace(0, 1, n)] + [0.0])
    assert schedule == "align_your_steps"
    table = AYS["sdxl" if sdxl else "sd1"]
    if n == len(table):
        return torch.FloatTensor(table + [0.0])
    xs, ys = np.linspace(0, 1, len(table)), np.log(table[::-1])
    return torch.FloatTensor(list(np.exp(np.interp(np.linspace(0, 1, n), xs, ys))[::-1]) + [0.0])


# ldm's name -> (k-diffusion's function, its keyword arguments)
K_FUNCTIONS, OWN_STEPS = kdiffusion.K_FUNCTIONS, kdiffusion.OWN_STEPS  # DPM fast and adaptive: eta 1, as A1111


def reference_image(model, s: Settings, family: str, schedule: str, **options) -> np.ndarray:
    sampling, _ = kdiffusion.load()
    spec = schedulers.SCHEDULERS[s.scheduler]
    den, cfg_model = reference_denoiser(model, s)
    if spec.discard_penultimate:
        sigmas = a1111_sigmas(den, schedule, s.steps + 1, family == "sdxl")
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    else:
        sigmas = a1111_sigmas(den, schedule, s.steps, family == "sdxl")
    # A1111 replaces torch.randn_like with the image's generator, continued after its starting noise
    image_noise = "noise_sampler" in _parameters(getattr(sampling, K_FUNCTIONS[s.scheduler][0])) or options.get("s_churn")
    x, name, kwargs = kdiffusion.start(sampling, model, s, sigmas, bool(image_noise))
    function = getattr(sampling, name)
    if s.scheduler in OWN_STEPS:
        ends = {"sigma_min": den.sigmas[0].item(), "sigma_max": den.sigmas[-1].item()}
        kwargs = {**kwargs, **ends, **({"n": s.steps} if s.scheduler == "dpm_fast" else {}), "eta": 1.0}
        sigmas = None
    with torch.inference_mode():
        if "noise_sampler" in kwargs and "noise_sampler" not in _parameters(function):
            latents = _with_randn(sampling, kwargs.pop("noise_sampler"),
                                  lambda: function(cfg_model, x, sigmas, disable=True, **kwargs, **options))
        else:
            latents = function(cfg_model, x, *([] if sigmas is None else [sigmas]), disable=True, **{**kwargs, **options})
        return np.asarray(vae.decode(model, latents)[0]).astype(np.int16)


def _parameters(function) -> set[str]:
    return set(inspect.signature(function).parameters)  # through torch.no_grad's wrapper


def _with_randn(sampling, noise, run):
    """k-diffusion's churn draws with torch.randn_like, which A1111 points at the image's generator."""
    real = sampling.torch.randn_like
    sampling.torch.randn_like = lambda x: noise(None, None)
    try:
        return run()
    finally:
        sampling.torch.randn_like = real


def ours(model, s: Settings) -> np.ndarray:
    return np.asarray(pipeline.text_to_image(model, [s])[0]).astype(np.int16)


def settings(model, scheduler: str, schedule: str, **extra) -> Settings:
    return Settings(prompt="a red fox in snow", negative="blurry", steps=4, cfg=6.5, seed=1234, scheduler=scheduler,
                    schedule=schedule, **extra).resolve({}, model.native_size)


CASES = [  # every sampler, and every schedule type on one of them
    ("dpmpp_2m_sde_heun", "default"), ("dpmpp_2s_a", "default"), ("dpmpp_3m_sde", "default"),
    ("euler", "sgm_uniform"), ("euler_a", "align_your_steps"), ("heun", "kl_optimal"), ("dpm2", "uniform"),
    ("dpm2_a", "normal"), ("lms", "simple"), ("dpmpp_2m", "ddim"), ("dpmpp_sde", "polyexponential"),
    ("dpmpp_2m_sde", "sgm_uniform"), ("dpmpp_3m_sde", "karras"), ("dpmpp_2s_a", "exponential"),
    ("dpmpp_2m_sde_heun", "beta"), ("dpm_fast", "default"), ("dpm_adaptive", "default"), ("restart", "default"),
]
AUTOMATIC = {"dpmpp_2m_sde_heun": "exponential", "dpmpp_2s_a": "karras", "dpmpp_3m_sde": "exponential",
             "dpm_fast": "uniform", "dpm_adaptive": "uniform", "restart": "karras"}  # A1111 1.10's "Automatic" for each


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("name, schedule", CASES)
def test_each_sampler_and_schedule_equals_k_diffusions(models, family, name, schedule):
    model = models[family]
    s = settings(model, name, schedule)
    mine = ours(model, s)
    ref = reference_image(model, s, family, AUTOMATIC.get(name, schedule) if schedule == "default" else schedule)
    assert mine.std() > 1
    assert np.abs(mine - ref).max() <= 2


def test_a_v_prediction_model_takes_k_diffusions_v_wrapper(models):
    model = models["sd2"]
    s = settings(model, "dpmpp_2s_a", "sgm_uniform")
    assert np.abs(ours(model, s) - reference_image(model, s, "sd2", "sgm_uniform")).max() <= 2


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("schedule", list(sigma_schedules.SCHEDULE_TYPES))
@pytest.mark.parametrize("steps", [1, 7, 11, 30])
def test_the_schedules_are_a1111s(models, family, schedule, steps):
    model = models[family]
    den, _ = reference_denoiser(model, settings(model, "euler", "default"))
    table = sigma_schedules.table(model.scheduler_config, sdxl=family == "sdxl")
    mine = sigma_schedules.sigmas(schedule, table, steps)
    ref = a1111_sigmas(den, schedule, steps, family == "sdxl").tolist()
    assert len(mine) == len(ref)
    assert all(math.isclose(a, b, rel_tol=2e-5, abs_tol=1e-6) for a, b in zip(mine, ref)), (mine, ref)


@pytest.mark.parametrize("sdxl", [False, True])
def test_align_your_steps_tables_are_nvidias(sdxl):
    table = sigma_schedules.Table((0.03, 14.6), sdxl)
    published = AYS["sdxl" if sdxl else "sd1"]
    assert sigma_schedules.align_your_steps(table, 11) == published + [0.0]  # A1111 takes it whole at 11
    ten = sigma_schedules.align_your_steps(table, 10)
    assert (ten[0], ten[-2], ten[-1]) == (pytest.approx(14.615), pytest.approx(0.029), 0.0)
    assert all(a > b for a, b in zip(ten, ten[1:]))  # log-linear between the published points


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("name, schedule, options", [
    ("euler", "karras", {"s_churn": 1.5, "s_tmin": 0.5, "s_tmax": 10.0, "s_noise": 0.9}),
    ("dpmpp_3m_sde", "default", {"eta": 0.6, "s_noise": 0.9}), ("dpmpp_2s_a", "uniform", {"eta": 0.5}),
    ("dpm_fast", "default", {"eta": 0.0}), ("dpm_adaptive", "default", {"eta": 0.0}),
])
def test_sampler_options_equal_k_diffusions(models, family, name, schedule, options):
    model = models[family]
    s = settings(model, name, schedule, **options)
    assert s.sampler_options() == options
    ref = reference_image(model, s, family, AUTOMATIC.get(name, schedule) if schedule == "default" else schedule, **options)
    assert np.abs(ours(model, s) - ref).max() <= 2
    assert np.abs(ours(model, settings(model, name, schedule)) - ref).max() > 2  # the options change the image


def test_options_a_sampler_does_not_take_are_neither_run_nor_recorded(models):
    s = settings(models["sd1"], "ddim", "default", eta=0.5, s_churn=1.0)
    assert s.sampler_options() == {} and "Eta" not in s.to_infotext("t")
    s = settings(models["sd1"], "euler_a", "default", eta=0.5, s_churn=1.0)
    assert s.sampler_options() == {"eta": 0.5}


REPLAYS = [("DPM++ 2M SDE Heun", "Exponential"), ("DPM++ 2S a", "SGM Uniform"), ("DPM++ 3M SDE", "Align Your Steps"),
           ("Euler a", "KL Optimal"), ("DPM++ 2M", "Uniform"), ("Euler", "Polyexponential"), ("Heun", "Simple"),
           ("LMS", "Normal"), ("DPM2", "DDIM"), ("DPM++ SDE", "Beta"), ("DPM fast", "Uniform"),
           ("DPM adaptive", "Karras"), ("Restart", "Exponential")]


@pytest.mark.parametrize("sampler, schedule", REPLAYS)
def test_a1111_pngs_naming_them_replay(sd1_folder, tmp_path, sampler, schedule):
    """An A1111 PNG's sampler, schedule type and Eta run and are written back as A1111 wrote them."""
    import json

    from PIL import Image, PngImagePlugin
    from typer.testing import CliRunner

    from ldm_cli import render
    from ldm_cli.cli import app

    text = (f"a red fox\nNegative prompt: blurry\nSteps: 3, Sampler: {sampler}, Schedule type: {schedule}, "
            "CFG scale: 6, Seed: 5, Size: 64x64, Eta: 0.8, Version: v1.10.1")
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png", pnginfo=info)
    result = CliRunner().invoke(app, ["generate", "--from-png", str(tmp_path / "a.png"), "--model", str(sd1_folder),
                                      "--out", str(tmp_path / "out"), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.splitlines()[-1])
    takes_eta = "eta" in schedulers.SCHEDULERS[row["scheduler"]].takes
    assert schedulers.label(row["scheduler"]) == sampler and row.get("eta") == (0.8 if takes_eta else None)
    written = Image.open(row["path"]).text["parameters"]
    assert f"Sampler: {sampler}, Schedule type: {schedule}," in written
    assert ("Eta: 0.8" in written) == takes_eta
    back = render.settings_from_png(row["path"])
    assert (back.scheduler, back.schedule, back.eta) == (row["scheduler"], row["schedule"], row.get("eta"))


def test_an_unknown_sampler_in_a_png_is_one_line_with_a_suggestion(sd1_folder, tmp_path):
    from PIL import Image, PngImagePlugin
    from typer.testing import CliRunner

    from ldm_cli.cli import app

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a fox\nSteps: 3, Sampler: DPM++ 3M SDF, Schedule type: SGM Uniform, Seed: 1, Size: 64x64")
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png", pnginfo=info)
    result = CliRunner().invoke(app, ["generate", "--from-png", str(tmp_path / "a.png"), "--model", str(sd1_folder),
                                      "--out", str(tmp_path / "out")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldm: error: ") and "did you mean 'DPM++ 3M SDE'" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("steps, times", [(19, 0), (20, 1), (35, 1), (36, 2), (50, 2)])
def test_restart_goes_back_up_as_a1111_plans(steps, times):
    """From 20 steps Restart spends the schedule's steps on a shorter Karras schedule and on going
    back up from the sigma nearest 0.1 to the one nearest 2 (twice from 36), in as many steps."""
    from ldm_cli import restart

    table = sigma_schedules.table({"beta_start": 0.00085, "beta_end": 0.012})
    pairs = restart.walk(sigma_schedules.float32(sigma_schedules.sigmas("karras", table, steps)))
    assert len(pairs) == steps and pairs[-1][1] == 0 and pairs[0][0] == pytest.approx(table.sigma_max)
    ups = [k for k, ((_, last), (start, _)) in enumerate(zip(pairs, pairs[1:])) if start > last]
    assert len(ups) == times
    descent = [pairs[0][0]] + [b for _, b in pairs[:ups[0] + 1]] if ups else []  # the main schedule, up to there
    for k in ups:
        low, high = pairs[k][1], pairs[k + 1][0]
        assert low == min(descent, key=lambda v: abs(v - 0.1))
        assert high == pytest.approx(min(descent, key=lambda v: abs(v - 2)))


@pytest.mark.parametrize("name, strength", [("dpmpp_2s_a", 0.6), ("dpm2", 0.95), ("euler", 0.3)])
def test_img2img_runs_the_sigmas_a1111_keeps_as_k_diffusion_does(models, name, strength):
    """A1111's img2img (setup_img2img_steps, img2img_fix_steps off): t_enc = int(min(strength,
    0.999) x steps), and the sampler runs sigmas[steps - t_enc - 1:] of the whole schedule (DPM2's
    with its next-to-last dropped) from the image latents noised to the first of them: t_enc + 1
    steps, where diffusers' rule would run int(steps x strength)."""
    from ldm_cli import img2img, strength as strength_rule
    from tests.test_img2img import picture

    sampling, _ = kdiffusion.load()
    model, steps = models["sd1"], 6
    s = settings(model, name, "sgm_uniform", strength=strength).merged(steps=steps)
    mine = np.asarray(img2img.image_to_image(model, [s], [picture()])[0]).astype(np.int16)
    generators = pipeline.generators_for([s])
    latents = img2img.encode_images(model, [s], [picture()], generators)
    noise = pipeline.initial_noise(model, [s], generators)
    den, cfg_model = reference_denoiser(model, s)
    if schedulers.SCHEDULERS[name].discard_penultimate:
        whole = a1111_sigmas(den, "sgm_uniform", steps + 1, False)
        whole = torch.cat([whole[:-2], whole[-1:]])
    else:
        whole = a1111_sigmas(den, "sgm_uniform", steps, False)
    t_enc = int(min(strength, 0.999) * steps)
    kept = whole[steps - t_enc - 1:]
    assert strength_rule.steps_run(s) == len(kept) - 1 == t_enc + 1 != int(steps * strength)  # the progress count too
    x = latents + noise * kept[0]
    function = getattr(sampling, K_FUNCTIONS[name][0])
    with torch.inference_mode():
        out = function(cfg_model, x, kept, disable=True, **({"noise_sampler": lambda *_: torch.randn(
            x.shape[1:], generator=generators[0])[None]} if "noise_sampler" in _parameters(function) else {}))
    ref = np.asarray(vae.decode(model, out)[0]).astype(np.int16)
    assert np.abs(mine - ref).max() <= 2 and np.abs(mine - np.asarray(picture())).mean() > 1


def test_strength_counts_by_diffusers_rule_on_its_schedulers_and_hires_by_a1111s():
    from ldm_cli import hires_plan, strength as strength_rule

    diffusers_euler = Settings(steps=40, strength=0.75, scheduler="euler", schedule="default")
    k_euler = diffusers_euler.merged(schedule="sgm_uniform")
    assert (strength_rule.steps_run(diffusers_euler), strength_rule.steps_run(k_euler)) == (30, 31)
    assert strength_rule.steps_run(k_euler.merged(strength=1.0)) == 40  # min(1, 0.999) x 40 = 39, + 1
    assert strength_rule.steps_run(k_euler.merged(strength=0.0)) == 0  # the image through the VAE, as everywhere
    assert hires_plan.steps(Settings(steps=10, strength=0.5, hires_steps=None)) == (20, 10)  # N of int(N / D)


def test_inpainting_keeps_the_original_outside_with_a_k_sampler(models):
    from ldm_cli import inpaint
    from ldm_cli.errors import LdmError
    from tests.test_img2img import picture
    from tests.test_inpaint import box_mask

    model = models["sd1"]
    s = settings(model, "dpmpp_3m_sde", "align_your_steps", strength=1.0, mask_blur=0, only_masked=False)
    mine = np.asarray(inpaint.inpaint(model, [s], [picture()], [box_mask()])[0]).astype(np.int16)
    outside = np.asarray(box_mask()) == 0
    assert np.array_equal(mine[outside], np.asarray(picture()).astype(np.int16)[outside])
    assert np.abs(mine - np.asarray(picture()))[~outside].mean() > 10
    with pytest.raises(LdmError, match="dpm_fast takes steps of its own"):
        inpaint.inpaint(model, [settings(model, "dpm_fast", "default", strength=1.0, mask_blur=0, only_masked=False)],
                        [picture()], [box_mask()])


def test_prompt_file_lines_take_the_sampler_options_and_schedule_labels(tmp_path):
    from ldm_cli import prompts_file

    (tmp_path / "p.txt").write_text('--prompt "a fox" --sampler_name "DPM++ 2S a" --eta 0.4 --s_noise 0.9\n'
                                    '--prompt "a cat" --scheduler dpmpp_3m_sde --schedule "KL Optimal"\n')
    first, second = (job.settings for job in prompts_file.read(tmp_path / "p.txt", Settings(steps=5)))
    assert (first.scheduler, first.eta, first.s_noise) == ("dpmpp_2s_a", 0.4, 0.9)
    assert (second.scheduler, second.schedule, second.steps) == ("dpmpp_3m_sde", "kl_optimal", 5)


def test_rng_nv_draws_the_ancestral_noise_from_philox_at_the_next_offsets(models):
    """A1111's NV source: the starting noise is the seed's Philox draw at offset 0, each later draw
    of the sampler the next offset."""
    from ldm_cli import philox

    sampling, _ = kdiffusion.load()
    model = models["sd1"]
    s = settings(model, "dpmpp_2s_a", "karras", rng="nv")
    den, cfg_model = reference_denoiser(model, s)
    sigmas = a1111_sigmas(den, "karras", s.steps, False)
    shape = (model.latent_channels, s.height // model.vae_scale_factor, s.width // model.vae_scale_factor)
    x = philox.randn(s.seed, shape)[None] * sigmas[0]
    offsets = iter(range(1, 100))
    with torch.inference_mode():
        out = sampling.sample_dpmpp_2s_ancestral(cfg_model, x, sigmas, disable=True,
                                                 noise_sampler=lambda *_: philox.randn(s.seed, shape, next(offsets))[None])
    ref = np.asarray(vae.decode(model, out)[0]).astype(np.int16)
    mine = ours(model, s)
    assert np.abs(mine - ref).max() <= 2 and np.abs(mine - ours(model, settings(model, "dpmpp_2s_a", "karras"))).max() > 2


def test_a_flow_model_neither_runs_nor_records_the_k_diffusion_options(sd3_folder, tmp_path):
    import json

    from typer.testing import CliRunner

    from ldm_cli.cli import app

    result = CliRunner().invoke(app, ["generate", "a fox", "--model", str(sd3_folder), "--steps", "2", "--seed", "1",
                                      "--scheduler", "euler", "--s-churn", "1", "--out", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    assert "s_churn" not in json.loads(result.stdout.splitlines()[-1])
    simple = CliRunner().invoke(app, ["generate", "a fox", "--model", str(sd3_folder), "--steps", "2", "--seed", "1",
                                      "--schedule", "Simple", "--out", str(tmp_path / "s"), "--json"])
    assert json.loads(simple.stdout.splitlines()[-1])["schedule"] == "default"  # Forge's name of its own spacing


def reference_ddim_cfgpp(model, s: Settings) -> np.ndarray:
    """DDIM CFG++ written from its formula, in DDIM's own latents as A1111 1.10 runs it: timesteps
    every 1000 // steps from 1 (clipped to 999); at each but the lowest, from the top, the noise
    predictions e_u (negative) and e_c give e = e_u + (e_c - e_u) x cfg / 12.5, then
    x0 = (x - sqrt(1 - a_t) e) / sqrt(a_t) and x = sqrt(a_prev) x0 + sqrt(1 - a_prev) e_u."""
    inner = Inner(model)
    alphas = inner.alphas_cumprod.double()
    timesteps = [min(t + 1, 999) for t in range(0, 1000, 1000 // s.steps)]
    positive, negative = pipeline.encode_prompts(model, [s])
    cond, uncond = positive[0][0][1].conds[0], negative[0].conds[0]
    v_model = model.prediction_type == "v_prediction"
    # a v model's noise prediction: sqrt(a) v + sqrt(1 - a) x (A1111's timesteps v denoiser)
    eps = (lambda out, x, a: a ** 0.5 * out + (1 - a) ** 0.5 * x) if v_model else (lambda out, x, a: out)  # noqa: E731
    f = model.vae_scale_factor
    x = torch.randn((1, model.latent_channels, s.height // f, s.width // f), generator=torch.Generator().manual_seed(s.seed))
    with torch.inference_mode():
        for index in range(len(timesteps) - 1, 0, -1):
            t = torch.tensor([float(timesteps[index])])
            a_t, a_prev = alphas[timesteps[index]].item(), alphas[timesteps[index - 1]].item()
            e_u, e_c = (eps(inner.apply_model(x, t, c), x, a_t) for c in (uncond, cond))
            e = e_u + (e_c - e_u) * (s.cfg / 12.5)
            x0 = (x - (1 - a_t) ** 0.5 * e) / a_t ** 0.5
            x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * e_u
        return np.asarray(vae.decode(model, x)[0]).astype(np.int16)


@pytest.mark.parametrize("family, steps", [("sd1", 4), ("sd1", 6), ("sdxl", 5), ("sd2", 4)])
def test_ddim_cfgpp_equals_its_formula(models, family, steps):
    model = models[family]
    s = settings(model, "ddim_cfgpp", "default").merged(steps=steps, cfg=25.0)
    mine = ours(model, s)
    assert mine.std() > 1
    assert np.abs(mine - reference_ddim_cfgpp(model, s)).max() <= 2
    assert np.abs(mine - ours(model, settings(model, "ddim", "default").merged(steps=steps, cfg=25.0))).max() > 2


def test_ddim_cfgpp_replays_from_an_a1111_png_and_refuses_img2img_in_one_line(sd1_folder, tmp_path):
    import json

    from PIL import Image, PngImagePlugin
    from typer.testing import CliRunner

    from ldm_cli import render
    from ldm_cli.cli import app

    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", "a red fox\nNegative prompt: blurry\nSteps: 4, Sampler: DDIM CFG++, CFG scale: 9, "
                                "Seed: 5, Size: 64x64, Version: v1.10.1")
    Image.new("RGB", (64, 64)).save(tmp_path / "a.png", pnginfo=info)
    runner = CliRunner()
    result = runner.invoke(app, ["generate", "--from-png", str(tmp_path / "a.png"), "--model", str(sd1_folder),
                                 "--out", str(tmp_path / "out"), "--json", "--quiet"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.splitlines()[-1])
    assert row["scheduler"] == "ddim_cfgpp" and "Sampler: DDIM CFG++," in Image.open(row["path"]).text["parameters"]
    assert render.settings_from_png(row["path"]).scheduler == "ddim_cfgpp"
    again = runner.invoke(app, ["generate", "--from-png", row["path"], "--model", str(sd1_folder),
                                "--out", str(tmp_path / "again"), "--json", "--quiet"])
    assert np.array_equal(np.asarray(Image.open(row["path"])),
                          np.asarray(Image.open(json.loads(again.stdout.splitlines()[-1])["path"])))
    for command in (["img2img", row["path"], "a cat"], ["generate", "a cat", "--hires-scale", "1.5"]):
        refused = runner.invoke(app, [*command, "--model", str(sd1_folder), "--scheduler", "DDIM CFG++", "--steps", "3",
                                      "--out", str(tmp_path / "no")])
        lines = refused.stderr.strip().splitlines()
        assert refused.exit_code == 2 and len(lines) == 1 and "DDIM CFG++ runs text to image only" in lines[0]
        assert not (tmp_path / "no").exists()
    listed = runner.invoke(app, ["schedulers"]).stdout
    assert "ddim_cfgpp         DDIM CFG++         default (A1111's DDIM timesteps)" in listed


def test_an_a1111_api_body_naming_ddim_cfgpp_runs_its_own_timesteps():
    from ldm_cli.server import a1111

    assert a1111.sampler({"sampler_name": "DDIM CFG++", "scheduler": "SGM Uniform"}, {}) == ("ddim_cfgpp", "default")
    assert a1111.sampler({"sampler_name": "DDIM CFG++"}, {}) == ("ddim_cfgpp", None)
