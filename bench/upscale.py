"""`ldm upscale`'s cost on the CPU with a full-size 4x ESRGAN (23 RRDB blocks, 64 filters: the
architecture of 4x-UltraSharp and RealESRGAN x4plus, random weights): the whole image in one
call against tiles of several sizes, with the tiled output's largest and mean difference from
the whole one, and the process's peak memory for each.

    python bench/upscale.py [--side 256] [--tiles 128 64]   # --side 128 --tiles 64: 1.5 minutes here
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ONE = """
import resource, sys, time, numpy as np
from PIL import Image
from ldm_cli import upscaling
model, source, tile, out = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
up = upscaling.load(model, device="cpu")
image = Image.open(source).convert("RGB")
start = time.perf_counter()
result = upscaling.upscale(up, image, (image.width * 4, image.height * 4), tile=tile, overlap=min(32, tile // 4))
seconds = time.perf_counter() - start
result.save(out)
print(seconds, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def full_esrgan(path: Path) -> None:
    import torch

    from ldm_cli.libraries import import_spandrel

    import_spandrel()
    from spandrel.architectures.ESRGAN import ESRGAN
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = ESRGAN(num_filters=64, num_blocks=23, scale=4)  # spandrel's init; the residuals keep it an upscaler
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))


def timed(model: Path, source: Path, tile: int, out: Path) -> tuple[float, float]:
    """(seconds upscaling, peak resident GB) of one run in a fresh process."""
    done = subprocess.run([sys.executable, "-c", ONE, str(model), str(source), str(tile), str(out)],
                          capture_output=True, text=True, cwd=ROOT, check=True)
    seconds, peak_kb = done.stdout.split()[-2:]
    return float(seconds), int(peak_kb) / 2**20


def main() -> None:
    import numpy as np
    from PIL import Image

    parser = argparse.ArgumentParser()
    parser.add_argument("--side", type=int, default=256)
    parser.add_argument("--tiles", type=int, nargs="+", default=[128, 64])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        full_esrgan(tmp / "4x.safetensors")
        source = tmp / "in.png"
        Image.linear_gradient("L").resize((args.side, args.side)).convert("RGB").rotate(30).save(source)
        whole_s, whole_gb = timed(tmp / "4x.safetensors", source, args.side, tmp / "whole.png")
        whole = np.asarray(Image.open(tmp / "whole.png")).astype(int)
        print("| tile | seconds | peak GB | max diff | mean diff |\n|---|---|---|---|---|")
        print(f"| whole {args.side} | {whole_s:.1f} | {whole_gb:.2f} | - | - |")
        for tile in args.tiles:
            seconds, gb = timed(tmp / "4x.safetensors", source, tile, tmp / f"t{tile}.png")
            diff = np.abs(np.asarray(Image.open(tmp / f"t{tile}.png")).astype(int) - whole)
            print(f"| {tile} (overlap {min(32, tile // 4)}) | {seconds:.1f} | {gb:.2f} | {diff.max()} | {diff.mean():.3f} |")


if __name__ == "__main__":
    main()
