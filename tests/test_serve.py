"""`ldm serve` driven by real clients (webuiapi, openai, httpx) on localhost: the same pixels
as the CLI, model switching, interrupt, the queue, and every refusal."""
from __future__ import annotations

import base64
import io
import json
import shutil
import signal
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ldm_cli.cli import app
from ldm_cli.server import app as application
from ldm_cli.server import renders
from tests.serving import live

webuiapi = pytest.importorskip("webuiapi")
openai = pytest.importorskip("openai")


@pytest.fixture(scope="module")
def server():
    with live() as running:
        yield running


def cli_png(tmp_path, *args) -> Image.Image:
    out = tmp_path / "cli"
    result = CliRunner().invoke(app, [*map(str, args), "--out", str(out), "--quiet"])
    assert result.exit_code == 0, result.output
    [path] = sorted(out.glob("*.png"))
    shutil.move(path, tmp_path / "cli.png")
    return Image.open(tmp_path / "cli.png")


def same_pixels(a: Image.Image, b: Image.Image) -> bool:
    return a.size == b.size and np.array_equal(np.asarray(a.convert("RGB")), np.asarray(b.convert("RGB")))


def api(server, **kwargs):
    host, port = server.url.removeprefix("http://").rsplit(":", 1)
    return webuiapi.WebUIApi(host=host, port=int(port), **kwargs)


# -- A1111 ----------------------------------------------------------------------------------------
def test_webuiapi_txt2img_is_the_cli_image(server, tmp_path):
    result = api(server).txt2img(prompt="a red circle", negative_prompt="blue", seed=5, width=64, height=64,
                                 steps=6, cfg_scale=6, sampler_name="DPM++ 2M", scheduler="automatic")
    [image] = result.images
    cli = cli_png(tmp_path, "generate", "a red circle", "--negative", "blue", "--seed", 5, "--steps", 6,
                  "--cfg", 6, "--scheduler", "DPM++ 2M", "--schedule", "karras")
    assert same_pixels(image, cli)
    assert image.text == cli.text  # the same `parameters` and ldm chunks as the saved file
    assert result.info["seed"] == 5 and result.info["all_seeds"] == [5]
    assert result.info["infotexts"] == [cli.text["parameters"]]
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in cli.text["parameters"]


def test_webuiapi_hires_fix_and_a_schedule_type_are_the_cli_image(server, tmp_path):
    """webuiapi's enable_hr fields, and its eta/s_* defaults on every call, as the CLI's flags."""
    result = api(server).txt2img(prompt="a red circle", seed=8, width=64, height=64, steps=4, cfg_scale=5,
                                 sampler_name="Euler a", scheduler="SGM Uniform", enable_hr=True, hr_scale=1.5,
                                 hr_upscaler="Lanczos", hr_second_pass_steps=3, denoising_strength=0.6)
    [image] = result.images
    cli = cli_png(tmp_path, "generate", "a red circle", "--seed", 8, "--steps", 4, "--cfg", 5, "--scheduler", "Euler a",
                  "--schedule", "sgm_uniform", "--hires-scale", 1.5, "--hires-upscaler", "Lanczos", "--hires-steps", 3,
                  "--hires-strength", 0.6)
    assert image.size == (96, 96) and same_pixels(image, cli)
    assert "Schedule type: SGM Uniform" in cli.text["parameters"] and "Hires upscale: 1.5" in cli.text["parameters"]
    assert "Eta" not in cli.text["parameters"] and image.text == cli.text
    modes = httpx.get(f"{server.url}/sdapi/v1/latent-upscale-modes").json()
    assert {"name": "Latent (bicubic antialiased)"} in modes
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "enable_hr": True, "width": 64, "height": 64,
                                                           "hr_upscaler": "../../x.pth"})
    assert r.status_code == 400 and "unknown hr_upscaler" in r.json()["detail"]


def test_txt2img_batches_and_the_raw_info_string(server):
    body = {"prompt": "a cat", "seed": 11, "width": 64, "height": 64, "steps": 2, "batch_size": 2, "n_iter": 2,
            "sampler_name": "Euler", "scheduler": "automatic", "denoising_strength": 0.7, "enable_hr": False,
            "url": "http://x", "auth": "user:secret", "an_unknown_key": [1, 2]}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=body, timeout=120)
    assert r.status_code == 200, r.text
    data = r.json()
    assert isinstance(data["info"], str)
    info = json.loads(data["info"])
    assert info["all_seeds"] == [11, 12, 13, 14] and len(data["images"]) == 4
    assert "auth" not in data["parameters"] and "url" not in data["parameters"]  # credentials never echoed
    first = Image.open(io.BytesIO(base64.b64decode(data["images"][0])))
    assert json.loads(first.text["ldm"])["schedule"] == "default"  # Euler's automatic: its own spacing


