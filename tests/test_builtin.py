"""The built-in model (ldm_cli/assets/builtin.safetensors) through ldm's own loader, pipeline and
CLI: it follows prompts as the evaluator reads them. Plus its training recipe's promises."""
import random

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ldm_cli import loading
from ldm_cli.cli import app
from ldm_cli.demo import architecture, evaluate, gate, scenes, text_stage, train

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def builtin():
    return loading.load(None)


def draw(model, prompt, seed=0, **settings):
    return gate.render(model, [prompt], [seed], **settings)[0]


def foreground(image) -> tuple[np.ndarray, np.ndarray]:
    """(the image's pixels, the mask of what the evaluator takes for its foreground)"""
    pixels = np.asarray(image, dtype=np.float64)
    coverage, _ = evaluate.foreground(pixels, evaluate.border_color(pixels))
    return pixels, coverage > 0.5


def foreground_colors(image):
    pixels, mask = foreground(image)
    return [evaluate.color_name(p) for p in pixels[mask]]


def test_loads_as_sd1_with_its_own_defaults(builtin):
    assert builtin.family.name == "sd1" and builtin.name == "ldm-builtin"
    assert builtin.native_size == (64, 64) and builtin.latent_channels == 4
    assert builtin.defaults["steps"] == 20 and builtin.defaults["scheduler"] == "dpmpp_2m"
    assert builtin.vae.config.scaling_factor not in (1.0, 0.18215)  # measured from its own latents
    assert len(builtin.tokenizers[0]) == 49408


@pytest.mark.parametrize("seed", [0, 1])
def test_a_red_circle_is_mostly_red_in_the_foreground(builtin, seed):
    colors = foreground_colors(draw(builtin, "a red circle", seed))
    assert colors and colors.count("red") / len(colors) > 0.5


@pytest.mark.parametrize("seed", [0, 1])
def test_a_square_on_the_left_has_its_centroid_in_the_left_third(builtin, seed):
    _, mask = foreground(draw(builtin, "a square on the left", seed))
    assert np.nonzero(mask)[1].mean() + 0.5 < 64 / 3


def colour_error(image, color: str) -> float:
    """How far the shape's median colour is from the prompted one (RGB distance; 255 if no shape)."""
    pixels, mask = foreground(image)
    shape = pixels[mask]
    return float(np.linalg.norm(np.median(shape, axis=0) - scenes.COLORS[color])) if len(shape) else 255.0


def test_guidance_follows_the_prompt_better_than_cfg_1(builtin):
    # With every attribute named the model reads almost as well at cfg 1 (README: the gate), so
    # this measures how closely the prompted colour is drawn, over every seen colour-shape pair.
    pairs = [(c, s) for c in scenes.COLORS for s in scenes.SHAPES if (c, s) not in scenes.HELD_OUT_PAIRS] * 2
    prompts, seeds = [f"a {c} {s}" for c, s in pairs], list(range(len(pairs)))

    def mean_error(cfg):
        images = gate.render(builtin, prompts, seeds, cfg=cfg)
        return sum(colour_error(im, c) for im, (c, _) in zip(images, pairs)) / len(pairs)
    assert mean_error(None) < 0.8 * mean_error(1.0)


def test_negative_prompt_keeps_red_away(builtin):
    for seed in range(4):
        reading = evaluate.read(draw(builtin, "a circle", seed, negative="red"))
        assert reading.color != "red", seed


def test_outside_prompt_still_makes_an_image(builtin):
    assert draw(builtin, "a photograph of a cat astronaut, 8k").size == (64, 64)


def test_cli_without_model_is_deterministic(tmp_path):
    runner = CliRunner()
    outputs = []
    for name in ("a", "b"):
        result = runner.invoke(app, ["generate", "a red circle", "--seed", "7", "--out", str(tmp_path / name), "-q"])
        assert result.exit_code == 0, result.output
        outputs.append([p.read_bytes() for p in sorted((tmp_path / name).glob("*.png"))])
    assert len(outputs[0]) == 1 and outputs[0] == outputs[1]


def test_recipe_resumed_equals_uninterrupted(tmp_path, monkeypatch):
    small = {**architecture.vae_config(), "block_out_channels": [8, 8, 8, 8], "norm_num_groups": 4}
    monkeypatch.setattr(architecture, "vae_config", lambda: small)  # the recipe's logic, at a fraction of the cost

    def run(folder, steps):
        train.main(["vae", "--out", str(folder), "--steps", str(steps), "--batch", "2", "--every", "1", "--threads", "1"])
    run(tmp_path / "straight", 3)
    run(tmp_path / "resumed", 2)  # interrupted after step 2 (the warm-up LR depends on the step alone)
    run(tmp_path / "resumed", 3)
    a, b = (train.load_vae(tmp_path / name).state_dict() for name in ("straight", "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_text_and_denoiser_stages_resume_exactly_ema_included(tmp_path, monkeypatch):
    levels = len(architecture.unet_config(16)["block_out_channels"])
    unet = {**architecture.unet_config(16), "block_out_channels": [8] + [16] * (levels - 1), "norm_num_groups": 4}
    text = {**architecture.text_config(), "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
            "projection_dim": 16}
    monkeypatch.setattr(architecture, "unet_config", lambda context_dim: unet)
    monkeypatch.setattr(architecture, "text_config", lambda: text)
    data = {"latents": torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(0)),
            "scenes": [["circle", "red", "left", "small", "white"], ["cross", "blue", "top", "large", "gray"]] * 4}

    def run(folder, stage, steps):
        folder.mkdir(exist_ok=True)
        torch.save(data, folder / "latents.pt")
        batch = "4" if stage == "text" else "2"  # the text stage compares pairs of captions
        train.main([stage, "--out", str(folder), "--steps", str(steps), "--batch", batch, "--every", "1",
                    "--threads", "1", "--ema", "0.9", "--report", "100"])
    for folder in (tmp_path / "straight", tmp_path / "resumed"):
        run(folder, "text", 2)
    run(tmp_path / "straight", "denoiser", 3)
    run(tmp_path / "resumed", "denoiser", 2)  # interrupted after step 2
    run(tmp_path / "resumed", "denoiser", 3)
    from diffusers import UNet2DConditionModel

    def weights(name, module="unet_ema"):
        return UNet2DConditionModel.from_pretrained(tmp_path / name / "denoiser_stage" / module).state_dict()
    a, b, live = weights("straight"), weights("resumed"), weights("straight", "unet")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], live[k]) for k in a)  # the average lags the live weights


