"""`ldm generate`, `ldm info`, `ldm schedulers` through the real CLI (typer's CliRunner)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from ldm_cli import __version__, loading
from ldm_cli.cli import app
from tests.fifos import unblocking_fifo


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
                    f"Model hash: {row['model_hash']}, Model: tiny-sd1, RNG: CPU, Version: ldm 0.1.0")


def test_a_random_seed_leaves_room_for_the_whole_run(monkeypatch):
    import random

    from ldm_cli.settings import MAX_SEED, Settings

    monkeypatch.setattr(random, "randint", lambda low, high: high)  # the largest seed it may draw
    seed = Settings(prompt="x").resolve({}, (64, 64)).seed
    assert seed + 10_000 - 1 <= MAX_SEED


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
    (["--steps", "0"], "--steps must be between 1 and 1000"),
    (["--steps", "100000000"], "--steps must be between 1 and 1000 (got 100000000)"),
    (["--cfg", "-1"], "--cfg must be between 0 and 100"),
    (["--cfg", "nan"], "--cfg must be between 0 and 100 (got nan)"),
    (["--cfg", "inf"], "--cfg must be between 0 and 100 (got inf)"),
    (["--cfg", "1e30"], "--cfg must be between 0 and 100 (got 1e+30)"),
    (["-W", "99999"], "--width must be at most 16384"),
    (["-W", "8192", "-H", "8192"], "the image size must be at most 16,777,216 pixels"),
    (["--num-images", "100000000"], "--num-images must be between 1 and 10000"),
    (["--width", "65"], "--width must be a positive multiple of 8"),
    (["--schedule", "karras", "--scheduler", "ddim"], "no karras schedule"),
    (["--num-images", "0"], "--num-images"),
    (["--seed", "4294967295", "-n", "2"], "--seed 4294967295 leaves no room for 2 images"),
    (["--device", "tpu"], "unknown --device"),
    (["--stepz", "3"], "No such option: --stepz"),
    (["--steps", "abc"], "Invalid value for '--steps': 'abc' is not a valid integer."),
    (["--steps", "2.5"], "Invalid value for '--steps': '2.5' is not a valid integer."),
    (["--cfg", "x"], "Invalid value for '--cfg': 'x' is not a valid float."),
    (["--control-scale", "1", "--control-scale", "q"], "Invalid value for '--control-scale': 'q' is not a valid float."),
    (["--negative", "(" * 1000 + "x"], "--negative may nest brackets at most 100 deep (got 1000)"),
    (["--negative", "a AND b:" + "9" * 400 + " (c:" + "9" * 400 + ")"], "--negative may weight words by -100 to 100"),
])
def test_bad_flags_fail_in_one_line_and_write_nothing(run, tmp_path, args, words):
    result = run("generate", "a fox", "--out", tmp_path / "o", *args)
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and words in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "o").exists()


def forged_png(path, parameters=None, ldm=None):
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    if parameters is not None:
        info.add_text("parameters", "a fox\n" + parameters)
    if ldm is not None:
        info.add_text("ldm", json.dumps(ldm))
    Image.new("RGB", (8, 8)).save(path, pnginfo=info)
    return path


GOOD = {"Steps": "2", "Sampler": "Euler", "CFG scale": "7", "Seed": "1", "Size": "64x64"}


def params(**changes):
    return ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in {**GOOD, **changes}.items())


@pytest.fixture
def no_model_load(monkeypatch):
    from ldm_cli import commands

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")
    monkeypatch.setattr(commands, "load_model", refuse)


@pytest.mark.parametrize("parameters, ldm, words", [
    (params(Steps="999999999"), None, "the Steps recorded in {png} must be between 1 and 1000 (got 999999999); override it with --steps"),
    (params(Size="99999x99999"), None, "the Size recorded in {png} must be at most 16384 (got 99999x99999); override it with --width and --height"),
    (params(Size="8192x8192"), None, "the Size recorded in {png} must be at most 16,777,216 pixels (got 8192x8192)"),
    (params(Size="65x64"), None, "the Size recorded in {png} must be a positive multiple of 8 (got 65x64)"),
    (params(CFG_scale="nan"), None, "the CFG scale recorded in {png} must be between 0 and 100 (got nan); override it with --cfg"),
    (params(Steps="many"), None, "the Steps recorded in {png} must be a whole number (got 'many')"),
    (params(Seed="-5"), None, "the Seed recorded in {png} must be between 0 and 4294967295 (got -5)"),
    (params(), {"prompt": "a fox", "steps": "many"}, "the \"steps\" in the ldm metadata of {png} must be a whole number (got 'many')"),
    (params(), {"prompt": "a fox", "steps": 999999999}, "the Steps recorded in {png} must be between 1 and 1000"),
    (params(), {"prompt": "a fox", "cfg": 1e30}, "the CFG scale recorded in {png} must be between 0 and 100 (got 1e+30)"),
    (params(), {"prompt": "a fox AND b:" + "9" * 400}, "the prompt recorded in {png} may weight an AND part by -100 to 100 "
                                                     "(got inf on 'b'); override it with a prompt of your own"),
    (params(), {"prompt": "a fox", "negative": "(" * 101}, "the negative prompt recorded in {png} may nest brackets at most "
                                                          "100 deep (got 101); override it with --negative"),
])
def test_a_forged_png_is_refused_before_any_model_loads(run, tmp_path, no_model_load, parameters, ldm, words):
    png = forged_png(tmp_path / "forged.png", parameters, ldm)
    result = run("generate", "--from-png", png, "--out", tmp_path / "o")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith(f"ldm: error: {words.format(png=repr(str(png)))}")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output and not (tmp_path / "o").exists()


def test_a_bad_recorded_value_overridden_by_a_flag_is_fine(run, tmp_path):
    png = forged_png(tmp_path / "forged.png", params(Steps="999999999", Size="99999x99999", CFG_scale="nan"))
    result = run("generate", "--from-png", png, "--steps", 1, "-W", 64, "-H", 64, "--cfg", 3, "--out", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert (row["steps"], row["width"], row["height"], row["cfg"], row["seed"]) == (1, 64, 64, 3.0, 1)
    half = run("generate", "--from-png", png, "--steps", 1, "--out", tmp_path / "o")
    assert half.exit_code == 2 and "the CFG scale recorded in" in half.stderr  # a bad value not overridden


def test_steps_are_capped_at_the_models_training_timesteps(run, tmp_path, sd1_folder):
    import shutil

    model = tmp_path / "short"
    shutil.copytree(sd1_folder, model)
    config = model / "scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_train_timesteps": 100}))
    result = run("generate", "a fox", "--steps", 101, "--model", model, "--out", tmp_path / "o", model=False)
    assert result.exit_code == 2 and "--steps must be between 1 and 100 (got 101); this model was trained on 100 timesteps" in result.stderr
    assert not list(tmp_path.rglob("*.png"))


def test_steps_a_sampler_cannot_run_are_refused_in_one_line(run, tmp_path, sd1_folder):
    """LCM's schedule has 50 steps (diffusers fails at 51, after the model loaded); a line of a
    batch asking too many is named before any image renders."""
    result = run("generate", "a fox", "--scheduler", "lcm", "--steps", 60, "--model", sd1_folder,
                 "--out", tmp_path / "o", model=False)
    assert result.exit_code == 2
    assert result.stderr.splitlines() == ["ldm: error: --steps 60 is more than the LCM sampler can run with this "
                                          "model (at most 50); use fewer steps or another --scheduler"]
    prompts = tmp_path / "p.txt"
    prompts.write_text('a fox\n--prompt "a cat" --sampler_name LCM --steps 70\n')
    result = run("batch", prompts, "--model", sd1_folder, "--steps", 1, "--out", tmp_path / "b", model=False)
    assert result.exit_code == 2 and "line 2: --steps 70 is more than the LCM sampler" in result.stderr
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


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"ldm {__version__}\n"


def test_a_bug_shows_its_own_traceback(tmp_path):
    code = ("import sys; from ldm_cli import commands, cli\n"
            "def broken(*args): raise RuntimeError('a bug')\n"
            "commands.png_info = broken; sys.argv = ['ldm', 'info', 'x.png']; cli.main()")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 1
    assert "Traceback" in result.stderr and result.stderr.rstrip().endswith("RuntimeError: a bug")
    assert "ldm: error" not in result.stderr and "AttributeError" not in result.stderr


END = """
import atexit, sys, threading, time
from ldm_cli import cli
atexit.register(lambda: print("exit handler ran"))
late = threading.Thread(target=lambda: (time.sleep(0.3), print("thread finished")))
late.start()
sys.argv = ["ldm", *sys.argv[1:]]
cli.main()
print("never here")
"""


@pytest.mark.parametrize("args, status", [(["--version"], 0), (["generate", "x", "--steps", "0"], 2)])
def test_the_program_ends_at_once_after_its_threads_exit_handlers_and_output(args, status):
    done = subprocess.run([sys.executable, "-c", END, *args], capture_output=True, text=True)
    assert done.returncode == status, done.stderr
    lines = done.stdout.splitlines()
    assert lines[-2:] == ["thread finished", "exit handler ran"] and "never here" not in done.stdout
    assert (lines[0] == f"ldm {__version__}") if status == 0 else done.stderr.startswith("ldm: error: ")


def test_scheduler_and_schedule_names_ignore_case(run, tmp_path):
    [row] = generate_json(run, tmp_path / "a", "--scheduler", "EULER", "--schedule", "Karras")
    assert (row["scheduler"], row["schedule"]) == ("euler", "karras")
    [row] = generate_json(run, tmp_path / "b", "--schedule", "EXPONENTIAL")
    assert (row["scheduler"], row["schedule"]) == ("dpmpp_2m", "exponential")


@pytest.fixture
def inputs(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "image.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "mask.png")
    (tmp_path / "prompts.txt").write_text("a fox\n")
    return tmp_path


COMMANDS = {"generate": ["generate", "a fox"], "img2img": ["img2img", "image.png", "a fox"],
            "inpaint": ["inpaint", "image.png", "mask.png", "a fox"],
            "outpaint": ["outpaint", "image.png", "a fox", "--left", "8"], "batch": ["batch", "prompts.txt"]}


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("flag, value, suggestion", [("--scheduler", "eular", "'euler'"), ("--schedule", "karas", "'karras'")])
def test_bad_scheduler_names_are_refused_before_the_model_loads(command, flag, value, suggestion, inputs, monkeypatch):
    def load(*args, **kwargs):
        raise AssertionError("the model loaded")

    monkeypatch.setattr(loading, "load", load)
    monkeypatch.chdir(inputs)
    result = CliRunner().invoke(app, [*COMMANDS[command], flag, value, "--out", "o"])
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and f"(did you mean {suggestion}?)" in result.stderr
    assert not (inputs / "o").exists()


def test_a_failed_run_leaves_no_new_folder(run, tmp_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((1000).to_bytes(8, "little") + b'{"a": 1}')
    for model in (tmp_path / "missing", truncated):
        result = run("generate", "a fox", "--model", model, "--out", tmp_path / "new" / "deeper", model=False)
        assert result.exit_code == 2 and "ldm: error" in result.stderr
        assert not (tmp_path / "new").exists()
    [row] = generate_json(run, tmp_path / "new" / "deeper")  # a run that saves makes the folders
    assert Path(row["path"]).parent == tmp_path / "new" / "deeper"


@pytest.fixture
def fifo(tmp_path):
    """A FIFO named pipe.png; should a read of it block, it is unblocked after 60 s, so a test
    fails rather than hangs."""
    with unblocking_fifo(tmp_path / "pipe.png") as path:
        yield path


@pytest.mark.parametrize("args", [
    ["info", "{fifo}"], ["info", "{fifo_link}"], ["info", "/dev/null"], ["generate", "x", "--model", "{fifo}"],
    ["generate", "x", "--model", "/dev/null"], ["generate", "x", "--vae", "{fifo}"], ["generate", "--from-png", "{fifo}"],
    ["img2img", "{fifo}", "x"], ["inpaint", "{image}", "{fifo}", "x"], ["batch", "{init_fifo}"],
])
def test_fifos_and_devices_are_refused_in_one_line(args, fifo, inputs):
    (inputs / "pipe.safetensors").symlink_to(fifo)
    (inputs / "init_fifo.txt").write_text(f"--prompt x --init_image {fifo}\n")
    names = {"fifo": fifo, "fifo_link": inputs / "pipe.safetensors", "image": inputs / "image.png",
             "init_fifo": inputs / "init_fifo.txt"}
    result = CliRunner().invoke(app, [a.format(**names) for a in args] + ["--out", str(inputs / "o")] * (args[0] != "info"))
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == (2 if args[0] == "batch" else 1)  # batch: a summary, then the line
    assert "is a FIFO (named pipe), not a" in result.stderr or "is a character device, not a" in result.stderr


def test_typer_coerces_its_own_way_again_after_a_command(run):
    """ldm's plain coercers (flag_values.py) are typer's only while ldm's command line runs."""
    import typer.core

    before = typer.core.build_runtime_param
    assert run("schedulers").exit_code == 0
    assert typer.core.build_runtime_param is before
