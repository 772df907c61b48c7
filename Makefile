# Two entry points (see README): `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: demo test test-all env clean-env gpu-check

env: $(STAMP)

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	rm -f $(VENV)/.installed-* && touch $@

demo: $(STAMP)
	$(BIN)/dualpm-demo $(ARGS)

# Default suite: every module on CPU, plus the Slurm tests (they skip with a reason where Slurm cannot start).
test: $(STAMP)
	$(BIN)/python -m pytest -m "not slow and not gpu" $(ARGS)

# Everything, including the slow end-to-end learning check and (where CUDA exists) GPU tests.
test-all: $(STAMP)
	$(BIN)/python -m pytest $(ARGS)

# The GPU path in one call on a GPU machine (README, "Checking a GPU machine"): its own python3, no .venv.
gpu-check:
	PYTHON=$(PYTHON) bash bench/gpu_check.sh $(ARGS)

clean-env:
	rm -rf $(VENV)
