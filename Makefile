# One way to run anything. `make demo` and `make test` set up .venv when it is missing.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

export RAY_USAGE_STATS_ENABLED := 0
export RAY_AUTH_MODE ?= disabled
export MLFLOW_DISABLE_TELEMETRY := true
export PYTHONUNBUFFERED := 1

.PHONY: setup demo test test-fast bench quality clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# CPU torch first where no CUDA is present, so the project's `torch` requirement
	# is already satisfied and pip never pulls a multi-GB CUDA build.
	if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"; \
	else \
	  $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)+cpu" \
	  || $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)+cpu" --index-url https://download.pytorch.org/whl/cpu; \
	fi
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/ensemble submit experiment=demo

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

bench: $(STAMP)
	# torchensemble without its dependencies: its unpinned torchvision would swap the CPU torch
	$(BIN)/python -m pip install -q --no-deps "torchensemble==0.2.0"
	$(BIN)/python bench/run_all.py

quality: $(STAMP)
	# every built-in data set x model pair whose data is on disk: 5 members with its recipe, against the floors
	$(BIN)/python bench/quality.py

clean:
	rm -rf $(VENV) mlruns mlartifacts mlflow.db .ensemble data outputs multirun .pytest_cache
