"""A run's prompts are encoded before its first image is denoised, then its text encoders are
freed (ahead.py): the same images, each prompt encoded once, the encoders' memory given back,
and what bounds the encoding ahead (LoRA sets, the memory budget)."""
import dataclasses
import weakref

import numpy as np
import pytest
from PIL import Image

from ldm_cli import ahead, conditioning, loading, pipeline, render
from ldm_cli.loading import LoadOptions
from ldm_cli.networks import session
from ldm_cli.networks.lookup import NetworkOptions
from ldm_cli.progress import Progress
from ldm_cli.settings import Settings
from tests import lora_files

PROMPTS = ["a red fox in snow", "a cat", "a red fox in snow", "a lighthouse at dusk"]


def load(folder, **options):
    return loading.load(str(folder), LoadOptions(device="cpu", **options))


def jobs(model, prompts=PROMPTS, **kw) -> list[Settings]:
    base = dict(steps=2, seed=7, width=64, height=64, negative="blurry")
    return [Settings(prompt=p, **{**base, **kw}).resolve(model.defaults, model.native_size).merged(seed=7 + i)
            for i, p in enumerate(prompts)]


def watched(model, events: list) -> None:
    """Record each family.encode (its texts) and each denoiser call, in order."""
    family = model.family

    def encode(m, texts, s, negative):
        events.append(("encode", tuple(texts)))
        return family.encode(m, texts, s, negative)

    def predict(m, latents, t, cond, **kw):
        events.append(("predict",))
        return family.predict(m, latents, t, cond, **kw)

    model.family = dataclasses.replace(family, encode=encode, predict=predict)


def rendered(model, group_jobs, folder, batch_size=1) -> list[np.ndarray]:
    with Progress(1, 1, quiet=True) as progress:
        results = list(render.render(model, group_jobs, batch_size, folder, progress))
    return [np.asarray(Image.open(r.path).convert("RGB")) for r in results]


def alone(folder, group_jobs, **options) -> list[np.ndarray]:
    """Each image drawn by a model of its own, without planning ahead."""
    return [np.asarray(pipeline.text_to_image(load(folder, **options), [s])[0]) for s in group_jobs]


@pytest.mark.parametrize("name", ["sd1_folder", "sdxl_folder", "sd3_folder", "flux_dev_folder"])
def test_encoding_fields_name_everything_a_family_reads(request, name):
    """The cache key (ENCODING_FIELDS) must hold every setting an encoder reads, or two prompts
    encoded alike under different settings would share a conditioning."""
    model = load(request.getfixturevalue(name))
    read = set()

    class Spy:
        def __getattr__(self, field):
            read.add(field)
            return getattr(s, field)

    s = jobs(model, ["a fox"], clip_skip=2, cfg=3.0)[0]
    for negative in (False, True):
        model.family.encode(model, ["a fox"], Spy(), negative)
    assert read and read <= set(conditioning.ENCODING_FIELDS)


@pytest.mark.parametrize("offload", ["none", "model"])
def test_a_run_encodes_every_prompt_first_then_frees_the_text_encoders(flux_dev_folder, tmp_path, offload):
    model = load(flux_dev_folder, offload=offload)
    encoders = [weakref.ref(e) for e in model.text_encoders]
    events: list = []
    watched(model, events)
    planned = jobs(model, cfg=2.0)  # real CFG: the negative is encoded too
    images = rendered(model, planned, tmp_path)
    first_step = events.index(("predict",))
    assert all(e[0] == "encode" for e in events[:first_step]) and ("encode",) not in [e[:1] for e in events[first_step:]]
    texts = [text for e in events[:first_step] for text in e[1]]
    assert sorted(texts) == sorted({*PROMPTS, "blurry"})  # each once, the shared prompt too
    assert model.text_encoders == [] and all(ref() is None for ref in encoders)
    assert all(np.array_equal(a, b) for a, b in zip(images, alone(flux_dev_folder, planned, offload=offload)))


