"""pytest-benchmark suite over the layer cases of bench_layer.py, for regression tracking.

Not part of ``make test`` (pyproject's testpaths is tests/). Run it explicitly::

    pytest bench/ --benchmark-only                                # every compression x mode x provider
    pytest bench/ --benchmark-only -k "prune_layer and full"
    pytest bench/ --benchmark-only --benchmark-save=base          # then --benchmark-compare=0001
    VCON_BENCH_SHAPE=1024x1024x1024 pytest bench/ --benchmark-only

The shape is the target shape of the CPU work (M=2048, K=N=1024, fp32) unless
``VCON_BENCH_SHAPE`` says otherwise. Each benchmark's ``extra_info`` records the
compression, mode, provider, shape and kernel ISA. pytest-benchmark times each provider
on its own, so for ratios measured side by side use bench_layer.py.
"""

from __future__ import annotations

import os
import sys

import pytest

pytest.importorskip("pytest_benchmark")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import COMPRESSIONS  # noqa: E402
from bench_common import MODES  # noqa: E402
from bench_common import layer_providers  # noqa: E402
from bench_common import vcon_providers  # noqa: E402
from bench_common import version_string  # noqa: E402

DEVICE = "cpu"
SHAPE = tuple(int(v) for v in os.environ.get("VCON_BENCH_SHAPE", "2048x1024x1024").split("x"))
PROVIDERS = vcon_providers(DEVICE)


def _run(benchmark, compression, mode, provider):
    m, k, n = SHAPE
    fn = layer_providers(compression, m, k, n, mode, device=DEVICE, providers=[provider])[provider]
    fn()  # warm-up (and, for "backward", the graph that is kept)
    benchmark.extra_info.update(compression=compression, mode=mode, provider=provider,
                                shape="x".join(map(str, SHAPE)), version=version_string())
    benchmark.pedantic(fn, rounds=7, iterations=1, warmup_rounds=1)


@pytest.mark.parametrize("mode", MODES)
def test_dense(benchmark, mode):
    _run(benchmark, "prune_layer", mode, "dense")


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("compression", list(COMPRESSIONS))
def test_vcon(benchmark, compression, mode, provider):
    _run(benchmark, compression, mode, provider)
