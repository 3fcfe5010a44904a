"""Load time and peak memory of a full-size SD3.5 medium single file: wall time from process
start to the first transformer step, `ldm generate` against diffusers' single-file loading
(StableDiffusion3Pipeline.from_single_file, which reads the transformer with
SD3Transformer2DModel.from_single_file and the VAE likewise) with a local config folder, offline.

The file is made once (cached at --checkpoint) with random fp16 weights in Stability's layout:
the MMDiT (24 layers, 13 with dual attention, RMS q/k norms, the 384x384 position table) and the
16-channel VAE, as sd3.5_medium.safetensors ships, without text encoders. Full-size CLIP-L and
CLIP-G files (random, ComfyUI's layout, which is also Hugging Face's) go beside it: ldm takes
them with --text-encoder, diffusers from a folder with their configs. Both run without T5, so
the file is ~5 GB and the CLIPs ~1.6 GB. Each run is a fresh `python` process; a hook on the
first transformer call records the time and peak RSS and ends the process, so what is measured
is imports + loading + prompt encoding. One untimed run each first (page cache, ldm's hash
cache); then the two alternate run by run.

    python bench/sd35_load.py --runs 3                 # makes bench/out/sd35m/ on first use
    python bench/sd35_load.py --layers 6 --runs 1      # a smaller variant, where memory is short
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PROMPT = "a red fox in snow, detailed"
SD35_MEDIUM = {"pos_embed_max_size": 384, "qk_norm": "rms_norm"}  # over the shipped SD3 medium config

HOOK = """
import os, resource, sys, time, torch
def first_step(module, args):
    if type(module).__name__ == "SD3Transformer2DModel":
        usage = resource.getrusage(resource.RUSAGE_SELF)
        print(f"FIRST_STEP {time.monotonic()} {usage.ru_utime + usage.ru_stime} {usage.ru_maxrss / 2**20}", flush=True)
        os._exit(0)
torch.nn.modules.module.register_module_forward_pre_hook(first_step)
"""

LDM = HOOK + """
from ldm_cli.cli import main
_, prompt, checkpoint, config, out, dtype = sys.argv
sys.argv = ["ldm", "generate", prompt, "--model", checkpoint, "--text-encoder", f"{config}/text_encoder/model.safetensors",
            "--text-encoder", f"{config}/text_encoder_2/model.safetensors", "--out", out, "--steps", "28",
            "--dtype", dtype, "--quiet"]
main()
"""

DIFFUSERS = HOOK + """
from diffusers import StableDiffusion3Pipeline
from transformers import CLIPTextModelWithProjection
_, prompt, checkpoint, config, out, dtype = sys.argv
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
encoders = {name: CLIPTextModelWithProjection.from_pretrained(f"{config}/{name}", dtype=dtype, local_files_only=True)
            for name in ("text_encoder", "text_encoder_2")}
pipe = StableDiffusion3Pipeline.from_single_file(checkpoint, config=config, local_files_only=True, torch_dtype=dtype,
                                                 text_encoder_3=None, tokenizer_3=None, **encoders)
pipe(prompt, num_inference_steps=28, height=1024, width=1024)
"""


# -- making the file ----------------------------------------------------------------------------------
def shipped(name: str) -> dict:
    from ldm_cli.loading import recipe

    return recipe.read_json(recipe.config_file(recipe.SHIPPED / "sd3", name))


def transformer_config(layers: int) -> dict:
    """SD3.5 medium's (at full width; `layers` deep)."""
    return {**shipped("transformer"), **SD35_MEDIUM, "num_layers": layers,
            "dual_attention_layers": list(range(min(13, layers)))}


def layout(config: dict) -> dict[str, dict[str, tuple[int, ...]]]:
    """file -> original key -> shape, from the components built on the meta device."""
    from ldm_cli.loading import convert, keymap

    def shapes(slot, module):
        return {k: tuple(v.shape) for k, v in convert.export(slot, module).items()}

    model = {**shapes(keymap.MMDIT, convert.empty("transformer", config)),
             **shapes(keymap.VAE, convert.empty("vae", shipped("vae")))}
    clips = {name: shapes(keymap.Slot(name, "", "clip"), convert.empty(name, shipped(name)))
             for name in ("text_encoder", "text_encoder_2")}
    return {"model": model, **clips}


