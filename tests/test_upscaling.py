"""`ldm upscale` and upscaling.upscale_to: spandrel's output whole and tiled, A1111's passes and
resize, names in the models folders, the metadata, and every refusal in one line."""
import json
import pickle
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw, PngImagePlugin
from typer.testing import CliRunner

from ldm_cli import infotext, limits, tiling, upscaling
from ldm_cli.cli import app
from ldm_cli.errors import LdmError
from ldm_cli.libraries import import_spandrel
from tests import upscaler_files
from tests.test_safety import RunsCode, assert_one_line_error

PARAMETERS = "a lighthouse\nNegative prompt: fog\nSteps: 20, Sampler: Euler, Seed: 7, Size: 40x32"


def cli(*args):
    return CliRunner().invoke(app, ["upscale", *map(str, args)])


def scene(size=(40, 32)) -> Image.Image:
    """A gradient with shapes: edges and flat parts, as a picture has."""
    image = Image.linear_gradient("L").resize(size).convert("RGB")
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((w // 6, h // 8, w * 3 // 4, h * 3 // 4), fill=(200, 40, 90))
    draw.rectangle((w // 2, h // 3, w - 4, h - 3), outline=(10, 200, 30), width=3)
    return image


@pytest.fixture
def source(tmp_path):
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", PARAMETERS)
    path = tmp_path / "in" / "shot.png"
    path.parent.mkdir()
    scene().save(path, pnginfo=info)
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """Tiny ESRGAN (.pth, nested as RealESRGAN's releases), compact SRVGG and SwinIR (.safetensors)."""
    folder = tmp_path_factory.mktemp("upscalers")
    return {"esrgan": upscaler_files.save(upscaler_files.esrgan(), folder / "4x-tiny.pth", nested="params_ema"),
            "compact": upscaler_files.save(upscaler_files.compact(), folder / "2x-compact.safetensors"),
            "swinir": upscaler_files.save(upscaler_files.swinir(), folder / "2x-swinir.safetensors")}


def spandrels_output(path, image: Image.Image) -> np.ndarray:
    """The model applied to the whole image by spandrel's own loader and call, in 8 bits."""
    model = import_spandrel().ModelLoader().load_from_file(path).eval()
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)[None].float() / 255
    with torch.inference_mode():
        out = model(pixels)[0]
    return (out.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def saved(result) -> tuple[Image.Image, dict]:
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout.splitlines()[-1])
    with Image.open(record["path"]) as image:
        image.load()
        return image, record


@pytest.mark.parametrize("kind", ["esrgan", "compact", "swinir"])
def test_an_image_smaller_than_a_tile_is_exactly_spandrels_output(models, source, tmp_path, kind):
    image, record = saved(cli(source, "--upscaler", models[kind], "--out", tmp_path / "o", "--json"))
    expected = spandrels_output(models[kind], scene())
    assert np.array_equal(np.array(image), expected)
    assert (record["width"], record["height"]) == (expected.shape[1], expected.shape[0])


def test_the_png_keeps_its_parameters_and_records_the_upscale(models, source, tmp_path):
    image, record = saved(cli(source, "--upscaler", models["compact"], "--scale", 3, "--out", tmp_path / "o", "--json"))
    assert image.size == (120, 96) and record["upscaler"] == "2x-compact"
    assert image.text["parameters"] == PARAMETERS
    assert image.text[infotext.POSTPROCESSING] == "Postprocess upscale by: 3, Postprocess upscaler: 2x-compact"


@pytest.mark.parametrize("box, covered", [((100, 100), (125, 100)), ((160, 64), (160, 128)), ((40, 32), (40, 32))])
def test_resize_covers_the_box_then_crops_its_middle_as_a1111(models, source, tmp_path, box, covered):
    assert upscaling.cover((40, 32), box) == covered
    image, record = saved(cli(source, "--upscaler", models["compact"], "--resize", f"{box[0]}x{box[1]}",
                              "--out", tmp_path / "o", "--json"))
    assert image.size == box == (record["width"], record["height"])
    upscaler = upscaling.load(str(models["compact"]))
    full = upscaling.upscale(upscaler, scene(), covered, at_least=1)
    left, top = covered[0] // 2 - box[0] // 2, covered[1] // 2 - box[1] // 2
    assert image.tobytes() == full.crop((left, top, left + box[0], top + box[1])).tobytes()
    assert image.text[infotext.POSTPROCESSING] == (f"Postprocess upscale to: {box[0]}x{box[1]}, Postprocess crop to: "
                                                   f"{box[0]}x{box[1]}, Postprocess upscaler: 2x-compact")


def test_tiled_stays_within_six_levels_of_the_whole_image(models):
    """Tile borders see less context than the whole image; the feathered overlap keeps the
    difference to at most 6/255 anywhere and 0.2/255 on average (48-pixel tiles, 16 overlap),
    where tiles that only touch differ by 40/255 and more at their seams."""
    upscaler = upscaling.load(str(models["compact"]))
    picture = scene((120, 88))
    whole = np.array(upscaling.upscale(upscaler, picture, (240, 176), tile=512)).astype(int)
    tiled = np.array(upscaling.upscale(upscaler, picture, (240, 176), tile=48, overlap=16)).astype(int)
    butted = np.array(upscaling.upscale(upscaler, picture, (240, 176), tile=48, overlap=0)).astype(int)
    assert tiling.count(picture.size, 48, 16) == 12
    difference = np.abs(whole - tiled)
    assert difference.max() <= 6 and difference.mean() <= 0.2
    assert np.abs(whole - butted).max() >= 40
    assert np.abs(whole - np.array(picture.resize((240, 176), Image.NEAREST))).mean() > 5  # the model does something


@pytest.mark.parametrize("size, tile, overlap", [((70, 45), 32, 8), ((64, 64), 32, 16), ((100, 33), 40, 0)])
def test_tiles_of_a_pixelwise_model_blend_back_to_the_whole_image(size, tile, overlap):
    """Where a model looks at one pixel only, tiling changes nothing: every output pixel is
    covered, in place, and the weights average out."""
    image = torch.rand(1, 3, size[1], size[0], generator=torch.Generator().manual_seed(1))

    def apply(x):
        return torch.nn.functional.interpolate(x * 0.5 + x ** 2, scale_factor=3, mode="nearest")

    calls = []
    out = tiling.run(apply, image, 3, tile, overlap, on_tile=lambda: calls.append(1))
    torch.testing.assert_close(out, apply(image), atol=1e-6, rtol=0)
    assert len(calls) == tiling.count(size, tile, overlap) > 1


def test_out_of_memory_halves_the_tile_until_it_fits(capsys):
    image = torch.rand(1, 3, 80, 80, generator=torch.Generator().manual_seed(2))

    def apply(x):
        if max(x.shape[-2:]) > 40:
            raise torch.OutOfMemoryError("CUDA out of memory")
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")

    halved = []
    out, tile = tiling.run_halving(apply, image, 2, 160, 32, on_halved=halved.append)
    assert tile == 40
    torch.testing.assert_close(out, torch.nn.functional.interpolate(image, scale_factor=2, mode="nearest"),
                               atol=1e-6, rtol=0)
    # 160 (one tile) -> 80, overlap 32 (one tile again) -> 40, overlap 20 (3 x 3): 8 more than planned
    assert halved == [0, tiling.count((80, 80), 40, 20) - 1] == [0, 8]
    assert "40-pixel tiles" in capsys.readouterr().err
    with pytest.raises(LdmError, match="out of memory upscaling even with 32-pixel tiles"):
        tiling.run_halving(lambda x: (_ for _ in ()).throw(torch.OutOfMemoryError("oom")), image, 2, 64, 8)


class SmallGpuModel:
    """A 2x nearest-neighbour 'model' whose device holds no tile over 40 pixels a side."""
    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self):
        self.too_large = 0

    def __call__(self, x):
        if max(x.shape[-2:]) > 40:
            self.too_large += 1
            raise torch.OutOfMemoryError("CUDA out of memory")
        return torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")


def test_later_passes_start_from_the_tile_that_fitted_and_the_count_stays_true():
    model = SmallGpuModel()
    upscaler = upscaling.Upscaler("small", model, 2)
    picture = scene((60, 60))
    planned = sum(tiling.count((side, side), 64, 8) for side in (60, 120))  # what `ldm upscale` plans
    ran, more = [], []
    out = upscaling.upscale(upscaler, picture, (240, 240), tile=64, overlap=8, on_tile=lambda: ran.append(1),
                            on_halved=more.append)
    assert out.tobytes() == picture.resize((240, 240), Image.NEAREST).tobytes()
    assert model.too_large == 1 and upscaler.fitting_tile == 32  # the second pass never tried 64
    assert len(ran) == planned + sum(more)


@pytest.mark.parametrize("size, target, scale, at_least, expected", [
    ((100, 80), (400, 320), 4, 0, 1), ((100, 80), (500, 320), 4, 0, 2), ((10, 10), (5000, 5000), 2, 0, 3),
    ((100, 80), (200, 160), 1, 0, 1), ((100, 80), (100, 80), 4, 0, 0), ((100, 80), (100, 80), 4, 1, 1)])
def test_a_model_runs_as_many_passes_as_a1111_runs(size, target, scale, at_least, expected):
    assert upscaling.passes(size, target, scale, at_least) == expected


def test_a_smaller_model_runs_again_and_a_larger_one_is_resized_down(models):
    upscaler = upscaling.load(str(models["compact"]))
    picture = scene()
    twice = upscaling.upscale(upscaler, upscaling.upscale(upscaler, picture, (80, 64)), (160, 128))
    assert np.array_equal(np.array(upscaling.upscale(upscaler, picture, (120, 96))),
                          np.array(twice.resize((120, 96), Image.LANCZOS)))
    once = upscaling.upscale(upscaler, picture, (80, 64))
    assert np.array_equal(np.array(upscaling.upscale(upscaler, picture, (60, 48), at_least=1)),
                          np.array(once.resize((60, 48), Image.LANCZOS)))


def test_upscale_to_takes_resizers_files_and_names(models, tmp_path):
    picture = scene()
    assert np.array_equal(np.array(upscaling.upscale_to(picture, "Lanczos", (120, 96), models_dir=None, device="cpu")),
                          np.array(picture.resize((120, 96), Image.LANCZOS)))
    assert upscaling.upscale_to(picture, "Nearest", (80, 64), models_dir=None, device="cpu").tobytes() == \
        picture.resize((80, 64), Image.NEAREST).tobytes()
    comfy = tmp_path / "comfy" / "models" / "upscale_models" / "sub"
    comfy.mkdir(parents=True)
    (comfy / "2x-compact.safetensors").write_bytes(models["compact"].read_bytes())
    by_name = upscaling.upscale_to(picture, "2x-compact", (80, 64), models_dir=str(tmp_path / "comfy"), device="cpu")
    by_file = upscaling.upscale_to(picture, str(models["compact"]), (80, 64), models_dir=None,
                                   device=torch.device("cpu"))
    assert np.array_equal(np.array(by_name), spandrels_output(models["compact"], picture))
    assert by_name.tobytes() == by_file.tobytes()


def test_upscale_to_resizes_as_a1111s_resize_image(models):
    """To the larger ratio's size rounded down to 8, by the upscaler, then Lanczos to the size."""
    picture = scene()  # 40x32 to 100x70: scale 2.5, 100x80 rounded down to 96x80, then 100x70
    lanczos = picture.resize((100, 80), Image.LANCZOS).resize((96, 80), Image.LANCZOS).resize((100, 70), Image.LANCZOS)
    assert upscaling.upscale_to(picture, "Lanczos", (100, 70), models_dir=None).tobytes() == lanczos.tobytes()
    nearest = picture.resize((100, 80), Image.NEAREST).resize((96, 80), Image.LANCZOS).resize((100, 70), Image.LANCZOS)
    assert upscaling.upscale_to(picture, "Nearest", (100, 70), models_dir=None).tobytes() == nearest.tobytes()
    assert upscaling.upscale_to(picture, "None", (100, 70), models_dir=None).tobytes() == \
        picture.resize((100, 70), Image.LANCZOS).tobytes()
    compact = upscaling.load(str(models["compact"]))  # 2x: two passes to 160x128, Lanczos to 96x80, then 100x70
    twice = upscaling.upscale(compact, upscaling.upscale(compact, picture, (80, 64)), (160, 128))
    expected = twice.resize((96, 80), Image.LANCZOS).resize((100, 70), Image.LANCZOS)
    assert upscaling.upscale_to(picture, str(models["compact"]), (100, 70), models_dir=None).tobytes() == expected.tobytes()
    assert upscaling.upscale_to(picture, "Lanczos", (40, 30), models_dir=None).tobytes() == \
        picture.resize((40, 30), Image.LANCZOS).tobytes()  # not larger: Lanczos alone


def test_a_name_is_found_in_a1111s_esrgan_folder_and_ldm_models_dir(models, source, tmp_path, monkeypatch):
    esrgan = tmp_path / "a1111" / "models" / "ESRGAN"
    esrgan.mkdir(parents=True)
    (esrgan / "4x-tiny.pth").write_bytes(models["esrgan"].read_bytes())
    monkeypatch.setenv("LDM_MODELS_DIR", str(tmp_path / "a1111"))
    image, record = saved(cli(source, "--upscaler", "4x-tiny", "--out", tmp_path / "o", "--json", "--device", "cpu"))
    assert image.size == (160, 128) and record["upscaler"] == "4x-tiny"
    assert_one_line_error(cli(source, "--upscaler", "4x-none", "--out", tmp_path / "o2"),
                          "no upscaler model named '4x-none' in", "ESRGAN")
    assert not (tmp_path / "o2").exists()


def test_without_spandrel_a_model_upscaler_is_one_line_naming_the_install(models, source, tmp_path, monkeypatch):
    monkeypatch.delitem(sys.modules, "spandrel", raising=False)
    monkeypatch.setitem(sys.modules, "spandrel", None)  # what an environment without it raises
    assert_one_line_error(cli(source, "--upscaler", models["esrgan"], "--out", tmp_path / "o"),
                          "pip install --no-deps 'spandrel")
    assert not (tmp_path / "o").exists()
    assert cli(source, "--upscaler", "Lanczos", "--scale", 2, "--out", tmp_path / "l").exit_code == 0


def test_a_pth_that_would_run_code_is_refused_and_never_runs(models, source, tmp_path):
    marker = tmp_path / "ran.txt"
    weights = upscaler_files.esrgan()
    torch.save({"params_ema": weights, "payload": RunsCode(marker)}, tmp_path / "4x-evil.pth")
    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"w": RunsCode(marker)}, protocol=4))
    for evil in ("4x-evil.pth", "evil.pt"):
        result = cli(source, "--upscaler", tmp_path / evil, "--out", tmp_path / "o")
        assert_one_line_error(result, evil, "ldm will not run code from a checkpoint")
    assert not marker.exists() and not (tmp_path / "o").exists()


