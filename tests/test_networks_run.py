"""LoRAs and embeddings in a run: names found in folders, A1111's hashes in the PNG, --from-png
finding them again, `ldm batch` switching sets without reloading, and every user error one
line before anything renders."""
import hashlib
import math
import os
import re
import subprocess
import sys
import time
import json

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from ldm_cli import loading, pipeline
from ldm_cli.cli import app
from ldm_cli.errors import LdmError
from ldm_cli.networks import hashes, lookup, merge, session, tags
from ldm_cli.networks.lookup import NetworkOptions
from ldm_cli.settings import Settings
from tests import lora_files, tiny_models
from tests.fifos import unblocking_fifo

UNET = ("attn1.to_q", "attn2.to_k", "attn2.to_v", "resnets.0.conv1")


@pytest.fixture
def model_dir(sd1_folder, tmp_path):
    """The tiny SD1 model seen from tmp_path (its default `loras` folder is tmp_path/loras)."""
    (tmp_path / "model").symlink_to(sd1_folder)
    return tmp_path / "model"


def sd1_lora(path, seed=0, scale=1.0):
    unet = tiny_models.unet()
    chosen = lora_files.layers(unet, UNET)
    return lora_files.write(path, {k: v * scale for k, v in lora_files.kohya(chosen, "lora_unet_", seed=seed).items()})


