"""Low rank: forward + backward with t' = (1 - beta) x V^T kept for dU, against recomputing it.

Two comparisons of one low-rank layer's training step (all gradients, beta = 0.5, one thread):

* ``inprocess`` (default): the backend's own forward and backward, called as the op calls them,
  with ``keep_t=True`` and t' handed to the backward ("kept") or ``keep_t=False`` and the
  backward recomputing x V^T ("recompute": the previous behaviour). Same process, same tensors;
  the two variants alternate in a random order at every iteration, so drift on a shared machine
  hits both; figures are medians, the ratio the median of per-iteration ratios. For the C++
  backend this is the op path (``torch.compile``), which keeps t' in every regime; its eager
  autograd node keeps it only where the forward computes it (activation space).
* ``trees``: the layer itself (``layer(x).sum().backward()``, the eager path users run) under two
  source trees, e.g. the main checkout (old code) and this one, each in fresh processes that
  alternate in rounds (``--trees OLD:PYTHON,NEW:PYTHON``).

The saving is one M x K x r GEMM out of ~3 M x K x N plus the thin products: a few percent at
r / N = 1/8; none in the C++ weight-space regime (large M), whose backward never recomputed
x V^T (dU from G V^T) and whose op path now pays that GEMM in the forward instead.

Example usage::

    python bench/bench_lowrank_reuse.py --iters 30
    python bench/bench_lowrank_reuse.py --mode trees --trees /work/main:/work/main/.venv/bin/python,.:.venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time

# (label, M, K, N, r). The C++ backend runs activation space where N K > M (N + K) ("act"), weight
# space otherwise ("weight", and "small": M = 256 > 256 * 256 / 512).
SHAPES = [("act", 128, 1024, 1024, 128), ("small", 256, 256, 256, 64), ("weight", 2048, 1024, 1024, 128)]
BACKENDS = ("cpp", "torch")
BETA = 0.5


def _layer(k, n, r):
    import torch

    import vcon_kernels as vk

    torch.manual_seed(0)
    layer = vk.VCONLinear(k, n, config=vk.LowRank(rank=r))
    layer.set_beta(BETA)
    return layer


def _step(be, g, x, w, b, beta, thr, scales, u, v, spec, keep: bool):
    """One forward + backward as the op runs them; ``keep``: t' kept for the backward, else recomputed."""
    out = be.linear_forward(x, w, b, beta, thr, scales, None, u, v, spec, keep_t=keep)
    t = out[1] if keep else None
    return be.linear_backward(g, x, w, b, beta, thr, scales, None, u, v, spec, (True, True, True, True), t)


def inprocess(iters: int, warmup: int) -> list[tuple]:
    import torch

    import vcon_kernels as vk
    from vcon_kernels.functional import _prepare

    rows = []
    for backend in BACKENDS:
        be = vk.backends.get(backend)
        for label, m, k, n, r in SHAPES:
            layer = _layer(k, n, r)
            spec, beta, thr, scales, state = _prepare(layer.weight.shape, layer.weight, layer.beta, layer.config,
                                                      layer.state)
            w, b, u, v = (t.detach() for t in (layer.weight, layer.bias, state.lowrank_u, state.lowrank_v))
            args = (be, torch.randn(m, n), torch.randn(m, k), w, b, beta, thr, scales, u, v, spec)
            times = {False: [], True: []}
            for i in range(warmup + iters):
                order = [False, True]
                random.shuffle(order)
                for keep in order:
                    start = time.perf_counter()
                    _step(*args, keep)
                    if i >= warmup:
                        times[keep].append(time.perf_counter() - start)
            ratio = statistics.median(a / b for a, b in zip(times[True], times[False]))
            rows.append((f"{backend}/{label} ({m},{k},{n},{r})", statistics.median(times[False]) * 1e3,
                         statistics.median(times[True]) * 1e3, ratio))
    return rows


def layer_worker(iters: int, warmup: int) -> dict:
    import torch

    import vcon_kernels as vk

    out = {}
    for backend in BACKENDS:
        for label, m, k, n, r in SHAPES:
            layer = _layer(k, n, r)
            x = torch.randn(m, k, requires_grad=True)
            times = []
            with vk.backends.use(backend):
                for i in range(warmup + iters):
                    layer.zero_grad(set_to_none=True)
                    x.grad = None
                    start = time.perf_counter()
                    layer(x).sum().backward()
                    if i >= warmup:
                        times.append(time.perf_counter() - start)
            out[f"{backend}/{label} ({m},{k},{n},{r})"] = statistics.median(times)
    return out


def trees(spec: str, rounds: int, iters: int, warmup: int) -> list[tuple]:
    pairs = [t.split(":", 1) for t in spec.split(",")]
    if len(pairs) != 2 or any(len(p) != 2 for p in pairs):
        raise SystemExit("--trees takes exactly two PATH:PYTHON pairs (before, after)")
    results: list[list[dict]] = [[], []]
    for rnd in range(rounds):
        for i in ((0, 1) if rnd % 2 == 0 else (1, 0)):
            path, python = pairs[i]
            env = dict(os.environ, PYTHONPATH=os.path.abspath(path), PYTHONDONTWRITEBYTECODE="1", OMP_NUM_THREADS="1")
            proc = subprocess.run([python, os.path.abspath(__file__), "--worker", "--iters", str(iters),
                                   "--warmup", str(warmup)], env=env, capture_output=True, text=True,
                                  cwd=os.path.abspath(path), check=True)
            results[i].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return [(key, statistics.median(r[key] for r in results[0]) * 1e3,
             statistics.median(r[key] for r in results[1]) * 1e3,
             statistics.median(a[key] / b[key] for a, b in zip(results[1], results[0])))
            for key in results[0][0]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("inprocess", "trees"), default="inprocess")
    parser.add_argument("--trees", help="trees mode: before,after as PATH:PYTHON pairs")
    parser.add_argument("--rounds", type=int, default=6, help="trees mode: processes per tree")
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    if args.worker:
        print(json.dumps(layer_worker(args.iters, args.warmup)))
        return
    if args.mode == "trees":
        rows, heads = trees(args.trees, args.rounds, args.iters, args.warmup), ("before ms", "after ms", "after/before")
    else:
        rows, heads = inprocess(args.iters, args.warmup), ("recompute ms", "kept ms", "kept/recompute")
    print(f"{'backend/shape (M,K,N,r)':34} {heads[0]:>12} {heads[1]:>12} {heads[2]:>15}")
    for key, before, after, ratio in rows:
        print(f"{key:34} {before:12.3f} {after:12.3f} {ratio:15.3f}")
    print(f"mode={args.mode} iters={args.iters} threads=1 torch={torch.__version__} python={sys.version.split()[0]}")


if __name__ == "__main__":
    main()
