# Two entry points (see README): `make demo` and `make test`. Both create .venv when it is missing.
PYTHON ?= python3
VENV   ?= .venv
TORCH  ?= torch==2.13.0
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)

.PHONY: demo test test-all env clean-env gpu-check validator

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
test: $(STAMP) validator
	$(BIN)/python -m pytest -m "not slow and not gpu" $(ARGS)

# The Khronos glTF validator (npm package) that tests/test_animate.py runs on every exported GLB; skipped
# (and the tests say so) where npm is missing.
VALIDATOR_DIR := .ci/node
validator:
	@if command -v npm >/dev/null 2>&1; then \
	  test -f $(VALIDATOR_DIR)/node_modules/gltf-validator/package.json || \
	  npm install --silent --no-audit --no-fund --prefix $(VALIDATOR_DIR) gltf-validator@2.0.0-dev.3.10 || \
	  echo "could not install gltf-validator with npm: the glTF validator tests will be skipped"; \
	else echo "npm not found: the glTF validator tests will be skipped"; fi

# Everything, including the slow end-to-end learning check and (where CUDA exists) GPU tests.
test-all: $(STAMP) validator
	$(BIN)/python -m pytest $(ARGS)

# The GPU path in one call on a GPU machine (README, "Checking a GPU machine"): its own python3, no .venv.
gpu-check:
	PYTHON=$(PYTHON) bash bench/gpu_check.sh $(ARGS)

clean-env:
	rm -rf $(VENV)
