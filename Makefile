# Two commands on a fresh machine: `make spectrum` and `make test`.
# Each creates .venv when it is missing and installs what it needs into it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
OUTPUT_DIR ?= results/default

.PHONY: install test spectrum benchmark benchmark-pyhessian benchmark-memory clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# The stamp is remade when setup.py changes, so new dependencies get installed.
$(VENV)/.installed: $(BIN)/python setup.py
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q -n auto --dist loadfile tests

spectrum: install
	$(BIN)/hessian-spectrum --output_dir=$(OUTPUT_DIR)
	@echo "Results: $(OUTPUT_DIR)/spectrum.npz, $(OUTPUT_DIR)/summary.json, $(OUTPUT_DIR)/density.png"

benchmark: install
	$(BIN)/python benchmarks/core.py

# Side by side with PyHessian (installs torch and pyhessian into .venv on demand).
benchmark-pyhessian: install
	$(BIN)/python benchmarks/pyhessian_compare.py

benchmark-memory: install
	$(BIN)/python benchmarks/memory.py

clean:
	rm -rf $(VENV) results *.egg-info

# ------------------------------------------------------------ paper experiments
# experiment-bn: the small digits CNN with BN, without, and with population-BN
# statistics (seeded), spectra along training, one comparison figure (a few
# minutes on 2 CPU cores). experiment-accuracy: exact eigenvalues of the digits
# MLP (dense float64 Hessian) against the spectrum binary's SLQ (about 15 minutes).
EXPERIMENT_BN_DIR ?= results/experiment_bn
EXPERIMENT_ACCURACY_DIR ?= results/experiment_accuracy

.PHONY: experiment-bn experiment-accuracy

experiment-bn: install
	for variant in bn no_bn population_bn; do \
	  rm -rf $(EXPERIMENT_BN_DIR)/$$variant; \
	  $(BIN)/python -m hessian_tf.bin.train --config=configs/cnn_digits.py:$$variant \
	    --workdir=$(EXPERIMENT_BN_DIR)/$$variant || exit 1; \
	done
	$(BIN)/python experiments/bn_comparison.py --output_dir=$(EXPERIMENT_BN_DIR) \
	  $(EXPERIMENT_BN_DIR)/bn $(EXPERIMENT_BN_DIR)/no_bn $(EXPERIMENT_BN_DIR)/population_bn

experiment-accuracy: install
	$(BIN)/python experiments/accuracy.py --output_dir=$(EXPERIMENT_ACCURACY_DIR)
