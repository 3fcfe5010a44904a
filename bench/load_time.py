"""Load time of a full-size SD1.5 single file: wall time from process start to the first
denoising step, `ldm generate` against diffusers' from_single_file with a local config folder.

Each run is a fresh `python` process; a hook on the first UNet call (registered as torch
loads, so neither side imports torch sooner than it would) records the time and ends the
process, so what is measured is imports + loading + prompt encoding, not sampling. Both sides
load in fp32 on the CPU (ldm's choice there), read the same file from a warm page cache (one
untimed run each first, which also fills ldm's hash cache), and alternate run by run.
Peak RSS shows what loading costs in memory.

    python bench/make_sd15_checkpoint.py     # once: bench/out/sd15-random.safetensors
    python bench/load_time.py --runs 5
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
OUT = ROOT / "bench" / "out"
PROMPT = "a red fox in snow, detailed"

HOOK = """
import importlib.util, os, resource, sys, time
def first_step(module, args):
    if type(module).__name__ == "UNet2DConditionModel":
        usage = resource.getrusage(resource.RUSAGE_SELF)
        print(f"FIRST_STEP {time.monotonic()} {usage.ru_utime + usage.ru_stime} {usage.ru_maxrss / 2**20}", flush=True)
        os._exit(0)
class HookWhenTorchLoads:  # importing torch here would hide what the loader does before it
    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run = spec.loader.exec_module
        def exec_module(module):
            run(module)
            module.nn.modules.module.register_module_forward_pre_hook(first_step)
        spec.loader.exec_module = exec_module
        return spec
sys.meta_path.insert(0, HookWhenTorchLoads())
"""

LDM = HOOK + """
from ldm_cli.cli import main
sys.argv = ["ldm", "generate", sys.argv[1], "--model", sys.argv[2], "--out", sys.argv[4], "--steps", "20", "--quiet"]
main()
"""

DIFFUSERS = HOOK + """
import torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_single_file(sys.argv[2], config=sys.argv[3], local_files_only=True,
                                                torch_dtype=torch.float32)
pipe(sys.argv[1], num_inference_steps=20, height=512, width=512)
"""


def run(script: str, checkpoint: Path, config: Path, out: str) -> tuple[float, float, float]:
    """(seconds from process start to the first UNet call, CPU seconds, peak RSS in GiB)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script, PROMPT, str(checkpoint), str(config), out],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((x for x in done.stdout.splitlines() if x.startswith("FIRST_STEP")), None)
    if line is None:
        sys.exit(f"run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    _, at, cpu, rss = line.split()
    return float(at) - start, float(cpu), float(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, default=OUT / "sd15-random.safetensors")
    parser.add_argument("--config", type=Path, default=OUT / "sd15-config")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    if not args.checkpoint.exists():
        sys.exit(f"{args.checkpoint} not found; run python bench/make_sd15_checkpoint.py first")
    tools = {"ldm generate": LDM, "diffusers from_single_file": DIFFUSERS}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in tools}
    with tempfile.TemporaryDirectory() as out:
        for name, script in tools.items():  # warm-up: page cache, ldm's hash cache
            run(script, args.checkpoint, args.config, out)
        for _ in range(args.runs):
            for name, script in tools.items():
                results[name].append(run(script, args.checkpoint, args.config, out))
    report(results, args)


def report(results: dict[str, list[tuple[float, float, float]]], args) -> None:
    size = args.checkpoint.stat().st_size / 1e9
    print(f"{args.checkpoint.name} ({size:.2f} GB fp16), fp32 on CPU, {os.cpu_count()} cores; "
          f"medians of {args.runs} runs after one warm-up run each\n")
    print(f"{'loader':<28}{'start -> first step (s)':>24}{'CPU (s)':>9}{'peak RSS (GiB)':>16}   runs (s)")
    medians = {}
    for name, runs in results.items():
        wall, cpu, rss = (statistics.median(r[i] for r in runs) for i in range(3))
        medians[name] = wall
        print(f"{name:<28}{wall:>24.1f}{cpu:>9.1f}{rss:>16.2f}   {' '.join(f'{r[0]:.1f}' for r in runs)}")
    ratio = medians["ldm generate"] / medians["diffusers from_single_file"]
    print(f"\nldm / diffusers (wall) = {ratio:.2f}  (goal: 0.50 or less)")


if __name__ == "__main__":
    main()
