"""One torch.compile cache for every test that compiles. A first `ldm generate --compile` process
compiles the tiny SD1 model's denoiser into it once a session (about a minute on two cores);
each later compile of that graph finds it there in seconds: a second process, the in-process API
(tests/test_speed.py) and bench/gpu_speed.py's tiny SD1.5, whose U-Net is the same.

Inductor's cache key holds what shapes the graph and the CPU thread count, so every compile here
runs DPM++ 2M (integer timesteps; Euler's are floats), CFG on (a batch of 2), and one thread, as
conftest.py leaves the test process.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
ARGS = ["--steps", "2", "--cfg", "5", "--seed", "3", "-W", "64", "-H", "64", "--scheduler", "dpmpp_2m",
        "--schedule", "karras", "--device", "cpu", "--compile", "-q"]
_first: dict[Path, "Run"] = {}


@dataclass
class Run:
    hits: int  # FX graphs inductor loaded from the cache
    misses: int  # FX graphs it compiled
    pixels: np.ndarray


def environment(cache: Path) -> dict[str, str]:
    """A child process's environment: ldm's cache (the compiled code in its compile/) in `cache`, one thread."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "OUT")}
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1", LDM_CACHE_DIR=str(cache))
    return env


def generate(model: Path, cache: Path, out: Path) -> Run:
    """`ldm generate --compile` in a new process, through bench/timed_ldm.py, which reports the FX graph cache's use."""
    command = [sys.executable, str(ROOT / "bench" / "timed_ldm.py"), str(time.time()), "generate", "a red fox",
               "--model", str(model), *ARGS, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, env=environment(cache), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    marks = dict(line.split(" ", 1) for line in done.stderr.splitlines() if line.startswith("LDM_"))
    hits, misses = map(int, marks["LDM_FX_CACHE"].split())
    return Run(hits, misses, np.asarray(Image.open(next(out.glob("*.png"))).convert("RGB")))


def first_run(tmp_path_factory, model: Path) -> tuple[Path, Run]:
    """The session's cache folder (for LDM_CACHE_DIR), filled by a first process, and what that process reported."""
    cache = tmp_path_factory.getbasetemp() / "compile-cache"
    if cache not in _first:
        _first[cache] = generate(model, cache, tmp_path_factory.mktemp("first-compile"))
    return cache, _first[cache]
