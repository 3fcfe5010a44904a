"""`ldm batch` on a tiny model: shared batches equal `ldm generate`, the manifest, resuming,
contact sheets, img2img and inpaint lines, stopping cleanly, two processes sharing a file, runs
sharing a folder, seeds that stay when -n grows, and threads on a shared CPU."""
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from ldm_cli import batch, claims, commands, loading, pipeline
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
        assert json.loads(Image.open(path).text["ldm"]) == {k: v for k, v in row.items() if k not in ("path", "line", "index", "base_seed")}
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
                                             if k not in ("path", "line", "index", "base_seed", "init_image", "mask")}
        assert np.abs(pixels(result.path) - pixels(out / rows[key]["path"])).max() <= 2


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


def test_raising_n_adds_images_and_keeps_the_first(run_batch, drawn, tmp_path):
    file = write(tmp_path / "p.txt", "a fox", "a bird")  # lines without --seed
    out = tmp_path / "out"
    assert run_batch(file, out, "-n", 1, "--quiet").exit_code == 0
    first = {r["line"]: r for r in records(out)}
    drawn.clear()
    assert run_batch(file, out, "-n", 2, "--quiet").exit_code == 0
    assert sum(drawn) == 2  # one new image per line
    for line, row in first.items():
        own = sorted((r for r in records(out) if r["line"] == line), key=lambda r: r["index"])
        assert own[0] == row  # the first image is the same file, with the same record
        assert [(r["seed"], r["base_seed"]) for r in own] == [(row["seed"], row["seed"]), (row["seed"] + 1, row["seed"])]


# -- runs sharing an output folder ----------------------------------------------------------------
def test_a_claim_is_held_once_and_goes_with_its_holder(tmp_path):
    image = {"line": 1, "index": 0, "seed": 5}
    first = claims.take(tmp_path, image)
    assert first and claims.take(tmp_path, image) is None  # even two opens in one process exclude each other
    assert claims.holder(tmp_path, image) == f"pid {os.getpid()} on {socket.gethostname()}"
    other = claims.take(tmp_path, {**image, "seed": 6})  # another image: another claim
    assert other
    other.release()
    got = []
    waiter = threading.Thread(target=lambda: got.append(claims.take(tmp_path, image, wait=True)))
    waiter.start()
    time.sleep(0.3)
    first.release()  # removes the file the waiter has locked
    waiter.join(10)
    assert got[0] and claims.take(tmp_path, image) is None  # the waiter holds the file now at the path
    got[0].release()
    assert not list(tmp_path.iterdir())

    hold = ("import json, sys, time; from pathlib import Path; from ldm_cli import claims; "
            "c = claims.take(Path(sys.argv[1]), json.loads(sys.argv[2])); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", hold, str(tmp_path), json.dumps(image)], cwd=ROOT,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        claims.remove_free(tmp_path)  # leaves a held claim alone
        assert claims.take(tmp_path, image) is None
    finally:
        holder.kill()
        holder.wait()
    assert claims.path_of(tmp_path, image).exists()  # the file a killed holder leaves...
    claims.remove_free(tmp_path)  # ...goes, as its claim went with the holder
    assert not list(tmp_path.iterdir())


def test_a_manifest_reads_other_writers_as_they_write(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        (tmp_path / name).write_bytes(b"png")
    mine = Manifest(tmp_path, rank=0, world=2)
    Manifest(tmp_path).add({"path": "a.png", "line": 1, "index": 0})  # another run, alone
    assert mine.find({"line": 1, "index": 0}) is None  # not until it reads again
    assert mine.count_new() == 1 and mine.find({"line": 1, "index": 0})
    mine.add({"path": "b.png", "line": 2, "index": 0})
    Manifest(tmp_path, rank=0, world=2).merge()  # the part, merged into manifest.jsonl, is read again
    assert mine.count_new() == 2 and not (tmp_path / "manifest.part0.jsonl").exists()
    with open(tmp_path / "manifest.jsonl", "a") as f:
        f.write('{"path": "c.png", ')  # a record being written
        f.flush()
        assert mine.count_new() == 2
        f.write('"line": 3, "index": 0}\n')
    assert mine.count_new() == 3 and mine.find({"line": 3, "index": 0})
    assert [r["path"] for r in records(tmp_path)] == ["a.png", "b.png", "c.png"]


def test_two_runs_into_one_folder_share_the_work(sd1_folder, tmp_path, monkeypatch):
    file = write(tmp_path / "p.txt", *[f"a fox number {i}" for i in range(10)])
    real = pipeline.text_to_image

    def slow(model, group, on_step=None):
        time.sleep(0.2)  # long enough for the other run to reach the same images
        return real(model, group, on_step)
    monkeypatch.setattr(pipeline, "text_to_image", slow)
    one_at_a_time, load = threading.Lock(), loading.load  # loading patches torch globally: not thread-safe

    def locked_load(*args, **kwargs):
        with one_at_a_time:
            return load(*args, **kwargs)
    monkeypatch.setattr(loading, "load", locked_load)
    batch.distributed_state("cpu")  # accelerate's state, made once before the threads share it
    out, made = tmp_path / "out", {}

    def run(name):
        options = commands.RunOptions(out=out, quiet=True)
        made[name] = [r.path for r in commands.batch(file, Settings(model=str(sd1_folder), steps=2), options)]
    threads = [threading.Thread(target=run, args=(name,)) for name in "ab"]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert made["a"] and made["b"] and not set(made["a"]) & set(made["b"])  # both worked, never on one image
    rows = records(out)
    assert sorted((r["line"], r["index"]) for r in rows) == [(i, 0) for i in range(1, 11)]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["path"] for r in rows)
    assert not list(out.glob(".ldm-claim-*"))