def run(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_names_are_file_stems_found_recursively_first_folder_first(tmp_path, monkeypatch):
    for folder in ("flag", "beside/loras/deep", "env"):
        (tmp_path / folder).mkdir(parents=True)
    for path in ("flag/a.safetensors", "beside/loras/deep/a.safetensors", "beside/loras/deep/b.pt", "env/c.safetensors"):
        (tmp_path / path).write_bytes(b"x")
    monkeypatch.setenv(lookup.LORA_ENV, str(tmp_path / "env"))
    options = NetworkOptions(lora_dirs=[str(tmp_path / "flag")], lora_files=[str(tmp_path / "elsewhere/z.safetensors:0.5")])
    model = str(tmp_path / "beside" / "model.safetensors")
    assert lookup.find_lora("a", options, model) == tmp_path / "flag/a.safetensors"
    assert lookup.find_lora("b", options, model) == tmp_path / "beside/loras/deep/b.pt"
    assert lookup.find_lora("c", options, model) == tmp_path / "env/c.safetensors"
    with pytest.raises(LdmError, match=r"'cc' not found in .*flag.*beside/loras.*env \(did you mean 'c'\?\)"):
        lookup.find_lora("cc", options, model)
    with pytest.raises(LdmError, match="--lora .*z.safetensors'.*no such file"):
        lookup.find_lora("z", options, model)


def test_a_lora_is_found_by_its_trainers_output_name_as_a1111_aliases_it(model_dir, tmp_path):
    """kohya writes `ss_output_name`; A1111 knows the file by it too (`fox_v2-000010.safetensors`
    as `fox_v2`), unless another file claims the same alias. Stems come first; the hash is
    recorded under the name the prompt used, as A1111 records it."""
    folder = tmp_path / "loras"
    unet = lora_files.kohya(lora_files.layers(tiny_models.unet(), UNET), "lora_unet_")
    epoch = lora_files.write(folder / "fox_v2-000010.safetensors", unet, {"ss_output_name": "fox_v2"})
    lora_files.write(folder / "snow-a.safetensors", unet, {"ss_output_name": "snow"})
    lora_files.write(folder / "snow-b.safetensors", unet, {"ss_output_name": "snow"})
    stem = lora_files.write(folder / "cat.safetensors", unet)
    lora_files.write(folder / "other.safetensors", unet, {"ss_output_name": "cat"})
    options = NetworkOptions(lora_dirs=[str(folder)])
    assert lookup.find_lora("fox_v2", options, None) == epoch
    assert lookup.find_lora("cat", options, None) == stem  # a stem wins over another file's alias
    with pytest.raises(LdmError, match="'snow' not found"):  # two files claim it: neither is meant
        lookup.find_lora("snow", options, None)
    result = run("generate", "a red fox <lora:fox_v2:0.8>", "--model", model_dir, "--steps", 1, "--seed", 3,
                 "--lora-dir", folder, "--json", "--out", tmp_path / "a")
    assert result.exit_code == 0, result.output
    text = Image.open(json.loads(result.stdout)["path"]).text["parameters"]
    assert f'Lora hashes: "fox_v2: {hashes.lora_hash(epoch)}"' in text


def test_tags_and_the_lora_flag_as_a1111_reads_them():
    assert tags.lora_tags("a <lora:fox:0.8>, <lyco:snow:0.5:1.5> <lora:x> <lora:y:unet=0.3> <hypernet:h:1>") == [
        tags.LoraTag("fox", 0.8, 0.8), tags.LoraTag("snow", 0.5, 1.5), tags.LoraTag("x"), tags.LoraTag("y", 1, 0.3)]
    with pytest.raises(LdmError, match="'abc' is not a number"):
        tags.lora_tags("<lora:fox:abc>")
    assert tags.parse_flag("C:\\loras\\fox.safetensors")[1] == 1.0
    assert tags.with_flag_loras("a fox", ["/l/fox.safetensors:0.75", "/l/snow.safetensors"]) == \
        "a fox<lora:fox:0.75><lora:snow:1>"
    assert tags.with_flag_loras("a <lora:fox:0.3>", ["/l/fox.safetensors:0.75"]) == "a <lora:fox:0.3>"


def test_hashes_are_a1111s(tmp_path):
    path = sd1_lora(tmp_path / "fox.safetensors")
    data = path.read_bytes()
    body = data[8 + int.from_bytes(data[:8], "little"):]
    assert hashes.lora_hash(path) == hashlib.sha256(body).hexdigest()[:12]  # the header left out
    assert hashes.embedding_hash(path) == hashlib.sha256(data).hexdigest()[:12]
    tagged = lora_files.write(tmp_path / "t.safetensors", {"lora_unet_x.lora_down.weight": torch.zeros(1, 2)},
                              {"sshs_model_hash": "abcdef0123456789"})
    assert hashes.lora_hash(tagged) == "abcdef012345"  # what kohya's trainer recorded wins, as in A1111
    recorded = hashes.record([("a:b,c", "111111111111"), ("d", "222222222222")])
    assert recorded == "abc: 111111111111, d: 222222222222"
    assert hashes.parse(recorded) == {"abc": "111111111111", "d": "222222222222"}


def test_generate_records_the_lora_and_from_png_finds_it_again(model_dir, tmp_path):
    fox = sd1_lora(tmp_path / "loras" / "animals" / "fox.safetensors")
    base = ("--model", model_dir, "--steps", 2, "--seed", 3, "--json")
    tagged = run("generate", "a red fox <lora:fox:0.8>", *base, "--out", tmp_path / "a")
    flagged = run("generate", "a red fox", "--lora", f"{fox}:0.8", *base, "--out", tmp_path / "b")
    plain = run("generate", "a red fox", *base, "--out", tmp_path / "c")
    assert tagged.exit_code == flagged.exit_code == plain.exit_code == 0, tagged.output + flagged.output
    a, b, c = (json.loads(r.stdout)["path"] for r in (tagged, flagged, plain))
    text = Image.open(a).text["parameters"]
    assert text.startswith("a red fox <lora:fox:0.8>\n")
    assert f'Lora hashes: "fox: {hashes.lora_hash(fox)}", Version' in text
    assert Image.open(b).text["parameters"].startswith("a red fox<lora:fox:0.8>\n")
    assert np.array_equal(pixels(a), pixels(b))  # the tag is not text the encoder reads
    assert np.abs(pixels(a) - pixels(c)).max() > 20
    sd1_lora(fox, seed=1)  # the file changed since
    again = run("generate", "--from-png", a, "--out", tmp_path / "d", "--json")
    assert again.exit_code == 0, again.output
    assert "warning: the LoRA 'fox'" in again.output and hashes.lora_hash(fox) in again.output


def test_user_errors_are_one_line_and_render_nothing(model_dir, tmp_path):
    xl = tiny_models.unet(64, sdxl=True)
    lora_files.write(tmp_path / "loras" / "xl.safetensors",
                     lora_files.kohya(lora_files.layers(xl, ("attn2.to_k",)), "lora_unet_"))
    (tmp_path / "notes.txt").write_text("not a lora")
    for args, message in ((["a <lora:nope:1>"], "LoRA 'nope' not found"),
                          (["a <lora:xl:1>"], "made for another model family"),
                          (["a", "--lora", tmp_path / "notes.txt"], "it is not a LoRA"),
                          (["a", "--lora-dir", tmp_path / "missing"], "--lora-dir .* is not a folder"),
                          (["a <lora:xl:1e30>"], r"<lora:xl:1e30>: a LoRA's weight must be between -20 and 20 \(got 1e\+30\)"),
                          (["a <lora:xl:1:unet=-21>"], r"between -20 and 20 \(got -21\)"),
                          (["a", "--lora", f"{tmp_path / 'loras' / 'xl.safetensors'}:1e30"],
                           r"--lora .*xl.safetensors:1e30': a LoRA's weight must be between -20 and 20")):
        result = run("generate", *args, "--model", model_dir, "--steps", 1, "--out", tmp_path / "out")
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.startswith("ldm: error:")]
        assert len(lines) == 1 and __import__("re").search(message, lines[0]), result.output
    assert not (tmp_path / "out").exists()


