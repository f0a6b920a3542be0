# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs. torch==2.13.0 is pinned explicitly (the build
# pip's index offers: a local CPU wheel store's CPU wheel, plain PyPI's CUDA-bundled one; see the
# README's Set-up); pyproject keeps `torch>=2.3` for users with their own CUDA builds.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test install clean docs celleval

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# cell-eval (for the cross-check test and benchmarks/evaluate_vs_celleval.py) needs scipy>=1.17,
# which conflicts with the scipy<1.15 pin above, so it gets its own environment.
CELLEVAL_VENV := .venv-celleval
$(CELLEVAL_VENV)/.installed:
	$(PYTHON) -m venv $(CELLEVAL_VENV)
	$(CELLEVAL_VENV)/bin/pip install -q --upgrade pip
	$(CELLEVAL_VENV)/bin/pip install -q "cell-eval==0.8.2"
	touch $@

celleval: $(CELLEVAL_VENV)/.installed

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/pipeline.sh demo

# The cell-eval cross-check runs in the suite too (its environment is built once, ~2-4 minutes).
test: $(STAMP) $(CELLEVAL_VENV)/.installed
	$(BIN)/python -m pytest -q

docs: $(STAMP)
	$(BIN)/python -m regina_cli.config > docs/configuration.md
	$(BIN)/python examples/configs/generate.py

clean:
	rm -rf $(VENV) $(CELLEVAL_VENV) data runs