def test_webuiapi_img2img_and_inpaint_are_the_cli_images(server, tmp_path):
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    picture.save(tmp_path / "init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    mask.save(tmp_path / "mask.png")
    client = api(server)
    out = client.img2img(images=[Image.open(tmp_path / "init.png")], prompt="a dog", seed=3, steps=8,
                         width=64, height=64, denoising_strength=0.5, sampler_name="Euler", scheduler="karras")
    cli = cli_png(tmp_path, "img2img", tmp_path / "init.png", "a dog", "--seed", 3, "--steps", 8,
                  "--strength", 0.5, "--scheduler", "euler", "--schedule", "karras", "--cfg", 7)
    assert same_pixels(out.image, cli)
    out = client.img2img(images=[Image.open(tmp_path / "init.png")], mask_image=Image.open(tmp_path / "mask.png"),
                         prompt="a dog", seed=3, steps=4, width=64, height=64, denoising_strength=1.0,
                         mask_blur=2, inpainting_fill=1, inpaint_full_res=False, sampler_name="Euler")
    cli = cli_png(tmp_path, "inpaint", tmp_path / "init.png", tmp_path / "mask.png", "a dog", "--seed", 3,
                  "--steps", 4, "--strength", 1, "--mask-blur", 2, "--scheduler", "euler", "--cfg", 7)
    assert same_pixels(out.image, cli)


def test_only_masked_and_an_inverted_mask_are_the_cli_image(server, tmp_path):
    picture = Image.fromarray(np.random.default_rng(2).integers(0, 255, (96, 96, 3), dtype=np.uint8))
    picture.save(tmp_path / "init.png")
    keep = Image.new("L", (96, 96), 255)
    keep.paste(0, (40, 40, 64, 64))  # inverted: this square is what gets repainted
    repaint = Image.new("L", (96, 96), 0)
    repaint.paste(255, (40, 40, 64, 64))
    repaint.save(tmp_path / "mask.png")
    out = api(server).img2img(images=[picture], mask_image=keep, inpainting_mask_invert=1, prompt="a dog", seed=4,
                              steps=3, width=64, height=64, denoising_strength=0.8, inpainting_fill=1,
                              inpaint_full_res=True, inpaint_full_res_padding=8, sampler_name="Euler")
    cli = cli_png(tmp_path, "inpaint", tmp_path / "init.png", tmp_path / "mask.png", "a dog", "--seed", 4,
                  "--steps", 3, "--strength", 0.8, "--only-masked", "--padding", 8, "--width", 64, "--height", 64,
                  "--scheduler", "euler", "--cfg", 7)
    assert out.image.size == (96, 96) and same_pixels(out.image, cli)


def test_fill_paints_the_masked_part_from_around_it():
    from ldm_cli.server import a1111

    picture = Image.new("RGB", (64, 32), (200, 30, 10))
    picture.paste((10, 20, 220), (32, 0, 64, 32))
    mask = Image.new("L", (64, 32), 0)
    mask.paste(255, (32, 0, 64, 32))  # the blue half repainted: only red is around it
    out = np.asarray(Image.open(io.BytesIO(a1111.filled(
        renders.Upload(_png(picture), "i"), renders.Upload(_png(mask), "m")).data)))
    assert np.array_equal(out[:, :32], np.asarray(picture)[:, :32])  # kept pixels exactly
    assert np.abs(out[:, 32:].astype(int) - [200, 30, 10]).max() <= 1


def test_webuiapi_default_fill_is_the_cli_inpaint_of_the_filled_image(server, tmp_path):
    from ldm_cli.server import a1111

    picture = Image.fromarray(np.random.default_rng(5).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (8, 8, 40, 40))
    mask.save(tmp_path / "mask.png")
    (tmp_path / "filled.png").write_bytes(a1111.filled(renders.Upload(_png(picture), "i"),
                                                       renders.Upload(_png(mask), "m")).data)
    out = api(server).img2img(images=[picture], mask_image=mask, prompt="a cat", seed=6, steps=3, width=64,
                              height=64, inpaint_full_res=False, sampler_name="Euler")  # inpainting_fill: 0
    cli = cli_png(tmp_path, "inpaint", tmp_path / "filled.png", tmp_path / "mask.png", "a cat", "--seed", 6,
                  "--steps", 3, "--strength", 0.75, "--scheduler", "euler", "--cfg", 7)
    assert same_pixels(out.image, cli)


def test_inpainting_fill_ldm_cannot_run_is_refused(server):
    image = base64.b64encode(_png(Image.new("RGB", (64, 64)))).decode()
    r = httpx.post(f"{server.url}/sdapi/v1/img2img", json={"init_images": [image], "mask": image,
                                                           "inpainting_fill": 2, "prompt": "x"})
    assert r.status_code == 400 and "inpainting_fill 2 (latent noise)" in r.json()["detail"]


def test_lists_and_options(server):
    client = api(server)
    assert client.get_scripts() == {"txt2img": [], "img2img": []}
    assert {"name": "DPM++ 2M", "aliases": ["dpmpp_2m"], "options": {}} in client.get_samplers()
    assert "automatic" in [s["name"] for s in client.get_schedulers()]
    assert [m["model_name"] for m in client.get_sd_models()] == ["ldm-builtin"]
    options = client.get_options()
    options["some_ui_setting"] = {"kept": True}  # Open WebUI posts the whole dict back
    client.set_options(options)
    assert client.get_options()["some_ui_setting"] == {"kept": True}
    r = httpx.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "../../etc/passwd"})
    assert r.status_code == 400 and "the server lists: ldm-builtin" in r.json()["detail"]
    for path in ("loras", "sd-vae", "embeddings", "upscalers", "latent-upscale-modes", "memory", "progress"):
        assert httpx.get(f"{server.url}/sdapi/v1/{path}").status_code == 200, path
    assert httpx.post(f"{server.url}/sdapi/v1/refresh-checkpoints").status_code == 200


