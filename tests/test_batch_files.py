"""What `ldm batch` (and every command) writes in an output folder, when the folder is not as ldm
left it: links planted under its files' names, a torn or edited manifest, a broken hash cache,
a full or read-only disk, an --out that leads nowhere, a line's file that is a device, an error
mid-run. Each is one line `ldm: error: ...`, exit 2, with what was saved kept and recorded."""
import errno
import json
import os
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from ldm_cli import claims, hashing, loading, manifest, pipeline
from ldm_cli.cli import app
from ldm_cli.errors import LdmError
from ldm_cli.manifest import Manifest


@pytest.fixture
def run(sd1_folder):
    def invoke(command, *args):
        result = CliRunner().invoke(app, [command, *map(str, args), "--model", str(sd1_folder), "--steps", "1",
                                          "--quiet"])
        assert "Traceback" not in result.output
        assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
        return result
    return invoke


def errors(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def one_line(result, *words: str) -> str:
    """The run failed with exit 2 and one line naming `words`."""
    assert result.exit_code == 2, result.output
    [line] = errors(result)
    assert line.startswith("ldm: error: ") and all(w in line for w in words), line
    return line


def write(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def records(out: Path) -> list[dict]:
    """The manifest's records, torn lines left out."""
    return manifest.parse((out / "manifest.jsonl").read_bytes())


@pytest.fixture
def drawn(monkeypatch):
    """The prompts of every text-to-image batch drawn."""
    prompts = []
    real = pipeline.text_to_image
    monkeypatch.setattr(pipeline, "text_to_image",
                        lambda model, group, on_step=None: prompts.extend(s.prompt for s in group) or real(model, group, on_step))
    return prompts


@pytest.fixture
def no_load(monkeypatch):
    monkeypatch.setattr(loading, "load", lambda *a, **k: pytest.fail("a model loaded"))


# -- links planted in the output folder ------------------------------------------------------------
def test_a_claim_file_that_is_a_link_is_refused_never_written_through(run, tmp_path, no_load):
    victim = write(tmp_path / "victim.txt", "precious")
    out = tmp_path / "out"
    out.mkdir()
    identity = {"line": 1, "index": 0}
    claims.path_of(out, identity).symlink_to(victim)
    with pytest.raises(LdmError, match="symbolic link"):
        claims.take(out, identity)
    assert claims.holder(out, identity) == "another process"
    result = run("batch", write(tmp_path / "p.txt", "a fox"), "--out", out)  # the leftover sweep meets it first
    one_line(result, ".ldm-claim-", "symbolic link")
    assert victim.read_text() == "precious\n" and not list(out.glob("*.png"))


@pytest.mark.parametrize("kind", ["link", "folder", "fifo"])
def test_a_manifest_that_is_not_a_file_is_one_line_before_rendering(run, tmp_path, no_load, kind):
    victim = write(tmp_path / "victim.jsonl", "precious")
    out = tmp_path / "out"
    out.mkdir()
    manifest = out / "manifest.jsonl"
    {"link": lambda: manifest.symlink_to(victim), "folder": manifest.mkdir, "fifo": lambda: os.mkfifo(manifest)}[kind]()
    one_line(run("batch", write(tmp_path / "p.txt", "a fox"), "--out", out), "manifest.jsonl")
    assert victim.read_text() == "precious\n" and not list(out.glob("*.png"))


def test_a_part_that_is_a_link_is_refused(tmp_path):
    victim = write(tmp_path / "victim.jsonl", "precious")
    (tmp_path / "manifest.part1.jsonl").symlink_to(victim)
    with pytest.raises(LdmError, match="symbolic link"):
        Manifest(tmp_path, rank=1, world=2)
    assert victim.read_text() == "precious\n"


def test_pngs_and_grids_are_never_written_through_links(run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = write(tmp_path / "victim.png", "precious")
    (out / "00000-7.png").symlink_to(victim)  # the name the first image would take
    assert run("batch", write(tmp_path / "p.txt", "--prompt a fox --seed 7"), "--out", out).exit_code == 0
    assert victim.read_text() == "precious\n" and records(out)[0]["path"] == "00001-7.png"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out2").mkdir()
    (tmp_path / "out2" / "grids").symlink_to(elsewhere)
    result = run("batch", write(tmp_path / "q.txt", "--prompt a fox --n_iter 2"), "--out", tmp_path / "out2", "--grid")
    one_line(result, "grids", "symbolic link")
    assert not list(elsewhere.iterdir()) and not list((tmp_path / "out2").glob("*.png"))


# -- the manifest's records --------------------------------------------------------------------------
def test_a_torn_last_record_is_kept_apart_and_the_rerun_is_readable(run, drawn, tmp_path):
    out = tmp_path / "out"
    file = write(tmp_path / "p.txt", "a fox", "a bird", "a tree")
    assert run("batch", file, "--out", out).exit_code == 0
    rows = records(out)
    (out / rows[1]["path"]).unlink()
    (out / rows[2]["path"]).unlink()
    text = (out / "manifest.jsonl").read_text().splitlines(keepends=True)
    (out / "manifest.jsonl").write_text(text[0] + text[1][:25])  # killed while writing the second record
    drawn.clear()
    assert run("batch", file, "--out", out).exit_code == 0
    assert drawn == ["a bird", "a tree"]
    assert sorted(r["line"] for r in records(out)) == [1, 2, 3]  # every later record readable
    drawn.clear()
    assert run("batch", file, "--out", out).exit_code == 0
    assert drawn == []


def test_a_whole_record_missing_its_newline_counts(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png")
    (tmp_path / "manifest.jsonl").write_text(json.dumps({"path": "a.png", "line": 1, "index": 0}))
    manifest = Manifest(tmp_path)
    (tmp_path / "b.png").write_bytes(b"png")
    manifest.add({"path": "b.png", "line": 2, "index": 0})
    again = Manifest(tmp_path)
    assert again.find({"line": 1, "index": 0}) and again.find({"line": 2, "index": 0})


def test_records_ldm_did_not_write_are_skipped(tmp_path):
    (tmp_path / "a.png").write_bytes(b"png")
    (tmp_path.parent / "outside.png").write_bytes(b"png")
    bad = [{"path": "a.png", "line": [1], "index": 0}, {"path": 5, "line": 1, "index": 0},
           {"path": "../outside.png", "line": 1, "index": 0}, {"path": "a.png", "line": 1, "index": "0"},
           {"path": "a.png", "line": True, "index": 0}, [1, 2], "a.png", None, {"line": 1, "index": 0}]
    good = {"path": "a.png", "line": 2, "index": 0, "seed": 3}
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*bad, good]) + "[" * 100000 + "\n")
    manifest = Manifest(tmp_path)
    assert manifest.find({"line": 1, "index": 0}) is None
    assert manifest.find({"line": 2, "index": 0, "seed": 3}) == good


def test_bad_records_mean_rendering_again_not_a_traceback(run, drawn, tmp_path):
    out = tmp_path / "out"
    file = write(tmp_path / "p.txt", "a fox")
    assert run("batch", file, "--out", out).exit_code == 0
    [row] = records(out)
    edited = [{**row, "line": [1]}, {**row, "path": 7}]
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in edited))
    drawn.clear()
    assert run("batch", file, "--out", out).exit_code == 0
    assert drawn == ["a fox"]