def test_a_run_waits_for_images_another_run_holds(run_batch, tmp_path):
    file = write(tmp_path / "p.txt", "a fox", "a bird", "a tree")
    assert run_batch(file, tmp_path / "alone", "--quiet").exit_code == 0
    rows = {r["line"]: r for r in records(tmp_path / "alone")}
    out = tmp_path / "out"
    out.mkdir()
    bird, tree = (claims.take(out, {k: v for k, v in rows[line].items() if k not in ("path", "base_seed")})
                  for line in (2, 3))  # another run is rendering these two

    def other_run_ends():
        while not (out / "manifest.jsonl").is_file():  # until this run has rendered the fox
            time.sleep(0.05)
        time.sleep(0.5)
        shutil.copy(tmp_path / "alone" / rows[2]["path"], out)
        Manifest(out).add(rows[2])  # it finishes the bird
        bird.release()
        tree.release()  # and stops before the tree
    threading.Thread(target=other_run_ends).start()
    result = run_batch(file, out)
    assert result.exit_code == 0, result.output
    assert f"waiting for pid {os.getpid()}" in result.output
    done = {r["line"]: r["path"] for r in records(out)}
    assert sorted(done) == [1, 2, 3] and done[2] == rows[2]["path"]  # the bird was not rendered again
    assert len(list(out.glob("*.png"))) == 3


def test_two_commands_into_one_folder_render_each_image_once(sd1_folder, tmp_path):
    file = write(tmp_path / "p.txt", *[f"a fox number {i}" for i in range(10)])
    command = [sys.executable, "-m", "ldm_cli", "batch", str(file), "--model", str(sd1_folder),
               "--out", str(tmp_path / "out"), "--steps", "2", "--quiet", "--json"]
    runs = [subprocess.Popen(command, cwd=ROOT, env=ONE_THREAD, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True) for _ in range(2)]
    outputs = [run.communicate(timeout=300) for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs
    rows = records(tmp_path / "out")
    assert sorted((r["line"], r["index"]) for r in rows) == [(i, 0) for i in range(1, 11)]
    assert len(list((tmp_path / "out").glob("*.png"))) == 10
    assert sum(len(stdout.splitlines()) for stdout, _ in outputs) == 10


# -- a shared CPU ---------------------------------------------------------------------------------
def _thread_settings(**env) -> list[str]:
    """OMP_NUM_THREADS and OMP_WAIT_POLICY as ldm leaves them, in a process started with `env`."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    show = "import os, ldm_cli; print(os.environ['OMP_NUM_THREADS'], os.environ.get('OMP_WAIT_POLICY'))"
    done = subprocess.run([sys.executable, "-c", show], cwd=ROOT, env={**base, **env}, capture_output=True, text=True)
    return done.stdout.split()


def test_threads_sleep_when_idle_and_share_the_cores_among_processes():
    cores = len(os.sched_getaffinity(0))
    assert _thread_settings() == [str(cores), "PASSIVE"]  # no spinning for a core a neighbour holds
    assert _thread_settings(LOCAL_WORLD_SIZE="2") == [str(max(1, cores // 2)), "PASSIVE"]  # each process its share
    assert _thread_settings(OMP_NUM_THREADS="3", OMP_WAIT_POLICY="ACTIVE") == ["3", "ACTIVE"]  # the user's own win
    assert _thread_settings(GOMP_SPINCOUNT="300000") == [str(cores), "None"]  # libgomp's own default wait


def _threads_after_loads(**env) -> list[int]:
    """torch's thread count once the built-in model is loaded, then once it is loaded again as if
    it were a real model (device.ONE_THREAD_BELOW 0), in one process started with `env` (ldm
    serve loads one model after another)."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    code = ("import torch, ldm_cli\nfrom ldm_cli import device, loading\n"
            "loading.load(None)\nprint(torch.get_num_threads())\n"
            "device.ONE_THREAD_BELOW = 0\nloading.load(None)\nprint(torch.get_num_threads())")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env={**base, "HF_HUB_OFFLINE": "1", **env},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return [int(n) for n in done.stdout.split()[-2:]]


def test_a_tiny_denoiser_runs_on_one_thread_a_real_one_on_the_processs_share():
    """Waking a second thread costs a 1.5M-parameter model more than it saves (device.fit_threads)."""
    cores = len(os.sched_getaffinity(0))
    assert _threads_after_loads() == [1, cores]  # the next, real model gets every core it may use again
    assert _threads_after_loads(OMP_NUM_THREADS="2") == [2, 2]  # the user's count wins
