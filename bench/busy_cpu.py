"""`ldm generate` on a shared CPU: wall time idle and beside one busy process, for ldm's old
thread policy and its new one (issue 16's target: a busy neighbour costs at most 1.6x).

Each measurement is a fresh `ldm generate` process with the built-in model, as a user runs it:
16 images in one batch, and a single image. The neighbour is `python -c "while True: pass"`,
started before the run and stopped after it. The policies:
  old  OMP_NUM_THREADS=<cores> GOMP_SPINCOUNT=300000: torch's default threads and libgomp's
       default wait (spin ~3 ms before sleeping), which ldm leaves alone when they are set;
  new  ldm's own choice (nothing set): idle threads sleep (OMP_WAIT_POLICY=PASSIVE), and each
       process takes its share of the cores it may run on.
Configurations take turns, round after round, so a change in the machine's load hits all alike;
the table shows medians, and how many cores other work on the machine kept busy meanwhile
(the machine's busy CPU time, from /proc/stat, less this script's children's), as the figures
mean little when that is high.

    python bench/busy_cpu.py [--runs 3]
"""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LDM = [sys.executable, "-m", "ldm_cli", "generate", "a red circle", "--seed", "1", "-q"]
WORKLOADS = {"16 images, --batch-size 16": ["-n", "16", "--batch-size", "16"], "1 image": ["-n", "1"]}
OWN = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")  # what the policies set
POLICIES = {"old": {"OMP_NUM_THREADS": str(os.cpu_count()), "GOMP_SPINCOUNT": "300000"}, "new": {}}
NEIGHBOUR = [sys.executable, "-c", "while True: pass"]


def cpu_seconds() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, those of this script's finished children)."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK"), children.ru_utime + children.ru_stime


def timed(workload: list[str], policy: dict[str, str], busy: bool) -> tuple[float, float]:
    """(wall seconds of one run, cores other work kept busy meanwhile)."""
    env = {k: v for k, v in os.environ.items() if k not in OWN} | policy | {"HF_HUB_OFFLINE": "1"}
    machine, mine = cpu_seconds()
    start = time.perf_counter()
    neighbour = subprocess.Popen(NEIGHBOUR) if busy else None
    try:
        with tempfile.TemporaryDirectory() as out:
            subprocess.run([*LDM, *workload, "--out", out], cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
    finally:
        if neighbour:
            neighbour.kill()
            neighbour.wait()
    wall = time.perf_counter() - start
    machine_after, mine_after = cpu_seconds()
    return wall, max(0.0, (machine_after - machine) - (mine_after - mine)) / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    configs = [(w, p, busy) for w in WORKLOADS for p in POLICIES for busy in (False, True)]
    walls: dict[tuple, list[float]] = {c: [] for c in configs}
    others: dict[tuple, list[float]] = {c: [] for c in configs}
    for round_ in range(args.runs):
        for config in configs:
            wall, other = timed(WORKLOADS[config[0]], POLICIES[config[1]], config[2])
            walls[config].append(wall)
            others[config].append(other)
        print(f"round {round_ + 1}/{args.runs}: " + ", ".join(f"{w[-1]:.1f}" for w in walls.values()),
              file=sys.stderr, flush=True)
    print(f"`ldm generate`, built-in model, {os.cpu_count()} cores, medians of {args.runs} runs\n")
    print("| workload | policy | idle (s) | beside a busy process (s) | busy / idle | cores busy with other work (idle, busy runs) |")
    print("|---|---|---|---|---|---|")
    for workload in WORKLOADS:
        for policy in POLICIES:
            idle, busy = (statistics.median(walls[(workload, policy, b)]) for b in (False, True))
            other = " / ".join(f"{statistics.median(others[(workload, policy, b)]):.2f}" for b in (False, True))
            print(f"| {workload} | {policy} | {idle:.1f} | {busy:.1f} | {busy / idle:.2f}x | {other} |")


if __name__ == "__main__":
    main()
