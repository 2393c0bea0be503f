# Two entry points: `make demo` and `make test`. Both create .venv if missing and install
# the project into it; a stamp file keeps repeat runs fast.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedpipe demo

test: $(STAMP)
	bash scripts/install-browser.sh || echo "browser tests will be skipped: chromium could not be installed"
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e ".[dev,bench]"
	for b in bench_ingest bench_train bench_federate; do \
	  $(BIN)/python -m benchmarks.$$b --out benchmarks/results/$${b#bench_}.json || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