def test_batch_groups_lines_by_lora_set_and_restores_between(model_dir, tmp_path, monkeypatch):
    sd1_lora(tmp_path / "loras" / "a.safetensors", seed=1)
    sd1_lora(tmp_path / "loras" / "b.safetensors", seed=2)
    file = tmp_path / "p.txt"
    file.write_text("a fox <lora:a:1>\na cat\na dog <lora:b:0.5>\na bird <lora:a:1>\n")
    drawn, merges, loads = [], [], []
    real_draw, real_merge, real_load = pipeline.text_to_image, merge.Merger.merge, loading.load
    monkeypatch.setattr(pipeline, "text_to_image", lambda m, g, on_step=None: drawn.append(
        [s.prompt for s in g]) or real_draw(m, g, on_step))
    monkeypatch.setattr(merge.Merger, "merge", lambda self, c, p: merges.append(len(p)) or real_merge(self, c, p))
    monkeypatch.setattr(loading, "load", lambda *a, **k: loads.append(a[0]) or real_load(*a, **k))
    result = run("batch", file, "--model", model_dir, "--steps", 2, "--batch-size", 4, "--out", tmp_path / "out",
                 "--json", "--quiet")
    assert result.exit_code == 0, result.output
    assert drawn == [["a fox <lora:a:1>", "a bird <lora:a:1>"], ["a cat"], ["a dog <lora:b:0.5>"]]
    assert len(merges) == 2 and len(loads) == 1  # a, then b: switching sets reloads nothing
    for row in map(json.loads, result.stdout.splitlines()):
        alone = run("generate", row["prompt"], "--model", model_dir, "--steps", 2, "--seed", row["seed"],
                    "--out", tmp_path / "alone", "--json")
        assert np.abs(pixels(json.loads(alone.stdout)["path"]) - pixels(row["path"])).max() <= 2  # batched: rounding