# -- the hash cache ----------------------------------------------------------------------------------
@pytest.mark.parametrize("text", ["[]", "5", "null", '"x"', "{", "[" * 100000, "KEY"])
def test_a_hash_cache_of_the_wrong_shape_is_rebuilt(tmp_path, text):
    model = tmp_path / "m.bin"
    model.write_bytes(b"weights")
    digest = hashing.sha256_file(model)
    key = f"{model.resolve()}|{model.stat().st_size}|{model.stat().st_mtime_ns}"
    cache = hashing.cache_file()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({key: 5, "other": []}) if text == "KEY" else text)
    assert hashing.short_hash(model) == digest[:10]
    assert json.loads(cache.read_text())[key] == digest  # rewritten, so the next run reads it
    assert hashing.short_hash(model) == digest[:10]


# -- writes that fail --------------------------------------------------------------------------------
def failing_after(monkeypatch, saves: int, number: int) -> None:
    """PNG writes fail with OSError(`number`) once `saves` images were written."""
    done = []
    real = Image.Image.save

    def save(self, fp, *args, **kwargs):
        if len(done) >= saves:
            fp.write(b"\x89PNG half")  # the disk took part of it
            raise OSError(number, os.strerror(number))
        done.append(1)
        return real(self, fp, *args, **kwargs)
    monkeypatch.setattr(Image.Image, "save", save)


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
def test_a_failing_disk_keeps_and_records_what_was_saved(run, tmp_path, monkeypatch, number):
    failing_after(monkeypatch, 2, number)
    out = tmp_path / "out"
    result = run("batch", write(tmp_path / "p.txt", "a fox", "a bird", "a tree"), "--out", out)
    one_line(result, "line 3:", os.strerror(number), "kept")
    rows = records(out)
    assert sorted(r["line"] for r in rows) == [1, 2]
    assert sorted(p.name for p in out.iterdir()) == sorted([*(r["path"] for r in rows), "manifest.jsonl"])

    result = run("generate", "a fox", "-n", 3, "--out", tmp_path / "gen")  # every save fails from now on
    one_line(result, os.strerror(number))
    assert not list((tmp_path / "gen").iterdir())  # not even a temporary file


