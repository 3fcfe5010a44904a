"""Commands that answer from a table or a PNG's text never import torch or diffusers (seconds)."""
import json
import os
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
    cli.app()
except SystemExit as e:
    assert e.code == 0, e.code
heavy = [name for name in ("torch", "diffusers", "transformers", "pydantic") if name in sys.modules]
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


PRINT_MODULES = CHECK.replace("assert not heavy, heavy", "print(heavy)")


@pytest.mark.parametrize("family", ["sd1", "sd3"])
def test_info_of_a_checkpoint_imports_no_torch_once_its_architecture_is_known(family, request, tmp_path):
    """The first `ldm info` of an architecture builds its components on the meta device (torch) and
    keeps their weight tables; every later one, and every load, reads the tables instead."""
    from tests import original_layout

    path = tmp_path / f"{family}.safetensors"
    folder = request.getfixturevalue(f"{family}_folder")
    original_layout.write(folder, path, family, metadata=original_layout.ldm_metadata(folder, family))
    env = {**os.environ, "LDM_CACHE_DIR": str(tmp_path / "cache")}
    runs = [subprocess.run([sys.executable, "-c", PRINT_MODULES, "info", str(path), "--json"], capture_output=True,
                           text=True, env=env) for _ in range(2)]
    assert all(r.returncode == 0 for r in runs), runs[0].stderr + runs[1].stderr
    first, second = (r.stdout.rsplit("\n", 2) for r in runs)
    assert "torch" in first[1] and second[1] == "[]"  # the second run imported none of them
    assert first[0] == second[0] and json.loads(second[0])["parameters_vae"] > 0


FAILS = CHECK.replace("assert e.code == 0, e.code", "assert e.code == 2, e.code")


@pytest.mark.parametrize("case", ["not a model", "cut short", "unknown LoRA"])
def test_a_wrong_file_fails_before_torch_is_imported(case, tmp_path):
    """The model file's header, and the LoRAs the prompt names, are checked before torch loads
    (over a second): a wrong one fails at once, in one line."""
    from safetensors.numpy import save_file
    import numpy as np

    model = tmp_path / "model.safetensors"
    save_file({"some.other.weight": np.zeros((4, 4), np.float16)}, str(model))
    args = ["generate", "a fox", "--model", str(model), "--out", str(tmp_path / "o")]
    if case == "cut short":
        from ldm_cli.loading import BUILTIN

        model.write_bytes(BUILTIN.read_bytes()[:-100])
    if case == "unknown LoRA":
        args[1:4] = ["a fox <lora:nowhere:1>"]
    result = subprocess.run([sys.executable, "-c", FAILS, *args], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("ldm: error:"), result.stderr