def test_png_info_reads_what_txt2img_wrote(server):
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "a hat", "seed": 2, "width": 64,
                                                          "height": 64, "steps": 1}, timeout=60)
    image = r.json()["images"][0]
    info = httpx.post(f"{server.url}/sdapi/v1/png-info", json={"image": image}).json()
    assert info["info"].startswith("a hat\nSteps: 1") and info["parameters"]["Seed"] == "2"


@pytest.mark.parametrize("body, message", [
    ({"width": 60}, "width must be a positive multiple of 8 (got 60); try 64"),
    ({"steps": 100_000}, "steps must be between 1 and 1000"),
    ({"sampler_name": "Nope"}, "unknown scheduler 'Nope'"),
    ({"scheduler": "turbo_exponential"}, "scheduler 'turbo_exponential' is not one ldm runs"),
    ({"steps": "many"}, 'steps must be a whole number (got "many")'),
    ({"n_iter": 0}, "n_iter must be at least 1"),
    ({"batch_size": 17}, "batch_size must be at most 16 (got 17)"),
    ({"override_settings": {"sd_model_checkpoint": ["a"]}}, "sd_model_checkpoint must be a listed name"),
    ({"override_settings": {"sd_vae": {"a": 1}}}, "sd_vae must be a listed name"),
    ({"override_settings": {"sd_model_checkpoint": "/etc/passwd"}}, "unknown checkpoint '/etc/passwd'"),
    ({"override_settings": {"sd_vae": "../vae"}}, "unknown VAE '../vae'"),
])
def test_a1111_refusals_are_400_with_a_message_and_the_server_keeps_serving(server, body, message):
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64, **body})
    assert r.status_code == 400 and message in r.json()["detail"], r.text
    assert httpx.get(f"{server.url}/sdapi/v1/options").status_code == 200


def test_a_lora_name_is_never_a_path(server):
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x <lora:../../../etc/passwd:1>",
                                                          "width": 64, "height": 64, "steps": 1}, timeout=60)
    assert r.status_code == 400 and "LoRA '../../../etc/passwd' not found" in r.json()["detail"]


def test_interrupt_keeps_the_images_done(server):
    got = {}

    def long_job():
        got["r"] = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64,
                                                                      "steps": 5, "n_iter": 200, "seed": 1},
                              timeout=120)
    thread = threading.Thread(target=long_job)
    thread.start()
    while not httpx.get(f"{server.url}/sdapi/v1/progress").json()["state"]["sampling_step"]:
        time.sleep(0.05)
    assert httpx.post(f"{server.url}/sdapi/v1/interrupt").status_code == 200
    thread.join(60)
    images = got["r"].json()["images"]
    assert got["r"].status_code == 200 and len(images) < 200


