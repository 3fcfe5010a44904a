"""Ctrl-C and SIGTERM stop a real `ldm generate` or `ldm batch` process cleanly: one line,
128 + the signal, the images saved so far kept (and recorded), no temporary file left."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from ldm_cli import stopping

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def stopped_midway(command: list[str], signum: int) -> tuple[int, str, str]:
    """Run `command` (the built-in model: seconds per image), send `signum` once it has saved
    an image; its exit status, stdout and stderr."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    try:
        first = process.stdout.readline()
        assert first.startswith("saved "), process.stderr.read()
        process.send_signal(signum)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    return process.returncode, first + out, err


@pytest.mark.parametrize("signum, status, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_stops_generate_in_one_line(signum, status, word, tmp_path):
    command = [sys.executable, "-m", "ldm_cli", "generate", "x", "--steps", "20", "-n", "8", "--seed", "1",
               "--quiet", "--out", str(tmp_path)]
    returncode, out, err = stopped_midway(command, signum)
    assert returncode == status
    assert err == f"ldm: {word}; images already saved are kept\n"
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert 1 <= len(saved) < 8 and all(name.endswith(".png") for name in saved)  # no .part left
    assert len(out.splitlines()) in (len(saved), len(saved) - 1)  # at most the last one unreported


def test_sigterm_stops_batch_with_every_saved_image_recorded(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("--prompt x --n_iter 8 --steps 20\n")
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ldm_cli", "batch", str(prompts), "--quiet", "--out", str(out)]
    returncode, _, err = stopped_midway(command, signal.SIGTERM)
    assert returncode == 143 and err == "ldm: terminated; images already saved are kept\n"
    recorded = [json.loads(line)["path"] for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert 1 <= len(recorded) < 8 and sorted(recorded) == sorted(p.name for p in out.glob("*.png"))
    assert not list(out.glob(".ldm-*"))


def test_signals_during_held_work_wait_for_it_and_report_the_first():
    with pytest.raises(stopping.Stopped) as stopped:
        with stopping.signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            finished = True  # the held signals did not cut the block short
    assert finished and stopped.value.signum == signal.SIGTERM
    assert stopping.signal_of(stopped.value) == signal.SIGTERM
    assert stopping.signal_of(KeyboardInterrupt()) == signal.SIGINT  # Python's own Ctrl-C


def test_sigterm_stops_only_inside_and_the_old_handler_comes_back():
    with pytest.raises(stopping.Stopped), stopping.sigterm_stops():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
