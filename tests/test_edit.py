"""`ldm edit`: instruction editing against diffusers' edit pipelines on tiny random models (the
same weights, prompt, input image, size, seed and steps give the same image within 2/255), the
sizes an edit picks, and the refusals (one line, exit 2, nothing written)."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ldm_cli import edit
from ldm_cli.cli import app
from ldm_cli.errors import LdmError
from ldm_cli.families import flux
from ldm_cli.settings import Settings
from tests.flow_parity import as_pixels, close, load_pairs, pixels
from tests.test_img2img import picture


@pytest.fixture(scope="module")
def kontext(flux_dev_folder):
    from diffusers import FluxKontextPipeline

    return load_pairs(FluxKontextPipeline, {"dev": flux_dev_folder})["dev"]


def settings(model, **kw) -> Settings:
    base = dict(prompt="make it night", steps=3, seed=1234, scheduler="euler", width=64, height=48)
    s = Settings(**{**base, **kw})
    return edit.with_defaults(s, edit.editing(model), (s.width, s.height), 16).resolve(model.defaults, model.native_size)


def theirs_kontext(pipe, s: Settings, image, output_type: str = "np"):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.original_scheduler_config)
    out = pipe(image=image, prompt=s.prompt, negative_prompt=s.negative or None, true_cfg_scale=s.cfg,
               guidance_scale=s.guidance, num_inference_steps=s.steps, width=s.width, height=s.height,
               max_area=s.width * s.height, _auto_resize=False, generator=torch.Generator().manual_seed(s.seed),
               max_sequence_length=s.max_sequence_length, output_type=output_type)
    return out.images if output_type == "latent" else as_pixels(out.images[0])


@pytest.mark.parametrize("size, kw", [
    ((64, 48), {}),  # the input at the output's size
    ((48, 64), {}),  # another aspect: its tokens on a grid of their own
    ((64, 48), {"cfg": 2.0, "negative": "blurry", "guidance": 4.0}),  # true CFG over both halves
])
def test_kontext_matches_diffusers(kontext, size, kw):
    ours, theirs = kontext
    s = settings(ours, **kw)
    image = picture(*size)
    assert edit.sized_inputs(ours, edit.editing(ours), s, [image])[0].size == size  # what diffusers' unresized input is
    mine = pixels(edit.edit(ours, [s], [[image]])[0])
    assert close(mine, theirs_kontext(theirs, s, image))


def test_kontext_defaults_and_the_denoiser_reads_the_image(kontext):
    ours, _ = kontext
    s = settings(ours)
    assert s.guidance == 2.5 and s.cfg == 1.0
    cond = flux.encode(ours, [s.prompt], s, False)
    x, t = torch.randn(1, 16, 6, 8, generator=torch.Generator().manual_seed(0)), torch.tensor(500.0)
    outs = [flux.predict(ours, x, t, {**cond, **flux.kontext_references(ours, [[image]], s)})
            for image in (picture(64, 48), Image.new("RGB", (64, 48), (250, 20, 20)))]
    plain = flux.predict(ours, x, t, cond)
    assert outs[0].shape == plain.shape  # the reference tokens' output is cut
    assert (outs[0] - outs[1]).abs().max() > 1e-3 and (outs[0] - plain).abs().max() > 1e-3


def test_a_batch_equals_each_image_alone(kontext):
    ours, _ = kontext
    group = [settings(ours, seed=1, steps=2), settings(ours, seed=2, steps=2, prompt="make it snow")]
    inputs = [[picture(64, 48)], [picture(64, 48).transpose(0)]]
    together = edit.edit(ours, group, inputs)
    for s, each, image in zip(group, inputs, together):
        assert close(pixels(image), pixels(edit.edit(ours, [s], [each])[0]))


@pytest.mark.parametrize("size, expected", [((64, 64), (1024, 1024)), ((300, 200), (1248, 832)),
                                            ((200, 400), (720, 1456))])
def test_kontext_picks_its_trained_size_nearest_the_aspect(size, expected):
    assert flux.kontext_size([size], 16) == expected


@pytest.mark.parametrize("size, area, expected", [((64, 48), 64 * 48, (64, 48)), ((80, 48), 64 * 48, (64, 32)),
                                                  ((1000, 500), 1024 * 1024, (1440, 720)), ((9, 9), 64, (16, 16))])
def test_inputs_go_to_the_output_area_at_their_own_aspect(size, area, expected):
    assert edit.input_size(size, area, 16) == expected


def test_kontext_takes_one_image(kontext):
    ours, _ = kontext
    with pytest.raises(LdmError, match=r"^FLUX.1 Kontext takes no --reference \(got 1\)$"):
        edit.edit(ours, [settings(ours)], [[picture(64, 48), picture(64, 48)]])


def test_a_model_that_cannot_edit_is_refused(flux_schnell_folder):
    from ldm_cli import loading

    model = loading.load(str(flux_schnell_folder))
    with pytest.raises(LdmError, match=r"^FLUX.1 schnell cannot edit by instruction; use `ldm img2img`"):
        edit.editing(model)


@pytest.mark.parametrize("strength", [1.0, 0.8])
def test_kontext_with_a_mask_matches_diffusers_kontext_inpaint(kontext, strength):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxKontextInpaintPipeline

    ours, theirs = kontext
    image, mask = picture(64, 48), Image.new("L", (64, 48), 0)
    mask.paste(255, (0, 0, 32, 48))
    s = settings(ours, strength=strength, mask_blur=0, only_masked=False, steps=4)
    s = s.merged(strength=strength, mask_blur=0)  # with_defaults drops them for an unmasked edit
    mine = pixels(edit.edit_masked(ours, [s], [[image]], [mask])[0])
    pipe = FluxKontextInpaintPipeline(**{**theirs.components, "scheduler": FlowMatchEulerDiscreteScheduler.from_config(
        theirs.original_scheduler_config)})
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(image=image, mask_image=mask, prompt=s.prompt, strength=strength, guidance_scale=s.guidance,
               num_inference_steps=s.steps, width=64, height=48, max_area=64 * 48, _auto_resize=False,
               generator=torch.Generator().manual_seed(s.seed), output_type="np").images[0]
    assert close(mine[:, :32], as_pixels(ref)[:, :32])
    assert np.array_equal(mine[:, 32:], pixels(image)[:, 32:])  # kept exactly


def test_a_mask_is_refused_where_the_model_has_no_masked_edit(qwen_edit, toy_areas):
    ours, _ = qwen_edit["edit-plus"]
    with pytest.raises(LdmError, match=r"^--mask does not work with Qwen-Image-Edit Plus yet"):
        edit.edit_masked(ours, [settings(ours, width=64, height=64, strength=1.0)], [[picture()]],
                         [Image.new("L", (64, 64), 255)])


# -- FLUX.2 klein ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def klein(flux2_klein_folder, flux2_klein_base_folder):
    from diffusers import Flux2KleinPipeline

    return load_pairs(Flux2KleinPipeline, {"distilled": flux2_klein_folder, "base": flux2_klein_base_folder})


def theirs_klein(pipe, s: Settings, inputs, output_type: str = "np"):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.original_scheduler_config)
    out = pipe(image=inputs, prompt=s.prompt, guidance_scale=s.cfg, num_inference_steps=s.steps, width=s.width,
               height=s.height, generator=torch.Generator().manual_seed(s.seed),
               max_sequence_length=s.max_sequence_length, output_type=output_type)
    return out.images if output_type == "latent" else as_pixels(out.images[0])


@pytest.mark.parametrize("variant, sizes", [
    ("distilled", [(64, 64)]),
    ("distilled", [(80, 64), (64, 80)]),  # two images, the second of another aspect: time offsets 10 and 20
    ("base", [(64, 64)]),  # real CFG: both halves see the image
])
def test_klein_matches_diffusers(klein, variant, sizes):
    ours, theirs = klein[variant]
    inputs = [picture(*size) for size in sizes]
    inputs[1:] = [image.transpose(0) for image in inputs[1:]]
    s = settings(ours, width=sizes[0][0], height=sizes[0][1], max_sequence_length=64)
    assert [im.size for im in edit.sized_inputs(ours, edit.editing(ours), s, inputs)] == sizes  # what diffusers takes them at
    mine = pixels(edit.edit(ours, [s], [inputs])[0])
    assert close(mine, theirs_klein(theirs, s, inputs))


@pytest.mark.parametrize("references", [0, 1])
def test_klein_with_a_mask_keeps_the_rest_and_repeats(klein, references):
    """No diffusers pipeline masks klein's edits: inpaint.py's blend does, so the black part is the
    input's exactly, the white part is redrawn, and a seed gives the same image again."""
    ours, _ = klein["distilled"]
    image, mask = picture(80, 64), Image.new("L", (80, 64), 0)
    mask.paste(255, (0, 0, 48, 64))
    inputs = [image, picture(64, 64).transpose(0)][:1 + references]
    s = settings(ours, width=80, height=64, max_sequence_length=64, steps=2).merged(strength=1.0, mask_blur=0)
    first, again = (pixels(edit.edit_masked(ours, [s], [inputs], [mask])[0]) for _ in range(2))
    assert np.array_equal(first, again)
    assert np.array_equal(first[:, 48:], pixels(image)[:, 48:])
    assert np.abs(first[:, :48] - pixels(image)[:, :48]).max() > 32  # redrawn from noise


