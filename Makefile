# Two entry points for a fresh machine:  `make run`  (main job, default config)  and  `make test`.
PY      ?= python3
VENV    ?= .venv
# A CPU build by default; set TORCH='torch' (or a CUDA index) on a GPU machine.
TORCH   ?= torch==2.13.0
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed

.PHONY: setup run test bench figures clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH)"
	$(BIN)/python -m pip install --quiet -e ".[all]"
	touch $(STAMP)

setup: $(STAMP)

run: $(STAMP)
	$(BIN)/sfed-validate

test: $(STAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider

bench: $(STAMP)
	$(BIN)/python bench/bench_theory.py
	$(BIN)/python bench/bench_harness.py
	$(BIN)/python bench/bench_adaptive.py

figures: $(STAMP)
	$(BIN)/sfed-figures

clean:
	rm -rf $(VENV) build *.egg-info