def random_fp16(key: str, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    """Small random weights; norms at one, so activations stay finite."""
    if any(n in key for n in ("norm", "ln_", "layer_norm")) and key.endswith("weight") and len(shape) == 1:
        return torch.ones(shape, dtype=torch.float16)
    return torch.empty(shape).normal_(0, 0.02, generator=generator).half()


def write_streamed(path: Path, shapes: dict[str, tuple[int, ...]], generator: torch.Generator) -> None:
    """A safetensors file written tensor by tensor: one tensor in memory at a time."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = 2 * int(torch.tensor(shape).prod()) if shape else 2
        header[key] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps({"__metadata__": {"format": "pt"}, **header}).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for key, shape in shapes.items():
            f.write(random_fp16(key, shape, generator).numpy().tobytes())
    tmp.replace(path)


def make(out: Path, layers: int) -> None:
    from ldm_cli.loading import recipe

    out.mkdir(parents=True, exist_ok=True)
    config = transformer_config(layers)
    files, generator = layout(config), torch.Generator().manual_seed(0)
    config_folder = out / "config"
    shutil.rmtree(config_folder, ignore_errors=True)
    shutil.copytree(recipe.SHIPPED / "sd3", config_folder)
    (config_folder / "transformer" / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer", "tokenizer_2"):
        shutil.copytree(recipe.TOKENIZER, config_folder / name)
    for name in ("text_encoder", "text_encoder_2"):
        write_streamed(config_folder / name / "model.safetensors", files[name], generator)
    write_streamed(out / "sd35m-random.safetensors", files["model"], generator)


# -- measuring -----------------------------------------------------------------------------------------
def run(script: str, checkpoint: Path, config: Path, out: str, dtype: str) -> tuple[float, float, float]:
    """(seconds from process start to the first transformer call, CPU seconds, peak RSS in GiB)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1"}
    start = time.monotonic()
    done = subprocess.run([sys.executable, "-c", script, PROMPT, str(checkpoint), str(config), out, dtype],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    line = next((x for x in done.stdout.splitlines() if x.startswith("FIRST_STEP")), None)
    if line is None:
        sys.exit(f"run failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    _, at, cpu, rss = line.split()
    return float(at) - start, float(cpu), float(rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "sd35m",
                        help="where the file and its config folder are made once and kept")
    parser.add_argument("--layers", type=int, default=24, help="MMDiT depth (24: SD3.5 medium; less for a smaller run)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="compute dtype of both loaders")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    checkpoint, config = args.out / "sd35m-random.safetensors", args.out / "config"
    made = (config / "transformer" / "config.json")
    if not checkpoint.exists() or not made.exists() or json.loads(made.read_text())["num_layers"] != args.layers:
        started = time.monotonic()
        make(args.out, args.layers)
        print(f"made {checkpoint} ({checkpoint.stat().st_size / 1e9:.2f} GB) in {time.monotonic() - started:.0f} s")
    tools = {"ldm generate": LDM, "diffusers from_single_file": DIFFUSERS}
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name in tools}
    with tempfile.TemporaryDirectory() as out:
        for script in tools.values():  # warm-up: page cache, ldm's hash cache
            run(script, checkpoint, config, out, args.dtype)
        for _ in range(args.runs):
            for name, script in tools.items():
                results[name].append(run(script, checkpoint, config, out, args.dtype))
    report(results, checkpoint, args)


def report(results: dict[str, list[tuple[float, float, float]]], checkpoint: Path, args) -> None:
    size = checkpoint.stat().st_size / 1e9
    print(f"{checkpoint.name} ({size:.2f} GB fp16, {args.layers} layers) + CLIP-L/G files, no T5, {args.dtype} on CPU, "
          f"{os.cpu_count()} cores; medians of {args.runs} runs after one warm-up run each\n")
    print(f"{'loader':<28}{'start -> first step (s)':>24}{'CPU (s)':>9}{'peak RSS (GiB)':>16}   runs (s)")
    medians = {}
    for name, runs in results.items():
        wall, cpu, rss = (statistics.median(r[i] for r in runs) for i in range(3))
        medians[name] = (wall, rss)
        print(f"{name:<28}{wall:>24.1f}{cpu:>9.1f}{rss:>16.2f}   {' '.join(f'{r[0]:.1f}' for r in runs)}")
    (ldm_wall, ldm_rss), (their_wall, their_rss) = medians.values()
    print(f"\nldm / diffusers: wall {ldm_wall / their_wall:.2f}, peak RSS {ldm_rss / their_rss:.2f}  (goal: RSS 1.00 or less)")


if __name__ == "__main__":
    main()