def test_klein_takes_the_first_images_size_up_to_a_megapixel():
    from ldm_cli.families import flux2

    assert flux2.edit_size([(80, 64)], 16) == (80, 64)
    assert flux2.edit_size([(2000, 1000), (64, 64)], 16) == (1440, 720)  # int(1448.2), int(724.1) rounded down
    assert flux2.edit_size([(100, 70)], 16) == (96, 64)


def test_klein_takes_at_most_four_images(klein):
    ours, _ = klein["distilled"]
    with pytest.raises(LdmError, match=r"^FLUX.2 klein takes at most 3 --reference images \(got 4\)$"):
        edit.edit(ours, [settings(ours, width=64, height=64)], [[picture()] * 5])


# -- Qwen-Image-Edit and Edit Plus ---------------------------------------------------------------------
EDIT_PIPELINES = {"edit": "QwenImageEditPipeline", "edit-plus": "QwenImageEditPlusPipeline"}
TOY_VAE_AREA, TOY_VISION_AREA = 128 * 128, 64 * 64  # the pipelines' 1 MP and 384x384, at the toy models' scale


@pytest.fixture(scope="module")
def qwen_edit(qwen_image_folder, tmp_path_factory):
    """variant -> (ldm's Model, diffusers' pipeline): Qwen-Image's tiny weights (its text encoder
    is the whole Qwen2.5-VL, vision tower included) in an Edit and an Edit Plus folder."""
    import shutil

    import diffusers

    out = {}
    for variant, cls in EDIT_PIPELINES.items():
        folder = tmp_path_factory.mktemp("qwen") / f"tiny-qwen-image-{variant}"
        shutil.copytree(qwen_image_folder, folder)
        index = json.loads((folder / "model_index.json").read_text())
        index.update(_class_name=cls, processor=["transformers", "Qwen2VLProcessor"])
        (folder / "model_index.json").write_text(json.dumps(index))
        plain = diffusers.QwenImagePipeline.from_pretrained(qwen_image_folder, dtype=torch.float32, local_files_only=True)
        theirs = getattr(diffusers, cls)(**plain.components, processor=their_processor())
        theirs.set_progress_bar_config(disable=True)
        out[variant] = (loading_load(folder), theirs)
    return out


