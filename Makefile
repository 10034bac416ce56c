# The README's two commands. Both bootstrap .venv on a fresh machine with only Python installed.
# torch is installed first, pinned, so that pip keeps it when it installs the project:
# the default is the CPU build; for a GPU machine pass e.g.
#   make demo TORCH_SPEC="torch --index-url https://download.pytorch.org/whl/cu128"
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.weightwise-installed

.PHONY: setup demo test quick lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# The environment alone (.venv with CPU torch and weightwise[dev]), without running anything.
setup: $(STAMP)
	@echo "environment ready: $(VENV) (activate with: . $(VENV)/bin/activate)"

# The main job: the equal-compute benchmark's short version (4 methods, 1 seed) on the built-in corpus.
demo: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m benchmarks.equal_compute --demo --out runs/equal_compute_demo

test: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest

# The inner loop: everything but the multi-process and model-loading runs (76 s on a 2-core VM, 2026-12-07, 653 tests).
quick: $(STAMP)
	HF_HUB_OFFLINE=1 WANDB_MODE=offline $(PY) -m pytest -m "not slow" -q

lint: $(STAMP)
	$(PY) -m ruff check src tests examples benchmarks

bench: $(STAMP)
	$(PY) -m benchmarks.score_store

clean:
	rm -rf $(VENV) lightning_logs wandb runs .pytest_cache
