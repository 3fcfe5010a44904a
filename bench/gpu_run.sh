#!/usr/bin/env bash
# The one command a session with a lent GPU runs (README: "Speed on a GPU", "Memory: FLUX in the
# GPU you have"). The device image has torch but not diffusers: this installs the diffusers wheel
# carried in .whl/, then runs one benchmark inside the device's time and leaves in $OUT its table
# (<bench>.md), the full log (<bench>.log) and the GPU's description (gpu.txt). BENCH picks it:
# gpu_speed (SD1.5 and SDXL against stock, the default) or flux_memory (FLUX.1 dev's memory flags
# against FluxPipeline). From the device tool:
#     run(command="bash bench/gpu_run.sh", carry=[".whl"], timeout_s=560)
#     run(command="BENCH=flux_memory bash bench/gpu_run.sh", carry=[".whl"], timeout_s=560)
# Locally, for a dry run of the script itself:
#     PYTHON=.venv/bin/python BENCH_ARGS="--tiny --device cpu --runs 1" bash bench/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
OUT="${OUT:-bench/out}"
BENCH="${BENCH:-gpu_speed}"
SITE="${SITE:-/tmp/ldm-site}"
mkdir -p "$OUT"
"$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl \
    || { echo "gpu_run: could not install the wheels in .whl/ (carry .whl; README says how to build it)"; exit 1; }
# ldm from this checkout; the cache starts empty, so the first --compile run compiles for real
export PYTHONPATH="$SITE:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TQDM_DISABLE=1 LDM_CACHE_DIR="${LDM_CACHE_DIR:-/tmp/ldm-cache}"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv >"$OUT/gpu.txt" 2>&1
"$PYTHON" -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"
# the table is rewritten after every stage: a run cut short by the timeout keeps what it measured
timeout "${BENCH_SECONDS:-480}" "$PYTHON" "bench/$BENCH.py" --out "$OUT/$BENCH.md" ${BENCH_ARGS:-} 2>&1 \
    | tee "$OUT/$BENCH.log"
status=$?
cat "$OUT/$BENCH.md" 2>/dev/null
exit $status
