# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs. torch==2.13.0 is passed explicitly so pip
# takes the CPU wheel; pyproject keeps `torch>=2.3` for users with their own CUDA builds.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
TORCH ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: demo test install clean docs

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)" -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" bash examples/pipeline.sh demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

docs: $(STAMP)
	$(BIN)/python -m regina_cli.config > docs/configuration.md

clean:
	rm -rf $(VENV) data runs