# -- OpenAI ---------------------------------------------------------------------------------------
def client(server, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)


def test_openai_generation_is_the_cli_image(server, tmp_path):
    result = client(server).images.generate(model="dall-e-2", prompt="a green square", n=2, size="64x64",
                                            response_format="b64_json")
    images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in result.data]
    seed = json.loads(images[0].text["ldm"])["seed"]
    assert json.loads(images[1].text["ldm"])["seed"] == seed + 1
    assert same_pixels(images[0], cli_png(tmp_path, "generate", "a green square", "--seed", seed))
    auto = client(server).images.generate(model="gpt-image-1", prompt="x", size="auto")
    assert Image.open(io.BytesIO(base64.b64decode(auto.data[0].b64_json))).size == (64, 64)  # the model's own


def test_openai_edit_repaints_the_transparent_part(server, tmp_path):
    picture = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    picture.save(tmp_path / "init.png")
    mask = Image.new("RGBA", (64, 64), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (8, 8, 40, 40))  # OpenAI's convention: transparent is edited
    ldm_mask = Image.new("L", (64, 64), 0)
    ldm_mask.paste(255, (8, 8, 40, 40))
    ldm_mask.save(tmp_path / "mask.png")
    result = client(server).images.edit(image=_png(picture), mask=_png(mask), prompt="a sun", size="64x64")
    image = Image.open(io.BytesIO(base64.b64decode(result.data[0].b64_json)))
    seed = json.loads(image.text["ldm"])["seed"]
    cli = cli_png(tmp_path, "inpaint", tmp_path / "init.png", tmp_path / "mask.png", "a sun", "--seed", seed,
                  "--width", 64, "--height", 64)
    assert same_pixels(image, cli)


def test_openai_edit_takes_image_brackets_and_redraws_an_opaque_image_whole(server):
    picture = Image.fromarray(np.random.default_rng(3).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    r = httpx.post(f"{server.url}/v1/images/edits", files={"image[]": ("a.png", _png(picture), "image/png")},
                   data={"prompt": "a boat", "size": "64x64"}, timeout=120)
    assert r.status_code == 200, r.text
    image = Image.open(io.BytesIO(base64.b64decode(r.json()["data"][0]["b64_json"])))
    assert "Denoising strength: 0.75" in image.text["parameters"]  # img2img at its default strength
    assert "Mask blur" not in image.text["parameters"]


def test_openai_errors_and_models(server):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).images.generate(prompt="x", n=11)
    assert e.value.body["message"] == "n must be between 1 and 10 (got 11)"
    with pytest.raises(openai.BadRequestError) as e:
        client(server).images.generate(prompt="x", size="65x64")
    assert "65" in e.value.body["message"]
    assert [m.id for m in client(server).models.list()] == ["ldm-builtin"]


# -- models folder --------------------------------------------------------------------------------
def test_models_folder_switching_and_paths(sd1_folder, tmp_path):
    from tests import lora_files, tiny_models

    root = tmp_path / "models"
    shutil.copytree(sd1_folder, root / "Stable-diffusion" / "tiny-sd1")
    unet = lora_files.kohya(lora_files.layers(tiny_models.unet(), ("to_q", "to_v")), "lora_unet_")
    lora_files.write(root / "Lora" / "fox.safetensors", unet)
    config = renders.Config(models_dir=str(tmp_path))
    with live(config) as server:
        client = api(server)
        assert [m["title"] for m in client.get_sd_models()] == ["ldm-builtin", "tiny-sd1"]
        client.util_set_model("tiny-sd1")
        first = client.txt2img(prompt="a fox", seed=1, width=64, height=64, steps=2)
        assert first.info["sd_model_name"] == "tiny-sd1"
        held = server.workers.slots[0].model
        back = client.txt2img(prompt="a fox", seed=1, width=64, height=64, steps=2,
                              override_settings={"sd_model_checkpoint": "ldm-builtin"})
        assert back.info["sd_model_name"] == "ldm-builtin" and server.workers.slots[0].model is not held
        again = client.txt2img(prompt="a fox", seed=1, width=64, height=64, steps=2)
        assert same_pixels(again.image, first.image)  # the option is kept, the override was this request's
        cli = cli_png(tmp_path, "generate", "a fox", "--seed", 1, "--steps", 2, "--cfg", 7,
                      "--scheduler", "Euler a", "--model", root / "Stable-diffusion" / "tiny-sd1")
        assert same_pixels(again.image, cli)
        assert [lora["name"] for lora in client.get_loras()] == ["fox"]
        styled = client.txt2img(prompt="a fox <lora:fox:0.8>", seed=1, width=64, height=64, steps=2)
        cli = cli_png(tmp_path, "generate", "a fox <lora:fox:0.8>", "--seed", 1, "--steps", 2, "--cfg", 7,
                      "--scheduler", "Euler a", "--model", "tiny-sd1", "--models-dir", tmp_path)
        assert same_pixels(styled.image, cli) and not same_pixels(styled.image, again.image)


