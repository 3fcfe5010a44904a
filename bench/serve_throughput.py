"""`ldm serve` against `ldm generate` processes: the same images (built-in model, its 64x64, 20
steps, seeds 1..N), one client and 4 concurrent ones; requests per second and latency. The
server pays start-up once; each `ldm generate` pays imports and loading per image.

    python bench/serve_throughput.py --images 16

Every server image is checked pixel-identical to the CLI's of the same seed. The server has one
worker (one device), so 4 clients share it: their gain is the queue kept full, not parallel work.
"""
from __future__ import annotations

import argparse
import base64
import io
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

PROMPT = "a red circle"


def serve() -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen([sys.executable, "-m", "ldm_cli", "serve", "--port", "0"], stdout=subprocess.PIPE,
                               text=True)
    url = process.stdout.readline().split()[2]
    return process, url


def request(url: str, seed: int) -> tuple[float, Image.Image]:
    start = time.perf_counter()
    r = httpx.post(f"{url}/sdapi/v1/txt2img", json={"prompt": PROMPT, "seed": seed, "width": 64, "height": 64,
                                                     "steps": 20, "cfg_scale": 5, "sampler_name": "DPM++ 2M"},
                   timeout=600)
    r.raise_for_status()
    return time.perf_counter() - start, Image.open(io.BytesIO(base64.b64decode(r.json()["images"][0])))


def generate(seed: int, out: Path) -> tuple[float, Image.Image]:
    start = time.perf_counter()
    folder = out / str(seed)
    subprocess.run([sys.executable, "-m", "ldm_cli", "generate", PROMPT, "--seed", str(seed), "--quiet",
                    "--out", str(folder)], check=True, stdout=subprocess.DEVNULL)
    took = time.perf_counter() - start
    return took, Image.open(next(folder.glob("*.png")))


def timed(run, seeds: list[int], clients: int) -> tuple[float, list[float], dict[int, Image.Image]]:
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = list(pool.map(run, seeds))
    return time.perf_counter() - start, [t for t, _ in done], {s: im for s, (_, im) in zip(seeds, done)}


def row(name: str, images: int, wall: float, latencies: list[float]) -> str:
    p95 = sorted(latencies)[max(0, round(0.95 * len(latencies)) - 1)]
    return (f"{name:<34}{images:>7}{wall:>9.1f}{images / wall:>9.2f}"
            f"{statistics.median(latencies):>12.2f}{p95:>9.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()
    seeds = list(range(1, args.images + 1))
    rows, reference = [], {}
    with tempfile.TemporaryDirectory() as work:
        for clients in (1, 4):
            wall, latencies, images = timed(lambda s: generate(s, Path(work) / f"c{clients}"), seeds, clients)
            reference.update(images)
            rows.append(row(f"ldm generate, {clients} process(es) at once", len(seeds), wall, latencies))
        process, url = serve()
        try:
            request(url, 0)  # the model loads on the first request: not counted
            for clients in (1, 4):
                wall, latencies, images = timed(lambda s: request(url, s), seeds, clients)
                for seed, image in images.items():
                    assert np.array_equal(np.asarray(image), np.asarray(reference[seed])), f"seed {seed} differs"
                rows.append(row(f"ldm serve, {clients} client(s)", len(seeds), wall, latencies))
        finally:
            process.terminate()
            process.wait(30)
    print(f"{'':<34}{'images':>7}{'wall s':>9}{'img/s':>9}{'median s':>12}{'p95 s':>9}")
    print("\n".join(rows))
    print("server images pixel-identical to the CLI's: yes")


if __name__ == "__main__":
    main()
