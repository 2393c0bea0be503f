# Two entry points: `make demo` and `make test`. Both install from the lock file (uv.lock) into
# .venv with uv, pinned below; `make lock` is the one command that updates the lock.
PYTHON ?= python3
UV_VERSION := 0.13.9
TOOLS := .tools
UV := $(TOOLS)/bin/uv
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
# uv uses this machine's Python and never downloads one; the lock is never re-resolved here.
export UV_PYTHON := $(PYTHON)
export UV_PYTHON_DOWNLOADS := never
SYNC := $(UV) sync --frozen --quiet

.PHONY: demo test chaos lint bench lock clean

$(UV):
	$(PYTHON) -m venv $(TOOLS)
	$(TOOLS)/bin/python -m pip install --quiet uv==$(UV_VERSION)

$(STAMP): $(UV) pyproject.toml uv.lock
	$(SYNC) --extra dev
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fedpipe demo

test: $(STAMP)
	bash scripts/install-browser.sh || echo "browser tests will be skipped: chromium could not be installed"
	$(BIN)/python -m pytest -q tests -m "not chaos"

# Long fault runs with real process kills (minutes): benchmarks/results/chaos.json, the figures
# of docs/reliability.md. The fast fault tests (seconds each) run in `make test`.
chaos: $(STAMP)
	$(BIN)/python -m benchmarks.chaos --out benchmarks/results/chaos.json
	$(BIN)/python -m pytest -q tests -m chaos

lint: $(STAMP)
	$(BIN)/ruff check .

bench: $(UV)
	$(SYNC) --extra dev --extra bench
	rm -f $(STAMP)  # the bench extra is not part of the test environment
	for b in bench_ingest bench_train bench_speed bench_federate bench_predict; do \
	  $(BIN)/python -m benchmarks.$$b --out benchmarks/results/$${b#bench_}.json || exit 1; done

# Re-resolve every dependency to its newest allowed version and rewrite uv.lock.
lock: $(UV)
	$(UV) lock --upgrade

clean:
	rm -rf $(VENV) $(TOOLS) .pytest_cache build *.egg-info
