"""Commands that answer from a table or a PNG's text never import torch or diffusers (seconds)."""
import subprocess
import sys

import pytest
from PIL import Image

from ldm_cli.images import png_info

CHECK = """
import sys
from ldm_cli import cli
sys.argv = ["ldm", *sys.argv[1:]]
try:
    cli.main()
except SystemExit as e:
    assert e.code == 0, e.code
heavy = [name for name in ("torch", "diffusers", "transformers") if name in sys.modules]
assert not heavy, heavy
"""


@pytest.mark.parametrize("args", [["schedulers"], ["info", "{png}"], ["info", "{png}", "--json"], ["--version"],
                                  ["upscale", "{png}", "--upscaler", "Lanczos", "--scale", "2", "--out", "{out}"]])
def test_quick_commands_import_no_heavy_library(args, tmp_path):
    png = tmp_path / "a1111.png"
    Image.new("RGB", (8, 8)).save(png, pnginfo=png_info({"parameters": (
        "a cat\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 512x512")}))
    result = subprocess.run([sys.executable, "-c", CHECK, *(a.format(png=png, out=tmp_path / "o") for a in args)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout  # it answered
