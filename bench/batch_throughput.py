"""Throughput of `ldm batch`: images per second for a file of 64 prompts, batched versus one at
a time, and with one versus two processes (`accelerate launch`).

Each configuration runs the real command in a fresh process (fresh output folder), as a user
runs it. Two figures per configuration, medians over --repeats runs:
  end to end  64 / wall time, start-up and model loading included (what a user waits);
  rendering   63 / (wall time of 64 prompts - wall time of 1 prompt): the same start-up and load
              cancel out, leaving the rate at which images come once the model is loaded.
Each process gets --threads torch threads (default: the CPU cores shared out among the processes).
Configurations take turns, repeat after repeat, so a change in the machine's load hits all alike.

    python bench/batch_throughput.py                          # the built-in model, on the CPU
    python bench/batch_throughput.py --model sd15.safetensors --device cuda --batch-size 8
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from itertools import product
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPES, COLORS = ("circle", "square", "triangle", "cross"), ("red", "blue", "green", "orange")
PLACES, SIZES = ("on the left", "on the right", "at the top", "at the bottom"), ("large", "small")


def prompts(count: int) -> list[str]:
    """`count` different prompts in the built-in model's vocabulary (any model draws them)."""
    every = [f"a {size} {color} {shape} {place}, white background"
             for size, color, shape, place in product(SIZES, COLORS, SHAPES, PLACES)]
    return every[:count]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(file: Path, out: Path, processes: int, batch_size: int, args) -> list[str]:
    launch = [sys.executable, "-m", "ldm_cli"]
    if processes > 1:  # --multi_gpu is accelerate's torchrun launcher; it also runs CPU processes
        launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
                  str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                  "--main_process_port", str(free_port()), "-m", "ldm_cli"]
    extra = [flag for flag, value in (("--model", args.model), ("--steps", args.steps)) if value for flag in (flag, str(value))]
    return [*launch, "batch", str(file), "--out", str(out), "--batch-size", str(batch_size),
            "--device", args.device, "--quiet", *extra]


def timed(file: Path, processes: int, batch_size: int, args) -> float:
    threads = str(args.threads or max(1, os.cpu_count() // processes))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1"}
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        done = subprocess.run(command(file, Path(out), processes, batch_size, args), cwd=ROOT, env=env,
                              capture_output=True, text=True)
        wall = time.perf_counter() - start
        if done.returncode:
            sys.exit(f"failed: {' '.join(command(file, Path(out), processes, batch_size, args))}\n{done.stderr[-2000:]}")
        if len(list(Path(out).glob("*.png"))) != sum(1 for _ in file.open()):
            sys.exit("a run did not render every prompt exactly once")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="a checkpoint or diffusers folder (default: the built-in model)")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--batch-size", type=int, default=8, help="the batched configurations' --batch-size")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per process (default: cores / processes)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    configs = [(1, 1), (1, args.batch_size), (2, 1), (2, args.batch_size)]
    print_table(summarise(measure(configs, args), args), args)


def measure(configs: list[tuple[int, int]], args) -> dict[tuple, list[tuple[float, float]]]:
    """(wall time for all prompts, wall time for one prompt) per configuration and repeat."""
    walls: dict[tuple, list] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as folder:
        many, one = Path(folder) / "many.txt", Path(folder) / "one.txt"
        many.write_text("\n".join(prompts(args.prompts)) + "\n")
        one.write_text(prompts(1)[0] + "\n")
        for repeat in range(args.repeats):
            for config in configs:
                walls[config].append((timed(many, *config, args), timed(one, *config, args)))
                print(f"  repeat {repeat + 1}: {config[0]} process(es), batch size {config[1]}", file=sys.stderr, flush=True)
    return walls


def summarise(walls: dict[tuple, list[tuple[float, float]]], args) -> list[tuple]:
    rows = []
    for (processes, batch_size), runs in walls.items():
        wall = statistics.median(w for w, _ in runs)
        rate = statistics.median((args.prompts - 1) / (w - w1) for w, w1 in runs)
        rows.append((processes, batch_size, wall, args.prompts / wall, rate))
    return rows


def print_table(rows, args) -> None:
    print(f"\nldm batch: {args.prompts} prompts, model {args.model or 'built-in'}, steps {args.steps or 'model default'}, "
          f"device {args.device}, {args.threads or 'cores / processes'} torch thread(s) per process, median of {args.repeats}\n")
    print("| processes | --batch-size | wall s | images/s end to end | images/s rendering | rendering vs 1 process, batch 1 |")
    print("|---|---|---|---|---|---|")
    base = rows[0][4]
    for processes, batch_size, wall, end_to_end, rate in rows:
        print(f"| {processes} | {batch_size} | {wall:.1f} | {end_to_end:.2f} | {rate:.2f} | {rate / base:.2f}x |")


if __name__ == "__main__":
    main()
