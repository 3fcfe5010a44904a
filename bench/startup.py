"""Start-up: wall time of whole `ldm` processes, each beside `python -c "import torch"` measured in
the same run (the floor every rendering command pays), runs interleaved, medians of --runs.

    python bench/startup.py --runs 5

Goals (issue 25): the built-in model's one image, process start to PNG, at most 2.0x the torch
import; `ldm --help`, `ldm schedulers` and `ldm info IMAGE` at most 1 s; `ldm info FILE` without
torch. A `-X importtime` view of one command: `python -X importtime -m ldm_cli generate "a red
circle" 2> imports.txt`.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUILTIN = ROOT / "ldm_cli" / "assets" / "builtin.safetensors"


def commands(work: Path) -> dict[str, tuple[list[str], float | None]]:
    """name -> (argv, the most seconds it may take, where the goal is a time)."""
    ldm = [sys.executable, "-m", "ldm_cli"]
    png = work / "made.png"
    return {
        'python -c "import torch"': ([sys.executable, "-c", "import torch"], None),
        "ldm --help": ([*ldm, "--help"], 1.0),
        "ldm schedulers": ([*ldm, "schedulers"], 1.0),
        "ldm info IMAGE": ([*ldm, "info", str(png)], 1.0),
        "ldm info builtin.safetensors": ([*ldm, "info", str(BUILTIN)], None),
        'ldm generate "a red circle" (built-in)': (
            [*ldm, "generate", "a red circle", "--seed", "1", "--quiet", "--out", str(work / "out")], None),
    }


RATIO_GOAL = 2.0  # the built-in generate, against the torch import


def timed(argv: list[str]) -> float:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"{' '.join(argv)} failed (exit {done.returncode}):\n{done.stderr[-2000:]}")
    return elapsed


def imports_torch(argv: list[str]) -> bool:
    """Whether the command's process imported torch (run once more, in-process check)."""
    check = ("import sys\nfrom ldm_cli import cli\nsys.argv = ['ldm', *sys.argv[1:]]\n"
             "try:\n    cli.app()\n"  # not cli.main(), which ends the process before the check
             "except SystemExit:\n    pass\n"
             "print('TORCH', 'torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", check, *argv[3:]] if argv[1:3] == ["-m", "ldm_cli"] else argv,
                          capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=ROOT)
    return "TORCH True" in done.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        table = commands(work)
        subprocess.run([sys.executable, "-m", "ldm_cli", "generate", "a red circle", "--seed", "1", "--quiet",
                        "--out", str(work / "first")], check=True, cwd=ROOT)  # warm-up: page cache, hash cache
        next((work / "first").glob("*.png")).rename(work / "made.png")
        times: dict[str, list[float]] = {name: [] for name in table}
        for _ in range(args.runs):  # interleaved, so a busy spell hits every row alike
            for name, (argv, _) in table.items():
                times[name].append(timed(argv))
        torch_uses = {name: imports_torch(argv) for name, (argv, _) in table.items() if name.startswith("ldm")}
    floor = statistics.median(times['python -c "import torch"'])
    print(f"{os.cpu_count()} cores; medians of {args.runs} runs, interleaved\n")
    print(f"{'command':<42}{'median (s)':>11}{'x torch':>9}{'torch?':>8}  {'goal':<16}runs (s)")
    for name, runs in times.items():
        median = statistics.median(runs)
        goal = table[name][1]
        if name.startswith("ldm generate"):
            verdict = f"<= {RATIO_GOAL}x " + ("ok" if median / floor <= RATIO_GOAL else "MISSED")
        elif goal is not None:
            verdict = f"<= {goal:.0f} s " + ("ok" if median <= goal else "MISSED")
        elif name.startswith("ldm info"):
            verdict = "no torch " + ("MISSED" if torch_uses[name] else "ok")
        else:
            verdict = ""
        used = "" if name not in torch_uses else ("yes" if torch_uses[name] else "no")
        print(f"{name:<42}{median:>11.2f}{median / floor:>9.2f}{used:>8}  {verdict:<16}"
              f"{' '.join(f'{r:.2f}' for r in runs)}")


if __name__ == "__main__":
    main()