def test_a1111_controlnet_units_are_the_cli_image(sd1_folder, tmp_path):
    from ldm_cli import loading
    from tests.test_controlnet import pattern, tiny_controlnet

    root = tmp_path / "models"
    shutil.copytree(sd1_folder, root / "checkpoints" / "tiny-sd1")  # ComfyUI's layout
    tiny_controlnet(loading.load(str(sd1_folder)).denoiser, 11).save_pretrained(root / "controlnet" / "edges")
    pattern(0).save(tmp_path / "photo.png")
    with live(renders.Config(models_dir=str(tmp_path))) as server:
        client = api(server)
        client.util_set_model("tiny-sd1")
        unit = webuiapi.ControlNetUnit(image=Image.open(tmp_path / "photo.png"), module="none", model="edges [0]",
                                       weight=0.8, guidance_end=0.6)
        out = client.txt2img(prompt="a red fox", seed=5, steps=4, width=64, height=64, sampler_name="DDIM",
                             controlnet_units=[unit])
        plain = client.txt2img(prompt="a red fox", seed=5, steps=4, width=64, height=64, sampler_name="DDIM",
                               alwayson_scripts={})  # webuiapi's default dict keeps the last call's units
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "alwayson_scripts": {"controlnet": {
            "args": [{"model": "../edges", "image": base64.b64encode(_png(Image.new("RGB", (8, 8)))).decode()}]}}})
    cli = cli_png(tmp_path, "generate", "a red fox", "--model", "tiny-sd1", "--models-dir", tmp_path, "--seed", 5,
                  "--steps", 4, "--cfg", 7, "--scheduler", "ddim", "--controlnet", root / "controlnet" / "edges",
                  "--control-image", tmp_path / "photo.png", "--control-scale", 0.8, "--control-end", 0.6)
    assert 'ControlNet 0: "Module: none, Model: edges [' in out.info["infotexts"][0]
    assert same_pixels(out.image, cli) and not same_pixels(out.image, plain.image)
    assert r.status_code == 400 and "unknown ControlNet '../edges'; the server lists: edges" in r.json()["detail"]


def test_the_folders_are_read_again_on_refresh_checkpoints(tmp_path):
    (tmp_path / "models" / "Stable-diffusion").mkdir(parents=True)
    with live(renders.Config(models_dir=str(tmp_path))) as server:
        client = api(server)
        assert [m["model_name"] for m in client.get_sd_models()] == ["ldm-builtin"]
        (tmp_path / "models" / "Stable-diffusion" / "new.safetensors").write_bytes(b"")
        assert [m["model_name"] for m in client.get_sd_models()] == ["ldm-builtin"]  # listed once, as A1111
        client.refresh_checkpoints()
        assert [m["model_name"] for m in client.get_sd_models()] == ["ldm-builtin", "new"]


def test_switching_frees_the_previous_model_first(monkeypatch):
    import gc
    import weakref

    from ldm_cli import loading
    from ldm_cli.loading import LoadOptions
    from ldm_cli.model_slot import ModelSlot
    from ldm_cli.networks.lookup import NetworkOptions

    alive_at_load = []
    real = loading.load

    def load(source, options):
        alive_at_load.append(previous() is not None)
        return real(source, options)
    previous = lambda: None  # noqa: E731
    monkeypatch.setattr(loading, "load", load)
    slot = ModelSlot("cpu")
    first = slot.get(None, False, LoadOptions(), NetworkOptions())
    previous = weakref.ref(first)
    del first
    gc.collect()
    assert slot.get(None, False, LoadOptions(), NetworkOptions()) is previous()  # loaded alike: kept
    slot.get(None, False, LoadOptions(dtype="fp32", vae_tiling=True), NetworkOptions())
    assert alive_at_load == [False, False]  # the first model was gone before the second loaded