def loading_load(folder):
    from ldm_cli import loading

    return loading.load(str(folder))


def their_processor():
    """transformers' own Qwen2VLProcessor over ldm's tokenizer and image processor config; built past
    its check of a video processor, which needs torchvision (absent here, and never used for images)."""
    from unittest import mock

    from transformers import Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    from ldm_cli.loading.recipe import qwen25vl_image_processor, qwen25vl_tokenizer

    with mock.patch.object(ProcessorMixin, "check_argument_for_proper_class", lambda self, name, arg: None):
        return Qwen2VLProcessor(image_processor=qwen25vl_image_processor(), tokenizer=qwen25vl_tokenizer())


@pytest.fixture
def toy_areas(monkeypatch):
    """Both sides' 1 MP and 384x384 areas at the toy scale."""
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit as edit_module
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_plus as plus_module

    from ldm_cli.families import qwen_edit as ours

    monkeypatch.setattr(ours, "VAE_AREA", TOY_VAE_AREA)
    monkeypatch.setattr(ours, "VISION_AREA", TOY_VISION_AREA)
    monkeypatch.setattr(plus_module, "VAE_IMAGE_SIZE", TOY_VAE_AREA)
    monkeypatch.setattr(plus_module, "CONDITION_IMAGE_SIZE", TOY_VISION_AREA)
    original = edit_module.calculate_dimensions  # Edit's 1 MP is written into its __call__
    monkeypatch.setattr(edit_module, "calculate_dimensions", lambda area, ratio: original(TOY_VAE_AREA, ratio))


def theirs_qwen(pipe, s: Settings, inputs, output_type: str = "np"):
    from diffusers import FlowMatchEulerDiscreteScheduler

    pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config)
    out = pipe(image=inputs if len(inputs) > 1 else inputs[0], prompt=s.prompt, negative_prompt=s.negative or None,
               true_cfg_scale=s.cfg, num_inference_steps=s.steps, width=s.width, height=s.height,
               generator=torch.Generator().manual_seed(s.seed), output_type=output_type)
    return out.images if output_type == "latent" else as_pixels(out.images[0])


@pytest.mark.parametrize("variant, sizes, kw", [
    ("edit", [(96, 64)], {"cfg": 1.0}),
    ("edit", [(64, 64)], {"cfg": 2.5, "negative": "blurry"}),  # true CFG, the negative read with the image too
    ("edit-plus", [(64, 64)], {"cfg": 1.0}),
    ("edit-plus", [(96, 64), (64, 80)], {"cfg": 2.5, "negative": "blurry"}),  # two images, "Picture 1: ... 2: ..."
])
def test_qwen_edit_matches_diffusers(qwen_edit, toy_areas, variant, sizes, kw):
    ours, theirs = qwen_edit[variant]
    inputs = [picture(*size) for size in sizes]
    s = settings(ours, width=64, height=64, **kw)
    mine = pixels(edit.edit(ours, [s], [inputs])[0])
    assert close(mine, theirs_qwen(theirs, s, inputs))


