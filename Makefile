# Two commands on a fresh machine: `make spectrum` and `make test`.
# Each creates .venv when it is missing and installs what it needs into it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
OUTPUT_DIR ?= results/default

.PHONY: install test spectrum benchmark clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The stamp is remade when setup.py changes, so new dependencies get installed.
$(VENV)/.installed: $(BIN)/python setup.py
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q tests

spectrum: install
	$(BIN)/hessian-spectrum --output_dir=$(OUTPUT_DIR)
	@echo "Results: $(OUTPUT_DIR)/spectrum.npz, $(OUTPUT_DIR)/summary.json, $(OUTPUT_DIR)/density.png"

benchmark: install
	$(BIN)/python benchmarks/core.py

clean:
	rm -rf $(VENV) results *.egg-info
