"""Properties of the one loop: guidance, batching and seeds."""
import numpy as np
import pytest

from ldm_cli import loading, pipeline
from ldm_cli.settings import Settings


@pytest.fixture(scope="module")
def model(sd1_folder):
    return loading.load(str(sd1_folder))


def settings(model, **kw):
    base = dict(prompt="a red fox", steps=2, cfg=7.5, seed=11, scheduler="euler_a")
    return Settings(**{**base, **kw}).resolve({}, model.native_size)


def render(model, group):
    return [np.asarray(im).astype(np.int16) for im in pipeline.text_to_image(model, group)]


def count_batch_sizes(model, monkeypatch):
    seen = []
    real = model.family.predict

    def spy(m, x, t, cond):
        seen.append(x.shape[0])
        return real(m, x, t, cond)

    monkeypatch.setattr(model, "family", type(model.family)(**{**model.family.__dict__, "predict": spy}))
    return seen


def test_guidance_runs_both_halves_in_one_call(model, monkeypatch):
    seen = count_batch_sizes(model, monkeypatch)
    render(model, [settings(model, cfg=7.5)])
    assert seen == [2, 2]


def test_cfg_one_skips_the_negative_pass(model, monkeypatch):
    seen = count_batch_sizes(model, monkeypatch)
    render(model, [settings(model, cfg=1.0)])
    assert seen == [1, 1]


def test_cfg_changes_the_image(model):
    a, b = render(model, [settings(model, cfg=1.0)])[0], render(model, [settings(model, cfg=9.0)])[0]
    assert np.abs(a - b).max() > 0


def test_same_seed_same_image_other_seed_other_image(model):
    a, b, c = (render(model, [settings(model, seed=s)])[0] for s in (5, 5, 6))
    assert np.array_equal(a, b)
    assert np.abs(a - c).max() > 10


@pytest.mark.parametrize("scheduler", ["euler_a", "dpmpp_2m_sde", "dpmpp_sde", "ddpm"])
def test_batched_images_equal_their_single_runs(model, scheduler):
    """Image i of a batch is the image its own seed gives alone, stochastic samplers included."""
    group = [settings(model, seed=s, prompt=p, scheduler=scheduler) for s, p in [(3, "a fox"), (4, "a red cat")]]
    together = render(model, group)
    alone = [render(model, [s])[0] for s in group]
    for t, a in zip(together, alone):
        assert np.abs(t - a).max() <= 2


def test_size_must_fit_the_vae(model):
    from ldm_cli.errors import LdmError

    with pytest.raises(LdmError, match="multiple of 8"):
        pipeline.check_inputs(model, [settings(model).merged(width=68)])


def test_non_square_sizes(model):
    image = pipeline.text_to_image(model, [settings(model, width=96, height=64)])[0]
    assert image.size == (96, 64)
