# Everything a fresh machine needs: `make demo` renders with the built-in model, `make test` runs the suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU build of torch; a GPU user installs a CUDA build first instead (README).
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install test quick demo bench builtin clean

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps "spandrel>=0.4,<0.5"
	# k-diffusion (MIT), the samplers' test reference, without the dependencies it declares (torchvision,
	# wandb, clean-fid...): the tests load only its sampling.py, whose imports the test extra covers
	$(BIN)/pip install -q --no-deps "k-diffusion==0.1.1.post1"
	touch $(STAMP)

# One test process per core (each runs torch on one thread); the 25 slowest tests listed, so the
# slow ones are seen. CI runs this: every test, the slow ones too.
test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n auto --durations=25

# The everyday run: all but the tests marked slow (parity sweeps, real clients, compiling).
quick: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -n auto -m "not slow"

demo: install
	$(BIN)/ldm generate "a large red circle on the left, white background" --num-images 4 --seed 1 --out outputs/demo

bench: install
	$(BIN)/python bench/generate_vs_diffusers.py

# Retrain the built-in model from scratch into runs/builtin and export it over the shipped file
# (README: "The built-in model"). Every stage resumes where it stopped if interrupted.
TRAIN := $(BIN)/python -m ldm_cli.demo.train --out runs/builtin
builtin: install
	$(TRAIN) vae
	$(TRAIN) latents
	$(TRAIN) text
	$(TRAIN) denoiser
	$(TRAIN) export
	$(BIN)/python bench/builtin_quality.py --grid docs/builtin-grid.png

clean:
	rm -rf $(VENV) outputs .pytest_cache
