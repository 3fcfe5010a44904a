"""`ldm`, reporting on stderr for bench/gpu_speed.py when its first denoising step ended (seconds
since the parent started it, given first) and inductor's FX graph cache hits and misses.

    python bench/timed_ldm.py START_TIME generate PROMPT --compile ...
"""
import atexit
import sys
import time
from pathlib import Path

START = float(sys.argv[1])
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm_cli import progress  # noqa: E402

step = progress.Progress.step
seen: list[float] = []


def first_step(self) -> None:
    if not seen:  # the device finishes the step before the clock is read
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
        seen.append(time.time() - START)
        print(f"LDM_FIRST_STEP {seen[0]:.3f}", file=sys.stderr, flush=True)
    step(self)


def report() -> None:
    from torch._dynamo.utils import counters

    c = counters["inductor"]
    print(f"LDM_FX_CACHE {c['fxgraph_cache_hit']} {c['fxgraph_cache_miss']}", file=sys.stderr, flush=True)


progress.Progress.step = first_step
atexit.register(report)
sys.argv = ["ldm", *sys.argv[2:]]
from ldm_cli.cli import main  # noqa: E402

main()