@pytest.fixture
def not_an_upscaler(tmp_path):
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(tmp_path / "sd.safetensors"))
    return tmp_path / "sd.safetensors"


@pytest.mark.parametrize("args, words", [
    (["--scale", "0"], "--scale must be between 1 and 16 (got 0)"),
    (["--scale", "17"], "--scale must be between 1 and 16"),
    (["--tile", "16"], "--tile must be between 32 and 16384 pixels (got 16)"),
    (["--tile", "64", "--tile-overlap", "33"], "--tile-overlap must be between 0 and half the tile, 32 (got 33)"),
    (["--tile-overlap", "-1"], "--tile-overlap must be between 0"),
    (["--upscaler", "Lanczos"], "--scale or --resize is needed with --upscaler Lanczos"),
    (["--scale", "2", "--resize", "80x64"], "give --scale or --resize, not both"),
    (["--resize", "80"], "--resize must be WIDTHxHEIGHT, each 1 to 16384, such as 2048x1536 (got '80')"),
    (["--resize", "0x64"], "--resize must be WIDTHxHEIGHT"),
    (["--resize", "20000x64"], "--resize must be WIDTHxHEIGHT"),
    (["--upscaler", "/nowhere/4x.pth"], "no such upscaler file: '/nowhere/4x.pth'"),
    (["--upscaler", "NOT_AN_UPSCALER"], "is no upscaler model ldm knows"),
    (["--scale", "16", "--upscaler", "Lanczos", "IMAGE_TOO_LARGE"], "upscaled would be 16000x16000, more than ldm writes"),
    (["MISSING"], "no such file"),
    (["NOT_AN_IMAGE"], "is not a readable image"),
    (["--device", "tpu"], "unknown --device"),
])
def test_bad_flags_fail_in_one_line_and_write_nothing(models, source, not_an_upscaler, tmp_path, args, words):
    large = tmp_path / "large.png"
    Image.new("RGB", (1000, 1000)).save(large)
    (tmp_path / "notes.png").write_text("not a picture")
    swap = {"NOT_AN_UPSCALER": not_an_upscaler, "IMAGE_TOO_LARGE": large, "MISSING": tmp_path / "gone.png",
            "NOT_AN_IMAGE": tmp_path / "notes.png"}
    args = [swap.get(a, a) for a in args]
    images = [a for a in args if a in (large, tmp_path / "gone.png", tmp_path / "notes.png")] or [source]
    flags = [a for a in args if a not in images]
    if "--upscaler" not in flags:
        flags += ["--upscaler", models["compact"]]
    assert_one_line_error(cli(*images, *flags, "--out", tmp_path / "o"), words)
    assert not (tmp_path / "o").exists()


def test_the_output_limit_follows_ldm_max_pixels(source, tmp_path, monkeypatch):
    assert limits.max_upscale_pixels() == limits.MAX_UPSCALE_PIXELS
    monkeypatch.setenv(limits.MAX_PIXELS_ENV, "10000x10000")
    assert limits.max_upscale_pixels() == 10**8
