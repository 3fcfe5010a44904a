"""bench/gpu_speed.py, the one command a GPU session runs, run here on tiny models on the CPU so
that the device's short time is never spent on a broken script."""
from __future__ import annotations

import importlib.util
import re
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


def bench_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # where its dataclasses look themselves up
    spec.loader.exec_module(module)
    return module


def gpu_speed():
    return bench_script("gpu_speed")


def fx_graph_cache(row: dict[str, str]) -> tuple[int, int]:
    """The FX graph cache's hits and misses a row's note reports."""
    return tuple(map(int, re.search(r"FX graph cache (\d+) hit, (\d+) miss", row["note"]).groups()))


@pytest.mark.slow
def test_tiny_benchmark_writes_every_row(tmp_path_factory):
    """Every model and variant asked for gets a row with its figures, and images match the stock
    pipeline's. (The run: tests/compile_cache.py.)"""
    _, table = compile_cache.bench_table(tmp_path_factory)
    assert "on CPU" in table and "failed" not in table
    rows = table_rows(table)
    for model, variants in (("SD1.5 (tiny)", VARIANTS), ("SDXL (tiny)", VARIANTS[:3])):  # SDXL: no --compile
        mine = {r["variant"]: r for r in rows if r["model"] == model}
        assert list(mine) == variants
        for variant in variants[1:]:
            assert float(mine[variant]["s/image"]) > 0
            assert int(mine[variant]["max diff vs stock /255"]) <= 2
        assert float(mine["ldm default"]["denoiser it/s"]) > 0 and mine["ldm default"]["it/s vs stock"].endswith("x")
    fp32 = [r for r in rows if "fp32" in r["model"]]
    assert [r["variant"] for r in fp32] == ["stock", "ldm default"]
    assert int(fp32[1]["max diff vs stock /255"]) <= 2


@pytest.mark.slow
def test_a_second_ldm_process_compiles_nothing(tmp_path_factory):
    """The promise of --compile, from an empty cache: ldm compiles the denoiser in the benchmark's
    process, and the fresh `ldm generate --compile` process after it finds everything compiled."""
    _, table = compile_cache.bench_table(tmp_path_factory)
    sd15 = {r["variant"]: r for r in table_rows(table) if r["model"] == "SD1.5 (tiny)"}
    hits, misses = fx_graph_cache(sd15["ldm --compile"])
    assert hits == 0 and misses >= 1
    hits, misses = fx_graph_cache(sd15[VARIANTS[-1]])
    assert hits >= 1 and misses == 0


def test_the_fp32_stage_puts_torchs_precision_settings_back_as_it_found_them():
    """Inductor's cache key holds the matmul precision: left changed by the fp32 parity stage, it
    made every model compiled after that stage miss the entries a fresh `ldm` process looks up."""
    script = gpu_speed()
    b = torch.backends

    def state():
        return (b.cuda.matmul.fp32_precision, b.cudnn.fp32_precision, b.cudnn.conv.fp32_precision,
                b.cudnn.rnn.fp32_precision, b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32)
    before = state()
    with script.true_fp32():
        assert b.cuda.matmul.fp32_precision == b.cudnn.conv.fp32_precision == "ieee"
    assert state() == before


def test_compile_models_picks_the_models_that_compile():
    script = gpu_speed()
    args = script.parse(["--models", "sd15,sdxl", "--compile-models", "sd15"])
    assert [(m.compile, m.fresh) for m in (script.for_model(args, "sd15"), script.for_model(args, "sdxl"))] == [
        (True, True), (False, False)]
    assert not script.for_model(script.parse(["--no-compile"]), "sd15").compile
    assert script.for_model(script.parse([]), "sdxl").compile


def test_flux_memory_dry_run_fills_every_row(tmp_path):
    """bench/flux_memory.py on a toy FLUX on the CPU: ldm's rows all render (offload hooks and
    float8 storage with the CPU as their device). diffusers' sequential offload cannot run with
    the CPU as its execution device (accelerate fails re-wrapping a parameter), so its rows say
    "failed" here; on a GPU they run."""
    out = tmp_path / "flux_memory.md"
    bench_script("flux_memory").main(["--tiny", "--device", "cpu", "--out", str(out)])
    rows = table_rows(out.read_text())
    assert [(r["flags"], r["side"]) for r in rows[:4]] == [
        ("(none)", "diffusers"), ("(none)", "ldm"), ("--weights fp8", "diffusers"), ("--weights fp8", "ldm")]
    assert len(rows) == 12
    for row in rows:
        if row["side"] == "diffusers" and "sequential" in row["flags"]:
            assert row["note"].startswith("failed")
            continue
        assert float(row["s/image"]) > 0 and row["note"] == "", row
        if row["side"] == "ldm":
            assert row["vs diffusers"].endswith("x") or "sequential" in row["flags"]
