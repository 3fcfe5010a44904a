"""bench/gpu_speed.py, the one command a GPU session runs, run here on tiny models on the CPU so
that the device's short time is never spent on a broken script."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
VARIANTS = ["stock", "ldm, no fast path", "ldm default", "ldm --compile",
            "fresh process --compile, warm cache: start to image"]


def table_rows(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    columns = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(columns, (c.strip() for c in line.strip("|").split("|")))) for line in lines[1:]]


@pytest.mark.slow
def test_tiny_benchmark_writes_every_row(tmp_path, request):
    """Every model and variant gets a row with its figures, images match the stock pipeline's,
    and the fresh process finds everything it runs already compiled. The compile cache persists
    in pytest's cache folder: a first run compiles for minutes, later ones take about a minute."""
    out = tmp_path / "gpu_speed.md"
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "OUT")}
    env.update(HF_HUB_OFFLINE="1", TQDM_DISABLE="1", LDM_CACHE_DIR=str(request.config.cache.mkdir("ldm-cache")))
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_speed.py"), "--tiny", "--device", "cpu",
                           "--runs", "1", "--out", str(out)], capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    text = out.read_text()
    assert "on CPU" in text and "failed" not in text
    rows = table_rows(text)
    for model in ("SD1.5 (tiny)", "SDXL (tiny)"):
        mine = {r["variant"]: r for r in rows if r["model"] == model}
        assert list(mine) == VARIANTS
        for variant in VARIANTS[1:]:
            assert float(mine[variant]["s/image"]) > 0
            assert int(mine[variant]["max diff vs stock /255"]) <= 2
        assert float(mine["ldm default"]["denoiser it/s"]) > 0 and mine["ldm default"]["it/s vs stock"].endswith("x")
        assert "0 miss" in mine[VARIANTS[-1]]["note"]  # a second process compiles nothing
    fp32 = [r for r in rows if "fp32" in r["model"]]
    assert [r["variant"] for r in fp32] == ["stock", "ldm default"]
    assert int(fp32[1]["max diff vs stock /255"]) <= 2
