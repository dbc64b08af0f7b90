# k2repro: two commands on a fresh machine, `make run` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.k2repro-installed
export DVC_NO_ANALYTICS := 1
export OMP_NUM_THREADS := 1
export PYTHONUNBUFFERED := 1

.PHONY: setup run test lint bench faults clean

setup: $(STAMP)

# torch is pinned here (a local CPU wheel); the package metadata stays permissive (torch>=2.6)
# so that GPU clusters keep their own build.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]' torch==2.13.0
	@# browser tests (tests/ui) drive Debian's Chromium; nothing downloads a browser at run time
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium) \
		|| (sudo apt-get update -qq && sudo apt-get install -y -qq chromium)
	@touch $(STAMP)

run: setup
	$(BIN)/python scripts/run_pipeline.py

# Two workers share the two cores (one test file each: module fixtures stay in one process);
# the fault campaign's kill timing runs alone afterwards.
test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests --deselect tests/integration/test_fault_campaign.py
	$(BIN)/python -m pytest -q tests/integration/test_fault_campaign.py

lint: setup
	$(BIN)/ruff check src tests bench scripts

# The peers of the logger comparison (MLflow, W&B offline, DVCLive, TensorBoard) are the `bench`
# extra; bench/run_all.py stops before measuring anything if one of them does not import.
BENCH_STAMP := $(VENV)/.k2repro-bench-installed

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(BIN)/python -m pip install -q -e '.[dev,bench]'
	@touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BIN)/python bench/run_all.py

faults: setup
	$(BIN)/python scripts/fault_campaign.py

clean:
	rm -rf runs reports/pipeline data/work
