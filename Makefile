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

.PHONY: venv test demo lint clean

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

lint: $(STAMP)
	$(PIP) install -q ruff
	$(PY) -m ruff check vcon_kernels tests bench examples

clean:
	rm -rf $(VENV) build *.egg-info