def test_generate_keeps_what_fit(run, tmp_path, monkeypatch):
    failing_after(monkeypatch, 2, errno.ENOSPC)
    result = run("generate", "a fox", "-n", 4, "--out", tmp_path / "gen")
    one_line(result, "No space left on device")
    assert len(list((tmp_path / "gen").glob("*.png"))) == 2 and not list((tmp_path / "gen").glob(".ldm-*"))


def test_a_record_the_disk_cannot_take_leaves_a_manifest_the_rerun_reads(run, drawn, tmp_path, monkeypatch):
    out = tmp_path / "out"
    file = write(tmp_path / "p.txt", "a fox", "a bird", "a tree")
    real = os.write
    manifest_writes = []

    def write_fd(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("manifest.jsonl"):
            manifest_writes.append(data)
            if len(manifest_writes) == 2:
                real(fd, data[:10])  # half the record, then the disk is full
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(fd, data)
    with monkeypatch.context() as m:
        m.setattr(os, "write", write_fd)
        one_line(run("batch", file, "--out", out), "line 2:", "cannot record", "No space left on device")
    assert [r["line"] for r in records(out)] == [1]
    assert len(list(out.glob("*.png"))) == 1  # the unrecorded image is not left to be rendered twice
    drawn.clear()
    assert run("batch", file, "--out", out).exit_code == 0
    assert drawn == ["a bird", "a tree"] and sorted(r["line"] for r in records(out)) == [1, 2, 3]
    assert sorted(p.name for p in out.glob("*.png")) == sorted(r["path"] for r in records(out))


@pytest.mark.parametrize("command", [["generate", "a fox"], ["batch", "PROMPTS"], ["img2img", "INIT", "a fox"]])
def test_an_out_that_leads_nowhere_is_refused_before_rendering(run, tmp_path, no_load, command):
    write(tmp_path / "p.txt", "a fox")
    Image.new("RGB", (64, 64)).save(tmp_path / "init.png")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    words = [{"PROMPTS": tmp_path / "p.txt", "INIT": tmp_path / "init.png"}.get(w, w) for w in command]
    for out in (tmp_path / "dangling", tmp_path / "dangling" / "sub"):
        one_line(run(*words, "--out", out), "symbolic link", "does not exist")
    assert not (tmp_path / "gone").exists()


# -- every line's files, before the first image ------------------------------------------------------
def test_a_line_model_that_is_a_device_is_a_bad_line(run, tmp_path, no_load):
    file = write(tmp_path / "p.txt", "a fox", "--prompt a bird --model /dev/zero",
                 "--prompt x --init_image /dev/zero", "--prompt y --controlnet /dev/null --control_image /dev/null")
    result = run("batch", file, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert all(f"p.txt:{n}:" in result.stderr for n in (2, 3, 4)) and "character device" in result.stderr
    assert not (tmp_path / "out").exists()


def test_the_flags_files_are_checked_for_every_model_before_the_first_loads(run, tmp_path, no_load, sd1_folder):
    (tmp_path / "other").symlink_to(sd1_folder)
    file = write(tmp_path / "p.txt", "a fox", "--prompt a bird --model other")
    one_line(run("batch", file, "--out", tmp_path / "out", "--vae", "/dev/zero"), "/dev/zero", "character device")


def test_an_error_mid_run_names_its_line_and_keeps_what_was_saved(run, tmp_path, monkeypatch):
    real = pipeline.text_to_image

    def text_to_image(model, group, on_step=None):
        if any("bird" in s.prompt for s in group):
            raise LdmError("crafted.safetensors is not a LoRA ldm can read")
        return real(model, group, on_step)
    monkeypatch.setattr(pipeline, "text_to_image", text_to_image)
    out = tmp_path / "out"
    result = run("batch", write(tmp_path / "p.txt", "a fox", "a bird", "a tree"), "--out", out)
    one_line(result, "line 2: crafted.safetensors")
    assert [r["line"] for r in records(out)] == [1] and len(list(out.glob("*.png"))) == 1
