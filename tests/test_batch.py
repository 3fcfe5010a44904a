"""`ldm batch` on a tiny model: shared batches equal `ldm generate`, the manifest, resuming,
contact sheets, img2img and inpaint lines, stopping cleanly, and two processes sharing a file."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ldm_cli import batch, commands, loading, pipeline
from ldm_cli.cli import app
from ldm_cli.manifest import Manifest
from ldm_cli.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = ("prompt", "negative", "steps", "cfg", "seed", "width", "height", "scheduler", "schedule",
            "model", "model_name", "model_hash")


# Subprocesses get one thread too (tests/conftest.py sets it for this process): tiny models gain
# nothing from more, and two threads on a shared 2-core machine crawl.
ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture
def run_batch(sd1_folder):
    def invoke(file, out, *args):
        result = CliRunner().invoke(app, ["batch", str(file), "--model", str(sd1_folder), "--out", str(out),
                                          "--steps", "2", *map(str, args)])
        return result
    return invoke


@pytest.fixture
def drawn(monkeypatch):
    """The size of every denoiser batch text-to-image renders."""
    sizes = []
    real = pipeline.text_to_image

    def counting(model, group, on_step=None):
        sizes.append(len(group))
        return real(model, group, on_step)
    monkeypatch.setattr(pipeline, "text_to_image", counting)
    return sizes


def records(out):
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def write(path, *lines):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_shared_batches_each_equal_generate(run_batch, drawn, tmp_path):
    file = write(tmp_path / "p.txt", "# header", "a red fox", "--prompt a blue bird --negative_prompt dark --n_iter 2 --seed 5",
                 "--prompt a green tree --steps 3", "a yellow house")
    result = run_batch(file, tmp_path / "out", "--batch-size", 4, "--json")
    assert result.exit_code == 0, result.output
    assert drawn == [4, 1]  # four prompts sharing size, steps, cfg and scheduler went in one batch
    rows = records(tmp_path / "out")
    assert sorted((r["line"], r["index"]) for r in rows) == [(2, 0), (3, 0), (3, 1), (4, 0), (5, 0)]
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == [str(tmp_path / "out" / r["path"]) for r in rows]
    for row in rows:
        assert all(row.get(k) is not None for k in SETTINGS)
        path = tmp_path / "out" / row["path"]
        assert json.loads(Image.open(path).text["ldm"]) == {k: v for k, v in row.items() if k not in ("path", "line", "index")}
        alone = Settings(**{k: row[k] for k in SETTINGS if k not in ("model_name", "model_hash")})
        [own] = commands.generate(alone, commands.RunOptions(out=tmp_path / "alone", quiet=True))
        assert np.abs(pixels(own.path) - pixels(path)).max() <= 2  # the project's parity bar
    bird = [r for r in rows if r["line"] == 3]
    assert [(r["seed"], r["negative"]) for r in bird] == [(5, "dark"), (6, "dark")]


def test_rerun_renders_only_what_is_missing(run_batch, drawn, tmp_path, monkeypatch):
    file = write(tmp_path / "p.txt", "a fox", "--prompt a bird --n_iter 3")
    out = tmp_path / "out"
    assert run_batch(file, out, "--batch-size", 4, "--quiet").exit_code == 0
    first = records(out)
    (out / first[0]["path"]).unlink()  # a deleted image
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in first[:-1]))  # an unrecorded one
    drawn.clear()
    assert run_batch(file, out, "--batch-size", 4, "--quiet").exit_code == 0
    assert drawn == [2]
    done = {(r["line"], r["index"]) for r in records(out) if (out / r["path"]).is_file()}
    assert done == {(1, 0), (2, 0), (2, 1), (2, 2)}

    with monkeypatch.context() as m:
        m.setattr(loading, "load", lambda *a, **k: pytest.fail("nothing to do, yet a model loaded"))
        assert run_batch(file, out, "--quiet").exit_code == 0
    drawn.clear()
    assert run_batch(file, out, "--cfg", 3, "--batch-size", 4, "--quiet").exit_code == 0  # other settings: other images
    assert drawn == [4]


def test_each_model_loads_once(run_batch, sd1_folder, tmp_path, monkeypatch):
    (tmp_path / "other").symlink_to(sd1_folder)  # another path: another model as far as batch knows
    loads = []
    real = loading.load
    monkeypatch.setattr(loading, "load", lambda source, options=None: loads.append(source) or real(source, options))
    file = write(tmp_path / "p.txt", "a fox", "--prompt a cat --model other", "a bird", "--prompt a dog --model other")
    assert run_batch(file, tmp_path / "out", "--quiet").exit_code == 0
    assert loads == [str(sd1_folder), str(tmp_path / "other")]
    assert {r["line"]: r["model"] for r in records(tmp_path / "out")} == {
        1: str(sd1_folder), 2: str(tmp_path / "other"), 3: str(sd1_folder), 4: str(tmp_path / "other")}


def test_a_bad_file_reports_every_line_and_loads_nothing(run_batch, tmp_path, monkeypatch):
    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("a model loaded for a bad file"))
    file = write(tmp_path / "p.txt", "a fox", "--prompt x --steps two", "--prompt y --unknown 1")
    result = run_batch(file, tmp_path / "out")
    assert result.exit_code == 2
    assert "2 bad lines" in result.output and "p.txt:2:" in result.output and "p.txt:3:" in result.output
    assert not (tmp_path / "out").exists()


def test_grid_per_line_kept_until_its_images_change(run_batch, tmp_path):
    file = write(tmp_path / "p.txt", "--prompt a fox --batch_size 2 --n_iter 2", "a single bird")
    out = tmp_path / "out"
    assert run_batch(file, out, "--grid", "--quiet").exit_code == 0
    sheet = out / "grids" / "p-00001.png"
    assert sorted(p.name for p in (out / "grids").iterdir()) == ["p-00001.png"]
    assert Image.open(sheet).size == (128, 128)
    top_left = [r for r in records(out) if (r["line"], r["index"]) == (1, 0)][0]
    assert np.array_equal(pixels(sheet)[:64, :64], pixels(out / top_left["path"]))
    written = sheet.stat().st_mtime_ns
    assert run_batch(file, out, "--grid", "--quiet").exit_code == 0
    assert sheet.stat().st_mtime_ns == written
    (out / top_left["path"]).unlink()
    assert run_batch(file, out, "--grid", "--quiet").exit_code == 0
    assert top_left["path"] not in json.loads(Image.open(sheet).info[batch.GRID_KEY])


def test_img2img_and_inpaint_lines_equal_their_commands(run_batch, tmp_path):
    image = Image.new("RGB", (64, 64), (240, 240, 240))
    image.paste((200, 30, 30), (8, 8, 40, 40))
    image.save(tmp_path / "init.png")
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 32))
    mask.save(tmp_path / "mask.png")
    file = write(tmp_path / "p.txt", "--prompt a blue square --init_image init.png --strength 0.5 --seed 3 --n_iter 2",
                 "--prompt a green square --init_image init.png --mask mask.png --seed 9")
    out = tmp_path / "out"
    assert run_batch(file, out, "--steps", 4, "--batch-size", 2, "--quiet").exit_code == 0
    rows = {(r["line"], r["index"]): r for r in records(out)}
    assert rows[(1, 0)]["strength"] == 0.5 and rows[(2, 0)]["mask_blur"] == 4 and len(rows[(1, 1)]["init_image_hash"]) == 10
    options = commands.RunOptions(out=tmp_path / "alone", quiet=True, num_images=2)
    base = Settings(prompt="a blue square", steps=4, strength=0.5, seed=3, model=rows[(1, 0)]["model"])
    own = list(commands.img2img(base, tmp_path / "init.png", options))
    options.num_images = 1
    base = Settings(prompt="a green square", steps=4, seed=9, model=rows[(1, 0)]["model"])
    own += commands.inpaint(base, tmp_path / "init.png", tmp_path / "mask.png", options)
    for result, key in zip(own, [(1, 0), (1, 1), (2, 0)]):
        assert result.settings.to_dict() == {k: v for k, v in rows[key].items()
                                             if k not in ("path", "line", "index", "init_image", "mask")}
        assert np.abs(pixels(result.path) - pixels(out / rows[key]["path"])).max() <= 2


def test_signals_during_a_save_wait_for_the_record():
    with pytest.raises(KeyboardInterrupt):
        with batch.signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            finished = True  # the held signals did not cut the block short
    assert finished
    with pytest.raises(KeyboardInterrupt), batch.stop_signals_interrupt():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_manifest_parts_merge_and_torn_lines(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"png")
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"path": "a.png", "line": 1, "index": 0, "seed": 1}) + "\n")
    part = Manifest(tmp_path, rank=1, world=2)
    part.add({"path": "c.png", "line": 3, "index": 0, "seed": 3})
    Manifest(tmp_path, rank=0, world=2).add({"path": "b.png", "line": 2, "index": 0, "seed": 2})
    with open(tmp_path / "manifest.part1.jsonl", "a") as f:
        f.write('{"path": "d.png", "li')  # torn by a power cut
    manifest = Manifest(tmp_path)
    assert manifest.find({"line": 3, "index": 0, "seed": 3}) and not manifest.find({"line": 3, "index": 0, "seed": 4})
    (tmp_path / "b.png").unlink()
    assert manifest.find({"line": 2, "index": 0}) is None  # recorded, but the image is gone
    manifest.merge()
    assert [r["path"] for r in records(tmp_path)] == ["a.png", "b.png", "c.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "c.png", "manifest.jsonl"]


def _wait_for_records(out: Path, count: int, process, limit_s: float = 120) -> None:
    end = time.monotonic() + limit_s
    while time.monotonic() < end and process.poll() is None:
        if (out / "manifest.jsonl").is_file() and len((out / "manifest.jsonl").read_text().splitlines()) >= count:
            return
        time.sleep(0.05)
    pytest.fail(f"the batch did not record {count} images (exit {process.poll()})")


def test_a_killed_run_leaves_whole_files_and_the_rerun_completes(run_batch, sd1_folder, tmp_path):
    file = write(tmp_path / "p.txt", "--prompt a fox --n_iter 40")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ldm_cli", "batch", str(file), "--model", str(sd1_folder), "--out", str(out),
               "--steps", "2", "--quiet"]
    process = subprocess.Popen(command, cwd=ROOT, env=ONE_THREAD, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _wait_for_records(out, 3, process)
    process.kill()
    process.wait()
    rows = records(out)  # every line is a whole record
    assert len(rows) < 40  # stopped midway
    pngs = sorted(p.name for p in out.glob("*.png"))
    for name in pngs:
        Image.open(out / name).load()  # whole files only
    assert {r["path"] for r in rows} <= set(pngs) and len(pngs) - len(rows) <= 1
    for part in out.glob(".ldm-*.part"):  # a killed process cannot remove its temporary file
        os.utime(part, (time.time() - 3600,) * 2)
    assert run_batch(file, out, "--quiet").exit_code == 0
    done = [(r["line"], r["index"]) for r in records(out)]
    assert sorted(done) == [(1, i) for i in range(40)]
    assert not list(out.glob(".ldm-*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_share_the_file(run_batch, sd1_folder, tmp_path):
    file = write(tmp_path / "p.txt", "--prompt a fox --n_iter 3 --seed 10", "a bird", "--prompt a tree --steps 3 --n_iter 2")
    out = tmp_path / "shared"
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                "--main_process_port", str(_free_port())]
    command = [*launcher, "-m", "ldm_cli", "batch", str(file), "--model", str(sd1_folder), "--out", str(out),
               "--steps", "2", "--device", "cpu", "--batch-size", "2"]
    done = subprocess.run(command, cwd=ROOT, env=ONE_THREAD, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "6 to render by 2 processes" in done.stderr
    rows = records(out)
    assert sorted((r["line"], r["index"]) for r in rows) == [(1, 0), (1, 1), (1, 2), (2, 0), (3, 0), (3, 1)]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["path"] for r in rows)
    assert not list(out.glob("manifest.part*"))
    assert len(done.stdout.splitlines()) == 6  # each image rendered once, by one process or the other

    assert run_batch(file, tmp_path / "alone", "--batch-size", 2, "--quiet").exit_code == 0
    alone = {(r["line"], r["index"]): r for r in records(tmp_path / "alone")}
    for row in rows:
        twin = alone[(row["line"], row["index"])]
        assert row["seed"] == twin["seed"]
        assert np.abs(pixels(out / row["path"]) - pixels(tmp_path / "alone" / twin["path"])).max() <= 2