@pytest.mark.parametrize("strength", [1.0, 0.8])
def test_qwen_edit_with_a_mask_matches_diffusers_edit_inpaint(qwen_edit, toy_areas, monkeypatch, strength):
    from diffusers import QwenImageEditInpaintPipeline
    from diffusers.pipelines.qwenimage import pipeline_qwenimage_edit_inpaint as inpaint_module

    from ldm_cli.families import qwen_edit as family

    original = inpaint_module.calculate_dimensions  # its 1 MP is written into its __call__
    monkeypatch.setattr(inpaint_module, "calculate_dimensions", lambda area, ratio: original(TOY_VAE_AREA, ratio))
    ours, theirs = qwen_edit["edit"]
    image, mask = picture(96, 64), Image.new("L", (96, 64), 0)
    mask.paste(255, (0, 0, 48, 64))
    width, height = family.size([image.size], 16)
    s = settings(ours, width=width, height=height, cfg=1.0, steps=4).merged(strength=strength, mask_blur=0)
    mine = pixels(edit.edit_masked(ours, [s], [[image]], [mask])[0])
    pipe = QwenImageEditInpaintPipeline(**theirs.components)
    pipe.set_progress_bar_config(disable=True)
    ref = pipe(image=image, mask_image=mask, prompt=s.prompt, strength=strength, true_cfg_scale=1.0,
               num_inference_steps=s.steps, generator=torch.Generator().manual_seed(s.seed), output_type="np").images[0]
    half = width // 2
    assert as_pixels(ref).shape[:2] == (height, width)
    assert close(mine[:, :half], as_pixels(ref)[:, :half])
    kept = np.asarray(images_resized(mask, width, height)) == 0  # where the resized mask is black
    assert np.array_equal(mine[kept], pixels(images_resized(image, width, height))[kept]) and kept[:, half + 8:].all()


def images_resized(image, width, height):
    from ldm_cli import images

    return images.resized(image, width, height)


def test_qwen_edit_sizes_and_kinds(qwen_edit, qwen_image_folder):
    from ldm_cli.families import qwen_edit as family

    assert family.size([(300, 200)], 16) == (1248, 832) and family.size([(100, 100), (300, 200)], 16) == (1024, 1024)
    assert family.input_size((300, 200), (64, 64), 16) == (1248, 832)  # about 1 MP whatever the output
    assert edit.editing(qwen_edit["edit"][0]).max_images == 1
    assert edit.editing(qwen_edit["edit-plus"][0]).max_images == 3
    with pytest.raises(LdmError, match=r"\(Qwen-Image\) cannot edit by instruction; use `ldm img2img`"):
        edit.check_model(str(qwen_image_folder))  # plain Qwen-Image: its text path only


# -- the input images' part, where pixels cannot show it -----------------------------------------------
# The tiny random models move their pixels by at most 2/255 when the input image changes, so pixel
# parity alone would pass an edit that ignored its images. Their latents show it: ours equal
# diffusers' within LATENT_TOLERANCE, while another input moves them by many times that.
LATENT_TOLERANCE = 1e-4


def their_latents(kind, pipe, s: Settings, inputs) -> torch.Tensor:
    run = {"kontext": theirs_kontext, "klein": theirs_klein}.get(kind, theirs_qwen)
    return run(pipe, s, inputs, output_type="latent")


def ours_as_theirs(kind, model, latents: torch.Tensor) -> torch.Tensor:
    """Our loop latents in the form each pipeline returns as output_type="latent"."""
    from ldm_cli.families import flux2

    return flux2.from_latents(model.vae, latents) if kind == "klein" else flux.pack(latents)


@pytest.mark.parametrize("kind, sizes", [("kontext", [(64, 48)]), ("klein", [(64, 64), (64, 80)]),
                                         ("qwen-edit", [(96, 64)]), ("qwen-edit-plus", [(96, 64), (64, 80)])])
def test_the_input_images_reach_the_denoiser_as_diffusers_gives_them(kontext, klein, qwen_edit, toy_areas, kind,
                                                                      sizes):
    ours, theirs = {"kontext": kontext, "klein": klein["distilled"], "qwen-edit": qwen_edit["edit"],
                    "qwen-edit-plus": qwen_edit["edit-plus"]}[kind]
    inputs = [picture(*size) for size in sizes]
    s = settings(ours, width=sizes[0][0], height=sizes[0][1], cfg=1.0, max_sequence_length=64)
    mine = ours_as_theirs(kind, ours, edit.edited_latents(ours, [s], [inputs]))
    ref = their_latents(kind, theirs, s, inputs)
    other = [Image.new("RGB", size, (250, 20, 20)) for size in sizes]
    moved = ours_as_theirs(kind, ours, edit.edited_latents(ours, [s], [other]))
    assert (mine - ref).abs().max() < LATENT_TOLERANCE
    assert (moved - mine).abs().max() > 10 * LATENT_TOLERANCE


# -- a single file ------------------------------------------------------------------------------------
def test_a_single_kontext_file_edits_as_the_folder(kontext, flux_dev_folder, tmp_path):
    from ldm_cli import loading
    from ldm_cli.loading import LoadOptions
    from tests import original_layout

    path = original_layout.write(flux_dev_folder, tmp_path / "flux1-kontext-dev.safetensors", "flux")
    edit.check_model(str(path))  # a dev-shaped header: accepted before the load
    single = loading.load(str(path), LoadOptions(config=str(flux_dev_folder)))
    ours, _ = kontext
    s = settings(ours)
    image = picture(64, 48)
    assert close(pixels(edit.edit(single, [s], [[image]])[0]), pixels(edit.edit(ours, [s], [[image]])[0]))


# -- the command line ---------------------------------------------------------------------------------
def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def png_files(folder):
    return sorted(folder.glob("*.png")) if folder.exists() else []


