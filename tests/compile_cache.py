"""The session's one torch.compile cache, filled from empty by one run of bench/gpu_speed.py on
tiny models. That run compiles only SD1.5, once (about a minute on two cores), then starts a
fresh `ldm generate --compile` process that must find it all compiled: the promise of --compile,
checked from a cold cache (tests/test_gpu_bench.py). The benchmark's tiny SD1.5 U-Net is the
tests' tiny SD1 one (tests/tiny_models.py), so tests/test_speed.py's in-process compile finds it
compiled too, in seconds.

Inductor's cache key holds what shapes the graph, the CPU thread count and inductor's settings,
so every compile here runs DPM++ 2M (integer timesteps; Euler's are floats), CFG on (a batch of
2), one thread (as conftest.py leaves the test process) and scalar C++: inductor's vectorised
kernels take a third longer to build, and test nothing of ldm's that scalar ones do not.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
_runs: dict[Path, str] = {}


def environment(cache: Path) -> dict[str, str]:
    """A child process's environment: ldm's cache (the compiled code in its compile/) in `cache`,
    one thread, scalar kernels."""
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "OUT")}
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", OMP_NUM_THREADS="1", TORCHINDUCTOR_VEC_ISA_OK="0",
               LDM_CACHE_DIR=str(cache))
    return env


def bench_table(tmp_path_factory) -> tuple[Path, str]:
    """The cache folder (for LDM_CACHE_DIR) and the markdown table of the run that filled it,
    run once a session however many tests ask."""
    cache = tmp_path_factory.getbasetemp() / "compile-cache"
    if cache not in _runs:
        out = tmp_path_factory.mktemp("gpu-bench") / "gpu_speed.md"
        done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_speed.py"), "--tiny", "--device", "cpu",
                               "--runs", "1", "--compile-models", "sd15", "--out", str(out)],
                              capture_output=True, text=True, env=environment(cache), timeout=900)
        assert done.returncode == 0, done.stderr[-3000:]
        _runs[cache] = out.read_text()
    return cache, _runs[cache]


def use_in_this_process(monkeypatch, cache: Path) -> None:
    """Compile in this process as `environment(cache)`'s children do (one thread: conftest.py)."""
    import torch._inductor.config as inductor

    monkeypatch.setenv("LDM_CACHE_DIR", str(cache))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # unset for ldm; put back after ldm sets it
    monkeypatch.setattr(inductor.cpp, "vec_isa_ok", False)
