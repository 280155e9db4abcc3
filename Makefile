# Two commands on a fresh machine: `make demo` (the main job) and `make test`.
# Both create .venv on first use and refresh it when the package metadata changes.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch first, pinned: 2.13.0 resolves to the CPU wheel on disk; an open `torch` pulls a CUDA build.
TORCH_PIN := torch==2.13.0
TRITON_PIN := triton==3.7.1
STAMP := $(VENV)/.installed

.PHONY: venv test demo lint clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q $(TORCH_PIN) $(TRITON_PIN) numpy
	$(PIP) install -q --no-build-isolation -e ".[test]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

demo: $(STAMP)
	$(PY) examples/digits_prune.py

# Benchmarks (bench/): regenerates bench/data/results.csv, the plots and bench/RESULTS.md.
# BENCH_LAYER_ARGS / BENCH_MODEL_ARGS override the defaults (see bench/bench_layer.py --help).
BENCH_LAYER_ARGS ?= --quick
BENCH_MODEL_ARGS ?=
bench: $(STAMP)
	$(PIP) install -q pytest-benchmark matplotlib
	$(PY) bench/bench_layer.py $(BENCH_LAYER_ARGS)
	$(PY) bench/bench_model.py $(BENCH_MODEL_ARGS)
	$(PY) bench/make_results.py

lint: $(STAMP)
	$(PIP) install -q ruff
	$(PY) -m ruff check vcon_kernels tests bench examples

clean:
	rm -rf $(VENV) build *.egg-info