def test_cli_edits_at_the_size_asked_and_records_the_input(flux_dev_folder, tmp_path):
    import hashlib

    source = tmp_path / "photo.png"
    picture(64, 48).save(source)
    result = cli("edit", source, "make it night", "--model", flux_dev_folder, "--steps", 2, "--seed", 5, "-n", 2,
                 "-W", 64, "-H", 48, "--json", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["seed"] for r in records] == [5, 6]
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:10]
    assert all(r["guidance"] == 2.5 and r["init_image_hash"] == digest and "strength" not in r for r in records)
    with Image.open(records[0]["path"]) as saved:
        assert saved.size == (64, 48)


def test_cli_without_a_size_uses_kontexts_and_says_so(flux_dev_folder, tmp_path, monkeypatch):
    source = tmp_path / "photo.png"
    picture(96, 64).save(source)
    seen = []
    monkeypatch.setattr(edit, "edit", lambda model, group, inputs, on_step: seen.append(group[0]) or [])
    result = cli("edit", source, "make it night", "--model", flux_dev_folder, "--steps", 1, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    assert (seen[0].width, seen[0].height) == (1248, 832)  # the trained size nearest 3:2
    assert "editing at 1248x832" in result.stderr


def refusals(tmp_path, folders):
    good = tmp_path / "good.png"
    picture().save(good)
    return {
        "schnell": ([good, "make it night", "--model", folders["schnell"]],
                    "'tiny-flux-schnell' (FLUX.1 schnell) cannot edit by instruction; use `ldm img2img`"),
        "built-in": ([good, "make it night"], "the built-in model cannot edit by instruction; use `ldm img2img`"),
        "sd1": ([good, "make it night", "--model", folders["sd1"]], "(SD1/SD2) cannot edit by instruction"),
        "reference": ([good, "make it night", "--model", folders["dev"], "--reference", good],
                      "FLUX.1 Kontext takes no --reference (got 1)"),
        "missing reference": ([good, "make it night", "--model", folders["dev"], "--reference", tmp_path / "no.png"],
                              "no such file"),
        "missing image": ([tmp_path / "no.png", "make it night", "--model", folders["dev"]], "no such file"),
        "controlnet": ([good, "make it night", "--model", folders["dev"], "--controlnet", folders["dev"],
                        "--control-image", good], "--controlnet does not work with edit"),
    }


@pytest.mark.parametrize("case", ["schnell", "built-in", "sd1", "reference", "missing reference", "missing image",
                                  "controlnet"])
def test_cli_refusals_are_one_line_exit_2_and_no_file(flux_dev_folder, flux_schnell_folder, sd1_folder,
                                                     tmp_path, monkeypatch, case):
    from ldm_cli import loading

    folders = {"dev": flux_dev_folder, "schnell": flux_schnell_folder, "sd1": sd1_folder}
    args, message = refusals(tmp_path, folders)[case]
    if case in ("schnell", "built-in", "sd1"):  # refused from the configs alone: no weights load
        monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("the weights loaded"))
    out = tmp_path / "out"
    result = cli("edit", *args, "--steps", 1, "-o", out)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("ldm: error: ") and result.stderr.count("\n") == 1
    assert message in result.stderr
    assert png_files(out) == []