def test_the_budget_splits_the_encoding_and_frees_after_the_last(sd1_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(ahead, "BUDGET", 1)  # one batch's prompts at a time
    model = load(sd1_folder)
    events: list = []
    watched(model, events)
    planned = jobs(model)
    alive = []
    real_free = ahead.memory.free_text_encoders
    monkeypatch.setattr(ahead.memory, "free_text_encoders",
                        lambda m: alive.append(sum(e[0] == "predict" for e in events)) or real_free(m))
    images = rendered(model, planned, tmp_path)
    encodes = [i for i, e in enumerate(events) if e[0] == "encode"]
    assert encodes[-1] > events.index(("predict",))  # encoded as the batches came
    assert alive == [3 * 2]  # freed before the last batch: 3 batches x 2 steps (one call for both CFG halves)
    assert model.text_encoders == []
    assert all(np.array_equal(a, b) for a, b in zip(images, alone(sd1_folder, planned)))


def test_text_encoder_loras_bound_the_encoding_and_are_let_go(sd1_folder, tmp_path):
    """A LoRA of the text encoders changes what they compute: its lines are encoded apart. One of
    the denoiser alone changes nothing there: its lines and plain ones share one stretch, and
    their shared prompts one encoding."""
    model = load(sd1_folder)
    text = lora_files.layers(model.text_encoders[0], ("self_attn.q_proj", "self_attn.v_proj", "mlp.fc1"))
    lora_files.write(tmp_path / "loras" / "te.safetensors", lora_files.kohya(text, "lora_te_", seed=1))
    unet = lora_files.layers(model.denoiser, ("attn2.to_k", "attn2.to_v"))
    lora_files.write(tmp_path / "loras" / "unet.safetensors", lora_files.kohya(unet, "lora_unet_", seed=2))
    options = NetworkOptions(lora_dirs=[tmp_path / "loras"])
    session.attach(model, options, None)
    events: list = []
    watched(model, events)
    planned = jobs(model, ["a fox <lora:te:1>", "a cat <lora:te:1>", "a fox <lora:unet:1>", "a fox"])
    encoders = [weakref.ref(e) for e in model.text_encoders]
    images = rendered(model, planned, tmp_path / "out")
    encoded = [e[1] for e in events if e[0] == "encode"]
    # te's two lines and their negative first; then "a fox" and "blurry" once for the other two
    assert [e[0] for e in events[:3]] == ["encode"] * 3 and events[3] == ("predict",)
    assert len(encoded) == 5 and encoded[3:] == [("a fox",), ("blurry",)]
    assert model.text_encoders == [] and all(ref() is None for ref in encoders)  # merged layers' originals too
    for s, image in zip(planned, images):
        fresh = load(sd1_folder)
        session.attach(fresh, options, None)
        assert np.array_equal(image, np.asarray(pipeline.text_to_image(fresh, [s])[0]))


def test_the_budget_counts_each_tensor_storage_once():
    """A schedule's rows are views of their encode call's batch: it is held once, whatever the rows."""
    import torch

    from ldm_cli.guidance import Schedule, rows_of

    held = ahead._Held()
    batch = torch.zeros(3, 77, 8)
    first, second, _ = rows_of({"encoder_hidden_states": batch})
    held[("a",)], held[("b",)] = Schedule.fixed(first), Schedule.fixed(second)
    assert held.bytes == batch.nbytes
    held[("c",)] = Schedule.fixed({"encoder_hidden_states": torch.zeros(1, 77, 8)})
    assert held.bytes == batch.nbytes + 77 * 8 * 4
    held.clear()
    assert held.bytes == 0 and not held


def test_a_long_file_saves_its_first_image_before_encoding_every_line(sd1_folder, tmp_path, monkeypatch):
    """Stretches are bounded by a count too: a 20,000-line file's first image does not wait for
    20,000 encodings (nor does a kill then lose them all)."""
    from ldm_cli import commands

    encoded = []
    real = conditioning.encode
    monkeypatch.setattr(conditioning, "encode", lambda model, group, cache=None: encoded.extend(
        s.prompt for s in group) or real(model, group, cache))
    file = tmp_path / "long.txt"
    file.write_text("".join(f"a fox number {i}\n" for i in range(20_000)))
    options = commands.RunOptions(out=tmp_path / "out", quiet=True)
    run = commands.batch(file, Settings(model=str(sd1_folder), steps=1), options)
    first = next(run)
    run.close()
    assert first.path.is_file() and first.settings.prompt == "a fox number 0"
    assert len(set(encoded)) == ahead.FIRST_STRETCH  # the first stretch only


def test_the_first_batch_is_encoded_while_the_denoiser_loads_and_draws_the_same_images(sd1_folder, tmp_path,
                                                                                       monkeypatch):
    """A plain run from a single file encodes its first batch's prompts once the text encoder's
    weights are in, while the UNet's are still read (commands._encode_early): each prompt is still
    encoded once, and the images are those of a run that encodes after the load."""
    import torch

    from ldm_cli import commands
    from tests import original_layout

    path = original_layout.write(sd1_folder, tmp_path / "m.safetensors", "sd1",
                                 metadata=original_layout.ldm_metadata(sd1_folder, "sd1"))
    settings = Settings(prompt="a red fox in snow", negative="blurry", steps=2, seed=7, width=64, height=64,
                        model=str(path))
    options = commands.RunOptions(num_images=3, batch_size=2, quiet=True)
    during: list[bool] = []
    encode_first = render.encode_first

    def watched_first(s, model, count, batch_size):
        during.append(next(model.denoiser.parameters()).is_meta)  # the UNet not read yet
        encode_first(s, model, count, batch_size)
        assert model.prepared  # what render will ask for first

    calls: list[str] = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: calls.append("clip") if type(module).__name__ == "CLIPTextModel" else None)
    try:
        monkeypatch.setattr(render, "encode_first", watched_first)
        early = [np.asarray(Image.open(r.path)) for r in commands.generate(settings, dataclasses.replace(
            options, out=tmp_path / "early"))]
        early_calls, calls[:] = len(calls), []
        monkeypatch.setattr(commands, "_encodes_early", lambda *a: False)
        after = [np.asarray(Image.open(r.path)) for r in commands.generate(settings, dataclasses.replace(
            options, out=tmp_path / "after"))]
    finally:
        hook.remove()
    assert during == [True]
    assert early_calls == len(calls) == 2  # the prompt and the negative, once each, for all three images
    assert all(np.array_equal(a, b) for a, b in zip(early, after, strict=True))


@pytest.mark.parametrize("change", [dict(prompt="a fox <lora:x:1>"), dict(negative="<lora:x:1>"),
                                    dict(edit_images="a.png"), dict(hires_scale=2.0), dict(refiner="r.safetensors"),
                                    "vae", "offload", "weights", "compile", "controlnet"])
def test_what_is_set_up_after_the_load_keeps_the_encoding_after_it(change):
    from ldm_cli import commands

    settings = Settings(**{"prompt": "a fox", **(change if isinstance(change, dict) else {})})
    load = LoadOptions(vae="v.safetensors" if change == "vae" else None, offload="model" if change == "offload" else "none",
                       weights="fp8" if change == "weights" else None, compile=change == "compile")
    options = commands.RunOptions(load=load)
    assert commands._encodes_early(Settings(prompt="a fox"), commands.RunOptions(), []) is True
    assert commands._encodes_early(settings, options, ["unit"] if change == "controlnet" else []) is False