def test_batch_checks_every_line_before_loading(model_dir, tmp_path, monkeypatch):
    sd1_lora(tmp_path / "loras" / "a.safetensors")
    file = tmp_path / "p.txt"
    file.write_text("a fox <lora:a:1>\n--prompt \"a cat <lora:missing:1>\"\na dog <lora:a:x>\n")
    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("a model loaded for a bad file"))
    result = run("batch", file, "--model", model_dir, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "p.txt:2: LoRA 'missing' not found" in result.output and "p.txt:3: <lora:a:x>" in result.output
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("change, words", [
    ({"alpha": math.nan}, r"nan.safetensors is not a usable LoRA: lora_unet_\w+\.alpha is nan, not a finite number"),
    ({"poison": True}, r"nan.safetensors is not a usable LoRA: its layer lora_unet_\w+ holds NaN or inf values"),
    ({"alpha": 1e38, "scale": 100}, r"merging nan.safetensors \(scale 2\.5e\+37\) into \S+ overflows its float32 weight"),
])
def test_a_lora_that_would_make_nan_weights_is_refused(model_dir, tmp_path, change, words):
    """NaN in a LoRA (or a sum past the dtype's range) would render black: one line, no PNG."""
    tensors = {k: v * change.get("scale", 1) for k, v in
               lora_files.kohya(lora_files.layers(tiny_models.unet(), UNET), "lora_unet_").items()}
    if "alpha" in change:
        tensors.update({k.replace("lora_down.weight", "alpha"): torch.tensor(change["alpha"]) for k in list(tensors)
                        if k.endswith("lora_down.weight")})
    if change.get("poison"):
        tensors[next(k for k in tensors if k.endswith("lora_up.weight"))][0, 0] = math.nan
    lora_files.write(tmp_path / "loras" / "nan.safetensors", tensors)
    result = run("generate", "a fox <lora:nan:1>", "--model", model_dir, "--steps", 1, "--out", tmp_path / "out")
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and re.search("^ldm: error: " + words, result.stderr), result.stderr
    assert "Traceback" not in result.output and not (tmp_path / "out").exists()


def test_a_failed_merge_restores_every_weight(sd1_folder, tmp_path):
    from ldm_cli.networks import formats, targets

    model = loading.load(str(sd1_folder))
    components, table = targets.components(model), targets.table(model)
    tensors = lora_files.kohya(lora_files.layers(model.denoiser, UNET), "lora_unet_")
    clean = lora_files.write(tmp_path / "clean.safetensors", tensors)
    last = list(merge.plan(components, table, [merge.Applied(formats.open_lora(clean, False))]).values())[-1][0].layer
    tensors[f"{last}.lora_up.weight"][0, 0] = math.inf  # every other layer is merged before it
    late = lora_files.write(tmp_path / "late.safetensors", tensors)
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    merger = merge.Merger()
    with pytest.raises(LdmError, match=f"late.safetensors is not a usable LoRA: its layer {last} holds NaN or inf"):
        merger.merge(components, merge.plan(components, table, [merge.Applied(formats.open_lora(late, False))]))
    assert all(torch.equal(before[k], v) for k, v in model.denoiser.state_dict().items())
    assert not merger.originals


@pytest.fixture
def unblocked_fifo(tmp_path):
    """A FIFO named pipe.safetensors in tmp_path/loras; should a read of it block, a writer comes
    after 60 s, so a test fails rather than hangs."""
    with unblocking_fifo(tmp_path / "loras" / "pipe.safetensors") as path:
        yield path


def test_the_alias_lookup_opens_no_fifo_and_walks_no_link_to_a_folder_above(unblocked_fifo, tmp_path):
    """kohya's output name is read from every file's header: a FIFO among them blocked forever,
    and a link to / walked the whole machine (and reached its FIFOs)."""
    folder = unblocked_fifo.parent
    epoch = sd1_lora(folder / "deep" / "fox_v2-000010.safetensors")
    lora_files.write(epoch, lora_files.kohya(lora_files.layers(tiny_models.unet(), UNET), "lora_unet_"),
                     {"ss_output_name": "fox_v2"})
    for name, target in (("root", "/"), ("up", tmp_path), ("loop", folder)):
        (folder / "deep" / name).symlink_to(target)
    (tmp_path / "above.safetensors").write_bytes(b"x")
    options = NetworkOptions(lora_dirs=[str(folder)])
    start = time.monotonic()
    assert lookup.find_lora("fox_v2", options, None) == epoch
    assert time.monotonic() - start < 20
    assert "above" not in lookup.index((folder,))  # under the link to tmp_path: not walked
    with pytest.raises(LdmError, match="pipe.safetensors' is a FIFO"):
        lookup.check_loras(Settings(prompt="a <lora:pipe:1>"), options)


def test_an_embeddings_folder_linking_to_root_does_not_hang_the_run(model_dir, tmp_path):
    (tmp_path / "emb").mkdir()
    (tmp_path / "emb" / "root").symlink_to("/")
    os.mkfifo(tmp_path / "emb" / "pipe.safetensors")
    command = [sys.executable, "-m", "ldm_cli", "generate", "a pipe fox", "--model", str(model_dir), "--steps", "1",
               "--embeddings-dir", str(tmp_path / "emb"), "--out", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)  # killed, not hung, on failure
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("ldm: error: ") and "pipe.safetensors' is a FIFO" in result.stderr
    assert result.stderr.count("\n") == 1
