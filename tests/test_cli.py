"""`ldm generate`, `ldm info`, `ldm schedulers` through the real CLI (typer's CliRunner)."""
import json
import subprocess
import sys

import pytest
from PIL import Image
from typer.testing import CliRunner

from ldm_cli.cli import app


@pytest.fixture
def run(sd1_folder, tmp_path):
    runner = CliRunner()

    def invoke(*args, model=True):
        extra = ["--model", str(sd1_folder)] if model and args and args[0] == "generate" else []
        return runner.invoke(app, [*map(str, args), *extra])

    return invoke


def generate_json(run, out, *args):
    result = run("generate", "a red fox", "--steps", 2, "--out", out, "--json", *args)
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_json_lines_and_seeds(run, tmp_path):
    rows = generate_json(run, tmp_path, "-n", 3, "--batch-size", 2, "--seed", 40, "--cfg", 5)
    assert [r["seed"] for r in rows] == [40, 41, 42]
    for r in rows:
        assert Image.open(r["path"]).size == (64, 64)
        assert (r["steps"], r["cfg"], r["scheduler"], r["schedule"], r["width"]) == (2, 5.0, "dpmpp_2m", "karras", 64)
        assert r["model_name"] == "tiny-sd1" and len(r["model_hash"]) == 10


def test_png_carries_a1111_parameters(run, tmp_path):
    [row] = generate_json(run, tmp_path, "--seed", 7, "--negative", "blurry, dark", "--scheduler", "Euler a")
    text = Image.open(row["path"]).text["parameters"]
    assert text == ("a red fox\nNegative prompt: blurry, dark\n"
                    f"Steps: 2, Sampler: Euler a, CFG scale: 7.5, Seed: 7, Size: 64x64, "
                    f"Model hash: {row['model_hash']}, Model: tiny-sd1, Version: ldm 0.1.0")


def test_human_output_names_files_and_random_seed(run, tmp_path):
    result = run("generate", "a fox", "--steps", 1, "--out", tmp_path)
    assert result.exit_code == 0, result.output
    [line] = result.stdout.splitlines()
    seed = int(line.split("seed ")[1].rstrip(")"))
    path = line.split()[1]
    assert f"Seed: {seed}," in Image.open(path).text["parameters"]


def test_info_prints_the_parameters_back(run, tmp_path):
    [row] = generate_json(run, tmp_path, "--seed", 3)
    plain = run("info", row["path"])
    assert plain.exit_code == 0 and plain.stdout.startswith("a red fox\nSteps: 2, Sampler: DPM++ 2M, Schedule type: Karras")
    data = json.loads(run("info", row["path"], "--json").stdout)
    assert (data["seed"], data["steps"], data["prompt"]) == (3, 2, "a red fox")


def test_from_png_reruns_the_same_image_and_flags_override(run, tmp_path):
    [row] = generate_json(run, tmp_path / "a", "--seed", 9, "--cfg", 4)
    again = run("generate", "--from-png", row["path"], "--out", tmp_path / "b", "--json")
    assert again.exit_code == 0, again.output
    rerun = json.loads(again.stdout)
    assert open(rerun["path"], "rb").read() == open(row["path"], "rb").read()
    changed = json.loads(run("generate", "--from-png", row["path"], "--seed", 10, "--out", tmp_path / "c", "--json").stdout)
    assert (changed["seed"], changed["cfg"], changed["prompt"]) == (10, 4.0, "a red fox")


def test_from_png_reads_a1111_images(run, tmp_path):
    from ldm_cli.images import png_info

    a1111 = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(a1111, pnginfo=png_info({"parameters": (
        "a blue cat\nNegative prompt: dog\nSteps: 2, Sampler: DPM++ 2M Karras, CFG scale: 6, Seed: 77, "
        "Size: 64x64, Model hash: 0123456789, Model: other, Version: v1.10.1")}))
    result = run("generate", "--from-png", a1111, "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert (row["prompt"], row["negative"], row["seed"], row["cfg"], row["schedule"]) == ("a blue cat", "dog", 77, 6.0, "karras")


def test_two_runs_into_one_folder_keep_both(run, tmp_path):
    first = generate_json(run, tmp_path, "--seed", 1)
    second = generate_json(run, tmp_path, "--seed", 1)
    assert first[0]["path"] != second[0]["path"]
    assert len(list(tmp_path.glob("*.png"))) == 2


@pytest.mark.parametrize("args, words", [
    (["--scheduler", "nope"], "unknown scheduler"),
    (["--steps", "0"], "--steps must be at least 1"),
    (["--cfg", "-1"], "--cfg must be 0 or more"),
    (["--width", "65"], "--width must be a positive multiple of 8"),
    (["--schedule", "karras", "--scheduler", "ddim"], "no karras schedule"),
    (["--num-images", "0"], "--num-images"),
    (["--device", "tpu"], "unknown --device"),
    (["--stepz", "3"], "No such option: --stepz"),
])
def test_bad_flags_fail_in_one_line_and_write_nothing(run, tmp_path, args, words):
    result = run("generate", "a fox", "--out", tmp_path / "o", *args)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and words in result.stderr and "Traceback" not in result.output
    assert not list(tmp_path.rglob("*.png"))


def test_missing_model_and_unwritable_folder(tmp_path):
    runner = CliRunner()
    missing = runner.invoke(app, ["generate", "x", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "o")])
    assert missing.exit_code == 2 and "model not found" in missing.stderr
    (tmp_path / "f").write_text("")
    blocked = runner.invoke(app, ["generate", "x", "--out", str(tmp_path / "f" / "sub")])
    assert blocked.exit_code == 2 and "cannot write to output folder" in blocked.stderr


@pytest.mark.parametrize("content", [b"garbage", b""])
def test_malformed_png_for_from_png(run, tmp_path, content):
    bad = tmp_path / "bad.png"
    bad.write_bytes(content)
    result = run("generate", "--from-png", bad, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "not a readable image" in result.stderr
    plain = tmp_path / "plain.png"
    Image.new("RGB", (8, 8)).save(plain)
    result = run("generate", "--from-png", plain, "--out", tmp_path / "o")
    assert result.exit_code == 2 and "no generation parameters" in result.stderr


def test_schedulers_lists_names_and_labels(run):
    result = run("schedulers")
    assert result.exit_code == 0
    assert "dpmpp_2m" in result.stdout and "DPM++ 2M" in result.stdout and "karras" in result.stdout


def test_help_does_not_import_torch():
    code = "import sys, ldm_cli.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