def test_cli_klein_with_a_reference_at_the_first_images_size_in_one_batch(flux2_klein_folder, tmp_path):
    source, other = tmp_path / "room.png", tmp_path / "chair.png"
    picture(80, 64).save(source)
    picture(64, 64).save(other)
    result = cli("edit", source, "put the chair in the room", "--reference", other, "--model", flux2_klein_folder,
                 "--steps", 1, "--seed", 3, "-n", 2, "--batch-size", 2, "--max-sequence-length", 64, "--json",
                 "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["width"], r["height"], r["seed"]) for r in records] == [(80, 64, 3), (80, 64, 4)]
    assert "editing at 80x64" in result.stderr


def test_help_shows_an_example_per_model_kind():
    result = CliRunner().invoke(app, ["edit", "--help"], terminal_width=200)
    assert result.exit_code == 0
    assert "ldm edit photo.png" in result.stdout and "flux1-kontext-dev.safetensors" in result.stdout
    assert "--reference chair.png -m flux-2-klein-4b" in result.stdout
    assert "--reference woman.png -m Qwen-Image-Edit-2509" in result.stdout
    assert "use img2img" in result.stdout


def test_cli_a_kontext_lora_is_merged_and_recorded(flux_dev_folder, tmp_path):
    from tests import lora_files, tiny_models

    chosen = lora_files.layers(tiny_models.flux_transformer(), ("to_q", "to_k", "to_v", "proj_mlp", "proj_out", "to_out.0"))
    lora = lora_files.write(tmp_path / "relight.safetensors", lora_files.peft(chosen, "transformer", seed=4))
    source = tmp_path / "photo.png"
    picture(64, 48).save(source)
    common = ["edit", source, "make it night", "--model", flux_dev_folder, "--steps", 2, "--seed", 5, "-W", 64,
              "-H", 48, "--json"]
    plain = cli(*common, "-o", tmp_path / "plain")
    lit = cli(*common, "--lora", f"{lora}:4", "-o", tmp_path / "lit")
    assert plain.exit_code == 0 and lit.exit_code == 0, lit.stderr
    record = json.loads(lit.stdout)
    assert "<lora:relight:4>" in record["prompt"] and "relight" in record["lora_hashes"]
    with Image.open(json.loads(plain.stdout)["path"]) as a, Image.open(record["path"]) as b:
        assert np.abs(pixels(a) - pixels(b)).max() > 2


def test_cli_qwen_edit_plus_with_a_reference_and_edit_refusing_one(qwen_edit, toy_areas, tmp_path):
    source, other = tmp_path / "shop.png", tmp_path / "woman.png"
    picture(96, 64).save(source)
    picture(64, 80).save(other)
    common = ["edit", source, "the woman behind the counter", "--reference", other, "--steps", 2, "--seed", 2]
    result = cli(*common, "--model", qwen_edit["edit-plus"][0].path, "--json", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert (record["width"], record["height"], record["cfg"]) == (128, 128, 4.0)  # the toy "1 MP" at 64x80's aspect
    refused = cli(*common, "--model", qwen_edit["edit"][0].path, "-o", tmp_path / "refused")
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert "Qwen-Image-Edit takes no --reference (got 1)" in refused.stderr
    assert png_files(tmp_path / "refused") == []


def test_from_png_replays_the_recorded_inputs_and_refuses_changed_or_missing_ones(flux_dev_folder, tmp_path):
    source = tmp_path / "photo.png"
    picture(64, 48).save(source)
    made = cli("edit", source, "make it night", "--model", flux_dev_folder, "--steps", 2, "--seed", 5, "-W", 64,
               "-H", 48, "--json", "-o", tmp_path / "out")
    assert made.exit_code == 0, made.stderr
    record = json.loads(made.stdout)
    assert json.loads(record["edit_images"]) == [{"path": str(source), "hash": record["init_image_hash"]}]
    again = cli("edit", "--from-png", record["path"], "--json", "-o", tmp_path / "again")
    assert again.exit_code == 0, again.stderr
    with Image.open(record["path"]) as a, Image.open(json.loads(again.stdout)["path"]) as b:
        assert np.array_equal(pixels(a), pixels(b))
    picture(64, 48).transpose(0).save(source)
    changed = cli("edit", "--from-png", record["path"], "-o", tmp_path / "changed")
    source.unlink()
    gone = cli("edit", "--from-png", record["path"], "-o", tmp_path / "gone")
    for result, words in ((changed, "has changed since"), (gone, "is gone")):
        assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
        assert result.stderr.startswith("ldm: error: the edited image this edit was made from") and words in result.stderr
    assert png_files(tmp_path / "changed") == png_files(tmp_path / "gone") == []


@pytest.mark.parametrize("text, words", [("{}", "is not a list of input images"), ("[]", "is not a list"),
                                         ('[{"path": 1, "hash": "ab"}]', "not a path and a hash"),
                                         ("[" * 5000, "nests deeper than 20 levels")])
def test_a_malformed_record_of_the_inputs_is_one_error(text, words):
    from ldm_cli import edit_inputs

    with pytest.raises(LdmError, match=words):
        Settings(prompt="a", edit_images=text).validate()
    assert edit_inputs.from_text(None) == []


def test_cli_mask_keeps_the_black_part_and_strength_needs_a_mask(flux_dev_folder, tmp_path):
    source, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    picture(64, 48).save(source)
    drawn = Image.new("L", (64, 48), 0)
    drawn.paste(255, (32, 0, 64, 48))
    drawn.save(mask)
    common = ["edit", source, "make it night", "--model", flux_dev_folder, "--steps", 2, "-W", 64, "-H", 48]
    result = cli(*common, "--mask", mask, "--mask-blur", 0, "--json", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    record = json.loads(result.stdout)
    assert (record["strength"], record["mask_blur"], record["guidance"]) == (1.0, 0, 2.5)
    with Image.open(record["path"]) as saved:
        assert np.array_equal(pixels(saved)[:, :32], pixels(picture(64, 48))[:, :32])
    refused = cli(*common, "--strength", 0.5, "-o", tmp_path / "refused")
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1
    assert "--strength and --mask-blur go with --mask" in refused.stderr
    assert png_files(tmp_path / "refused") == []


# -- ldm batch: edit lines -------------------------------------------------------------------------------
def test_batch_edit_lines_equal_ldm_edit(flux2_klein_folder, tmp_path):
    """A1111-style and JSONL edit lines (paths from the prompts file's folder) render as `ldm edit`
    does; lines with other inputs never share a denoiser batch, and their records name their inputs."""
    (tmp_path / "in").mkdir()
    picture(80, 64).save(tmp_path / "in" / "room.png")
    picture(64, 64).save(tmp_path / "in" / "chair.png")
    Image.new("RGB", (64, 64), (20, 200, 90)).save(tmp_path / "in" / "plain.png")
    common = ["--model", flux2_klein_folder, "--steps", 1, "--max-sequence-length", 64]
    lines = ['--prompt "put the chair in the room" --init_image in/room.png --reference in/chair.png --seed 3',
             '--prompt "make it night" --init_image in/plain.png --edit true --seed 4 --n_iter 2',
             '--prompt "make it night" --init_image in/plain.png --edit true --mask in/mask.png --strength 0.9 --seed 6']
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))
    mask.save(tmp_path / "in" / "mask.png")
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "put the chair in the room", "init_image": "in/room.png",
                                                  "reference": ["in/chair.png"], "seed": 3}) + "\n")
    for name in ("p.txt", "p.jsonl"):
        result = cli("batch", tmp_path / name, *common, "--batch-size", 3, "--quiet", "-o", tmp_path / name[2:])
        assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "txt" / "manifest.jsonl").read_text().splitlines()]
    [jsonl] = [json.loads(line) for line in (tmp_path / "jsonl" / "manifest.jsonl").read_text().splitlines()]
    assert [(r["line"], r["width"], r["height"]) for r in rows] == [(1, 80, 64), (2, 64, 64), (2, 64, 64), (3, 64, 64)]
    assert [Path(i["path"]).name for i in json.loads(rows[0]["edit_images"])] == ["room.png", "chair.png"]
    assert np.abs(pixels_of(tmp_path / "txt" / rows[0]["path"]) - pixels_of(tmp_path / "jsonl" / jsonl["path"])).max() == 0
    alone = [cli("edit", tmp_path / "in" / "room.png", "put the chair in the room", "--reference",
                 tmp_path / "in" / "chair.png", *common, "--seed", 3, "--json", "-o", tmp_path / "alone"),
             cli("edit", tmp_path / "in" / "plain.png", "make it night", *common, "--seed", 4, "-n", 2, "--json",
                 "-o", tmp_path / "alone"),
             cli("edit", tmp_path / "in" / "plain.png", "make it night", *common, "--seed", 6, "--mask",
                 tmp_path / "in" / "mask.png", "--strength", 0.9, "--json", "-o", tmp_path / "alone")]
    own = [json.loads(line) for result in alone for line in result.stdout.splitlines()]
    assert len(own) == 4 and json.loads(own[3]["edit_mask"])[0]["path"] == str(tmp_path / "in" / "mask.png")
    for mine, row in zip(own, rows):
        assert {k: v for k, v in mine.items() if k != "path"} == {
            k: v for k, v in row.items() if k not in ("path", "line", "index", "base_seed", "init_image", "mask")}
        assert np.abs(pixels_of(mine["path"]) - pixels_of(tmp_path / "txt" / row["path"])).max() <= 2


