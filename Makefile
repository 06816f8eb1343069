# The README's two commands: `make demo` and `make test`. Each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint install clean benchmarks

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch/torchvision: the CPU/CUDA wheels pip resolves here (capped at 2.14.1 / 0.29.1)
	$(BIN)/pip install --quiet -e '.[dev]'
	# the catalogue `bench list` answers from without importing torch and the methods (bench/catalog.py)
	$(BIN)/python -m bench.catalog
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	# run the quick suite, then always write its report (reports/<run-id>/index.html); keep the run's exit code
	run=$$(date +%Y%m%d-%H%M%S); $(BIN)/bench run quick --run-id $$run; rc=$$?; \
	$(BIN)/bench report results/quick/$$run && exit $$rc

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: $(STAMP) lint
	$(BIN)/pytest -q

# the performance benchmarks (pytest-benchmark; minutes: the demo's time among them), saved and joined to the history
benchmarks: $(STAMP)
	$(BIN)/pytest benchmarks/ --benchmark-autosave -q
	$(BIN)/bench history benchmarks --import .benchmarks --no-page

clean:
	rm -rf $(VENV) .pytest_cache
