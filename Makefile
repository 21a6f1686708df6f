# Two entry points for a fresh machine (see README): `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of torch is pinned and installed before anything that depends on torch, so pip never
# resolves an unpinned torch (which would pull gigabytes of CUDA packages).
TORCH_PIN := torch==2.13.0

.PHONY: demo test lint venv bench bench-check

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

venv: $(BIN)/python

# Install mmprep and run the main job on sample_data/.
demo: venv
	$(BIN)/python -m pip install -q -e .
	rm -rf out/sample
	$(BIN)/mmprep --config sample_data/mmprep.toml pack sample_data/manifest.jsonl --out out/sample

# Install everything the tests need (torch pin first) and run the whole suite.
test: venv
	$(BIN)/python -m pip install -q $(TORCH_PIN)
	$(BIN)/python -m pip install -q -e '.[embed,ray,plot,dev]'
	$(BIN)/ruff check mmprep tests benchmarks
	$(BIN)/mypy mmprep
	$(BIN)/python -m pytest -q

lint: venv
	$(BIN)/ruff check mmprep tests benchmarks
	$(BIN)/mypy mmprep

# The benchmark suite (BENCHMARKS.md): ~25 min on 2 cores; needs what `make test` installs.
bench: venv
	$(BIN)/python benchmarks/run_all.py

# A cheap regression check of the benchmark ratios (small corpora, generous bounds); CI runs it after the tests.
bench-check: venv
	$(BIN)/python benchmarks/run_all.py --check