def test_text_stage_teaches_the_encoder_to_read_every_attribute_back(tmp_path, monkeypatch):
    text = {**architecture.text_config(), "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1}
    monkeypatch.setattr(architecture, "text_config", lambda: text)
    train.main(["text", "--out", str(tmp_path), "--steps", "120", "--batch", "64", "--lr", "1e-2", "--threads", "1",
                "--report", "1000"])
    encoder, captions = text_stage.text_stage_encoder(tmp_path), text_stage.Captions()
    probe = text_stage.Probe(32)
    probe.load_state_dict(torch.load(tmp_path / "text_stage" / "state.pt", weights_only=True)["extra"]["probe"])
    assert text_stage.probe_accuracy(encoder, probe, captions)["seen"] > 0.9
    # the words that, learnt only beside the U-Net, collapsed into one another
    phrases = [scenes.PHRASES[p] for p in scenes.POSITIONS]
    ids = captions.ids([f"a red circle {phrase}" for phrase in phrases])
    with torch.no_grad():
        read = probe(encoder(ids)[0], ids)["position"].argmax(dim=1).tolist()
    assert read == list(range(len(phrases)))


def test_stand_in_words_are_single_tokens_outside_the_world():
    words, captions = text_stage.stand_in_words(), text_stage.Captions()
    world = set(" ".join([*scenes.SHAPES, *scenes.COLORS, *scenes.BACKGROUNDS, *scenes.POSITIONS, *scenes.SIZES,
                          *scenes.PHRASES.values(), "background"]).split())
    assert len(words) > 10000 and not world & set(words)
    for word in random.Random(0).sample(words, 50):
        assert len(captions.tokenizer(word, add_special_tokens=False).input_ids) == 1


def test_swapped_caption_keeps_every_label_but_the_shape():
    scene = scenes.Scene("cross", "orange", "left", "large", "blue")
    labels = {a: values.index(getattr(scene, a)) for a, values in text_stage.VALUES.items()}
    rng = random.Random(3)
    texts = [scenes.caption(scene, w, set(scenes.ATTRIBUTES)) for w in ("O P, b", "b, O P")]
    swaps = [text_stage.swap_object(texts, labels, rng) for _ in range(200)]
    swapped = [s for s in swaps if s[2] != "cross"]
    assert 0.2 < len(swapped) / len(swaps) < 0.4  # OBJECT_SWAP
    for wordings, swapped_labels, word in swapped:  # one stand-in for every wording of the caption
        assert wordings == [f"a large orange {word} on the left, blue background",
                            f"blue background, a large orange {word} on the left"]
        assert swapped_labels == {**labels, "shape": len(scenes.SHAPES)}
    kept = next(s for s in swaps if s[2] == "cross")
    assert kept == (texts, labels, "cross")
    assert text_stage.swap_object(["", ""], {}, rng) == (["", ""], {}, None)


def test_training_captions_word_one_caption_two_ways():
    rng, different = random.Random(5), []
    for _ in range(100):
        scene = scenes.random_scene(rng)
        texts, labels = text_stage.training_captions(scene, rng, wordings=2)
        named = {a for a, values in text_stage.VALUES.items() if labels[a] < len(values)}
        if not named:
            assert texts == ["", ""]  # CFG_DROP
            continue
        assert [evaluate.parse(t) for t in texts] == [{a: getattr(scene, a) for a in named}] * 2
        different.append(texts[0] != texts[1])
    assert sum(different) / len(different) > 0.9  # alike only where the dropped attributes leave one way


def test_wording_distance_is_zero_for_one_wording_and_scale_free():
    encoder = architecture.text_encoder().eval()
    captions = text_stage.Captions()
    rng = random.Random(0)
    texts = [scenes.caption(scenes.random_scene(rng), "O P, b", set(scenes.ATTRIBUTES)) for _ in range(8)]
    others = [text_stage.reworded(t, i) for i, t in enumerate(texts)]
    a, b = captions.ids(texts), captions.ids(others)
    with torch.no_grad():
        ha, hb = encoder(a)[0], encoder(b)[0]
    assert text_stage.wording_distance(ha, a, ha, a).item() == 0
    far = text_stage.wording_distance(ha, a, hb, b)
    assert far.item() > 0
    assert torch.isclose(text_stage.wording_distance(3 * ha, a, 3 * hb, b), far)


def test_text_stage_refuses_a_batch_too_small_to_pair(capsys):
    with pytest.raises(SystemExit):
        train.arguments(["text", "--batch", "2"])
    assert "--batch must be at least 4" in capsys.readouterr().err