# -- security -------------------------------------------------------------------------------------
def test_credentials_on_every_route():
    security = application.Security(api_key="k3y", api_auth="me:pw")
    with live(security=security) as server:
        base = server.url
        assert httpx.get(f"{base}/sdapi/v1/options").status_code == 401
        assert httpx.get(f"{base}/sdapi/v1/options", headers={"authorization": ""}).status_code == 401
        assert httpx.get(f"{base}/sdapi/v1/options", auth=("me", "pw")).status_code == 200
        assert httpx.get(f"{base}/sdapi/v1/options", auth=("me", "no")).status_code == 401
        assert httpx.get(f"{base}/sdapi/v1/options", headers={"authorization": "Bearer k3y"}).status_code == 200
        assert httpx.get(f"{base}/docs").status_code == 401
        assert httpx.get(f"{base}/openapi.json", headers={"authorization": "Bearer k3y"}).status_code == 200
        with pytest.raises(openai.AuthenticationError):
            client(server, "wrong").models.list()
        assert httpx.get(f"{base}/v1/models", auth=("me", "pw")).status_code == 401  # Bearer only
        assert [m.id for m in client(server, "k3y").models.list()] == ["ldm-builtin"]
        assert api(server, username="me", password="pw").get_scripts() == {"txt2img": [], "img2img": []}


def test_an_empty_authorization_header_is_none_without_credentials(server):
    assert httpx.get(f"{server.url}/sdapi/v1/options", headers={"authorization": ""}).status_code == 200


def test_other_sites_pages_and_hosts_are_refused(server):
    page = {"origin": "https://evil.example"}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x"}, headers=page)
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = httpx.get(f"{server.url}/sdapi/v1/options", headers={"host": "rebound.example"})
    assert r.status_code == 403  # DNS rebinding: a loopback server answers loopback names only
    with live(security=application.Security(cors=["https://ui.example"])) as allowed:
        r = httpx.get(f"{allowed.url}/sdapi/v1/options", headers={"origin": "https://ui.example"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://ui.example"


def test_a_body_past_the_limit_is_413(server, monkeypatch):
    from ldm_cli import limits

    monkeypatch.setattr(limits, "MAX_REQUEST_BYTES", 1000)
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x" * 2000})
    assert r.status_code == 413

    def chunks():
        yield b'{"prompt": "' + b"x" * 2000 + b'"}'
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_a_full_queue_is_503_with_retry_after():
    release = threading.Event()
    with live(queue=1) as server:
        server.workers.submit(lambda slot, job: release.wait(30))  # the worker busy
        while not server.workers.running:
            time.sleep(0.01)
        server.workers.submit(lambda slot, job: None)  # the queue full
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64})
        o = httpx.post(f"{server.url}/v1/images/generations", json={"prompt": "x"})
        release.set()
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert o.status_code == 503 and o.json()["error"]["message"].startswith("the queue is full")


# -- the command ----------------------------------------------------------------------------------
def test_serve_refuses_a_network_host_without_credentials(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"])
    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        "ldm: error: --host 0.0.0.0 would let anyone on the network render: give --api-key KEY or --api-auth "
        "USER:PASS with it"]


def test_serve_prints_its_url_and_sigterm_exits_0(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "ldm_cli", "serve", "--port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        line = process.stdout.readline()
        assert line.startswith("ldm serve: http://127.0.0.1:")
        url = line.split()[2]
        assert httpx.get(f"{url}/sdapi/v1/options").json()["sd_model_checkpoint"] == "ldm-builtin"
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        process.kill()
    assert "Traceback" not in process.stderr.read()


def test_sigterm_during_a_job_stops_it_and_exits_0(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "ldm_cli", "serve", "--port", "0"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    got = {}
    try:
        url = process.stdout.readline().split()[2]

        def long_job():
            got["r"] = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": "x", "width": 64, "height": 64,
                                                                   "steps": 5, "n_iter": 500}, timeout=120)
        thread = threading.Thread(target=long_job)
        thread.start()
        while not httpx.get(f"{url}/sdapi/v1/progress").json()["state"]["sampling_step"]:
            time.sleep(0.05)
        started = time.monotonic()
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        thread.join(30)
    finally:
        process.kill()
    assert time.monotonic() - started < 20  # the job was stopped, not waited for (500 images)
    assert got["r"].status_code == 200 and len(got["r"].json()["images"]) < 500


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
