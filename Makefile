# peftlab: `make demo` sets up and runs the quickstart; `make test` sets up and runs the tests.
# Everything lives in a local virtual environment (.venv); torch is pinned to the CPU build that
# this machine has on disk (see constraints.txt; a looser pin can pull a multi-GB CUDA build).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip --disable-pip-version-check
STAMP  := $(VENV)/.installed

.PHONY: demo test lint bench assets clean help

help:
	@echo "make demo   - set up, fetch the offline assets and run configs/quickstart.yaml (ends with a report)"
	@echo "make test   - set up and run the test suite"
	@echo "make lint   - ruff check + format check"
	@echo "make bench  - speed and memory benchmarks (benchmarks/; 30-40 min, the time-to-quality one is 20-30)"

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt torch==2.13.0
	$(PIP) install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

assets: $(STAMP)
	$(BIN)/peftlab assets fetch minilm-l6 tweets-3way

demo: assets
	$(BIN)/peftlab run configs/quickstart.yaml
	@echo "report: runs/quickstart/report.html (also report.md, results.csv)"

test: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

bench: assets
	$(BIN)/python benchmarks/run.py

clean:
	rm -rf $(VENV) runs .pytest_cache