def pixels_of(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("line, model, message", [
    ("--prompt x --init_image good.png --reference gone.png", "dev", "p.txt:2: --reference: no such file"),
    ("--prompt x --init_image good.png --reference good.png", "dev", "p.txt:2: FLUX.1 Kontext takes no --reference"),
    ("--prompt x --init_image good.png --edit true", "sd1", "p.txt:2: 'tiny-sd1' (SD1/SD2) cannot edit by instruction"),
    ("--prompt x --reference good.png", "dev", "p.txt:2: --reference makes an edit line; add --init_image"),
    ("--prompt x --init_image good.png --edit true --strength 0.5", "dev", "p.txt:2: --strength applies to an edit line with --mask"),
    ('{"prompt": "x", "init_image": "good.png", "reference": [3]}', "dev", 'p.jsonl:2: "reference" takes a path or a list'),
])
def test_batch_edit_line_refusals_name_the_line_before_any_model_loads(flux_dev_folder, sd1_folder, tmp_path,
                                                                      monkeypatch, line, model, message):
    from ldm_cli import loading

    picture(64, 64).save(tmp_path / "good.png")
    file = tmp_path / ("p.jsonl" if line.startswith("{") else "p.txt")
    file.write_text(('{"prompt": "fine"}' if line.startswith("{") else "fine") + "\n" + line + "\n")
    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("a model loaded"))
    folder = {"dev": flux_dev_folder, "sd1": sd1_folder}[model]
    result = cli("batch", file, "--model", folder, "--steps", 1, "-o", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "Traceback" not in result.output
    assert png_files(tmp_path / "out") == []


def test_batch_qwen_edit_lines_read_each_lines_images(qwen_edit, toy_areas, tmp_path):
    """Prompts are encoded ahead for the whole file, each read with its own line's images (found
    from the record) as `ldm edit` reads them with the images it holds."""
    from ldm_cli import edit_inputs
    from ldm_cli.families import qwen_edit as family
    from ldm_cli.families import qwen_image

    model = qwen_edit["edit-plus"][0]
    for name, size in (("a.png", (96, 64)), ("b.png", (64, 80)), ("c.png", (64, 64))):
        picture(*size).save(tmp_path / name)
    lines = ["--prompt \"the woman behind the counter\" --init_image a.png --reference b.png --seed 2",
             "--prompt \"the woman behind the counter\" --init_image c.png --reference a.png --seed 2"]
    (tmp_path / "p.txt").write_text("\n".join(lines) + "\n")
    common = ["--model", model.path, "--steps", 2, "-W", 64, "-H", 64]
    result = cli("batch", tmp_path / "p.txt", *common, "--batch-size", 2, "--quiet", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    for row, (first, second) in zip(rows, (("a.png", "b.png"), ("c.png", "a.png"))):
        alone = cli("edit", tmp_path / first, "the woman behind the counter", "--reference", tmp_path / second,
                    *common, "--seed", 2, "--json", "-o", tmp_path / "alone")
        assert alone.exit_code == 0, alone.stderr
        assert np.abs(pixels_of(json.loads(alone.stdout)["path"]) - pixels_of(tmp_path / "out" / row["path"])).max() <= 2
    # the conditioning itself: read from the record as from the images held, unlike another line's
    s = Settings.from_dict({k: v for k, v in rows[1].items() if k not in ("path", "line", "index", "base_seed")})
    held = family.prompt_images(model, [Image.open(tmp_path / "c.png").convert("RGB"), Image.open(tmp_path / "a.png").convert("RGB")])
    assert [p.name for p in edit_inputs.found(edit_inputs.from_text(s.edit_images))] == ["c.png", "a.png"]
    states = []
    for images in (None, {s.edit_images: held}, {s.edit_images: held[::-1]}):
        model.edit_inputs = images
        states.append(qwen_image.encode(model, [s.prompt], s, False)["encoder_hidden_states"])
    model.edit_inputs = None
    assert torch.equal(states[0], states[1]) and (states[0] - states[2]).abs().max() > 1e-3


def test_from_png_replays_the_mask_and_refuses_a_changed_one(flux2_klein_folder, tmp_path):
    source, mask = tmp_path / "photo.png", tmp_path / "mask.png"
    picture(64, 64).save(source)
    drawn = Image.new("L", (64, 64), 0)
    drawn.paste(255, (0, 0, 32, 64))
    drawn.save(mask)
    made = cli("edit", source, "make it night", "--model", flux2_klein_folder, "--steps", 2, "--seed", 5,
               "--max-sequence-length", 64, "--mask", mask, "--strength", 0.9, "--json", "-o", tmp_path / "out")
    assert made.exit_code == 0, made.stderr
    record = json.loads(made.stdout)
    assert json.loads(record["edit_mask"]) == [{"path": str(mask), "hash": edit_inputs_hash(mask)}]
    again = cli("edit", "--from-png", record["path"], "--json", "-o", tmp_path / "again")
    assert again.exit_code == 0, again.stderr
    replayed = json.loads(again.stdout)
    assert {k: v for k, v in replayed.items() if k != "path"} == {k: v for k, v in record.items() if k != "path"}
    assert np.array_equal(pixels_of(record["path"]), pixels_of(replayed["path"]))
    # new images given: the recorded mask is not theirs, so it is not replayed
    whole = cli("edit", source, "--from-png", record["path"], "--json", "-o", tmp_path / "whole")
    assert whole.exit_code == 0 and "edit_mask" not in json.loads(whole.stdout) and "strength" not in json.loads(whole.stdout)
    Image.new("L", (64, 64), 255).save(mask)
    changed = cli("edit", "--from-png", record["path"], "-o", tmp_path / "changed")
    assert changed.exit_code == 2 and changed.stderr.count("\n") == 1, changed.output
    assert changed.stderr.startswith("ldm: error: the mask this edit was made from") and "has changed since" in changed.stderr
    assert png_files(tmp_path / "changed") == []


def edit_inputs_hash(path):
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()[:10]


@pytest.mark.slow
def test_edit_with_compile_is_the_uncompiled_image(flux2_klein_folder, tmp_path, monkeypatch):
    """`ldm edit --compile` (klein with a reference: the denoiser compiled with the reference tokens
    in its input) makes the image the eager run makes; skipped where inductor cannot build code."""
    from ldm_cli import compiling

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    try:
        compiling.check_toolchain(torch.device("cpu"))
        torch.compile(lambda x: x * 2 + 1)(torch.ones(3))  # inductor builds C++ here, or cannot
    except Exception as e:  # noqa: BLE001 - any failure of the toolchain itself means no compiler to test
        pytest.skip(f"no working compiler here: {str(e)[:200]}")
    source, other = tmp_path / "room.png", tmp_path / "chair.png"
    picture(64, 64).save(source)
    picture(64, 48).save(other)
    common = ["edit", source, "put the chair in the room", "--reference", other, "--model", flux2_klein_folder,
              "--steps", 2, "--seed", 7, "--max-sequence-length", 64, "--device", "cpu", "--json"]
    plain = cli(*common, "-o", tmp_path / "plain")
    compiled = cli(*common, "--compile", "-o", tmp_path / "compiled")
    assert plain.exit_code == 0 and compiled.exit_code == 0, compiled.output
    mine, theirs = (json.loads(r.stdout) for r in (plain, compiled))
    assert {k: v for k, v in mine.items() if k != "path"} == {k: v for k, v in theirs.items() if k != "path"}
    assert np.abs(pixels_of(mine["path"]) - pixels_of(theirs["path"])).max() <= 1


def test_generate_from_an_edited_png_neither_reads_nor_records_the_inputs(flux_dev_folder, tmp_path):
    source = tmp_path / "photo.png"
    picture(64, 48).save(source)
    made = cli("edit", source, "make it night", "--model", flux_dev_folder, "--steps", 1, "-W", 64, "-H", 48,
               "--json", "-o", tmp_path / "out")
    assert made.exit_code == 0, made.stderr
    for command in (["generate"], ["img2img", source]):
        again = cli(*command, "--from-png", json.loads(made.stdout)["path"], "--json", "-o", tmp_path / "again")
        assert again.exit_code == 0, again.stderr
        assert "edit_images" not in json.loads(again.stdout)
