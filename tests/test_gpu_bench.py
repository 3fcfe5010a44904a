"""bench/gpu_speed.py, the one command a GPU session runs, run here on tiny models on the CPU so
that the device's short time is never spent on a broken script."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests import compile_cache

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["stock", "ldm, no fast path", "ldm default", "ldm --compile",
            "fresh process --compile, warm cache: start to image"]


def table_rows(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    columns = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(columns, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


def gpu_speed():
    spec = importlib.util.spec_from_file_location("gpu_speed", ROOT / "bench" / "gpu_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_speed"] = module  # where its dataclasses look themselves up
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_tiny_benchmark_writes_every_row(tmp_path_factory, sd1_folder, tmp_path):
    """Every model and variant asked for gets a row with its figures, images match the stock
    pipeline's, and the fresh process finds everything it runs already compiled. Only SD1.5
    compiles, and its U-Net is the tests' tiny SD1 one: tests/compile_cache.py's first process has
    compiled it, so the run takes seconds where a cold compile of each model would take minutes."""
    cache, _ = compile_cache.first_run(tmp_path_factory, sd1_folder)
    out = tmp_path / "gpu_speed.md"
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_speed.py"), "--tiny", "--device", "cpu",
                           "--runs", "1", "--compile-models", "sd15", "--out", str(out)],
                          capture_output=True, text=True, env=compile_cache.environment(cache), timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "on CPU" in text and "failed" not in text
    rows = table_rows(text)
    sd15 = {r["variant"]: r for r in rows if r["model"] == "SD1.5 (tiny)"}
    for model, variants in (("SD1.5 (tiny)", VARIANTS), ("SDXL (tiny)", VARIANTS[:3])):  # SDXL: no --compile
        mine = {r["variant"]: r for r in rows if r["model"] == model}
        assert list(mine) == variants
        for variant in variants[1:]:
            assert float(mine[variant]["s/image"]) > 0
            assert int(mine[variant]["max diff vs stock /255"]) <= 2
        assert float(mine["ldm default"]["denoiser it/s"]) > 0 and mine["ldm default"]["it/s vs stock"].endswith("x")
    assert "0 miss" in sd15[VARIANTS[-1]]["note"]  # a second process compiles nothing
    fp32 = [r for r in rows if "fp32" in r["model"]]
    assert [r["variant"] for r in fp32] == ["stock", "ldm default"]
    assert int(fp32[1]["max diff vs stock /255"]) <= 2


def test_the_fp32_stage_puts_torchs_precision_settings_back_as_it_found_them():
    """Inductor's cache key holds the matmul precision: left changed by the fp32 parity stage, it
    made every model compiled after that stage miss the entries a fresh `ldm` process looks up."""
    bench = gpu_speed()
    b = torch.backends

    def state():
        return (b.cuda.matmul.fp32_precision, b.cudnn.fp32_precision, b.cudnn.conv.fp32_precision,
                b.cudnn.rnn.fp32_precision, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
    before = state()
    with bench.true_fp32():
        assert b.cuda.matmul.fp32_precision == b.cudnn.conv.fp32_precision == "ieee"
    assert state() == before


def test_compile_models_picks_the_models_that_compile():
    bench = gpu_speed()
    args = bench.parse(["--models", "sd15,sdxl", "--compile-models", "sd15"])
    assert [(m.compile, m.fresh) for m in (bench.for_model(args, "sd15"), bench.for_model(args, "sdxl"))] == [
        (True, True), (False, False)]
    assert not bench.for_model(bench.parse(["--no-compile"]), "sd15").compile
    assert bench.for_model(bench.parse([]), "sdxl").compile
