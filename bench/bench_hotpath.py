"""The training hot path: per-call overhead, gradient accumulation, decode-like rows.

What users run besides the single big GEMM of ``bench_layer.py``:

* ``overhead``: one layer at M = 1, 64 -> 32 (the math is ~nothing): forward and forward +
  backward per call, in microseconds, and the difference to ``nn.Linear``; this is what ~200
  layers of a 7B-class model pay at every micro-batch. ``full`` is a micro-batch after the
  first (the layer's state is cached); ``step`` is a forward + backward that starts a new
  optimizer step (the state is computed: one step of training without accumulation).
* ``accum``: one optimizer step of 4 gradient-accumulation micro-batches (M = 256 each,
  K = N = 1024) plus ``AdamW.step``: the layer's state is computed once, not 4 times.
* ``decode``: forward only at M = 1 and 16 (K = N = 1024), as generation and small-batch eval
  call a layer under ``torch.no_grad``.

Each comparison is measured side by side, interleaved in rounds (``bench_common``), medians and
the median of per-round ratios to dense. Rows go to ``bench/data/results.csv`` (op
``hotpath_<scenario>``).

Example usage::

    python bench/bench_hotpath.py --threads 1 --rounds 15
    python bench/bench_hotpath.py --scenarios overhead --compressions prune_layer,int8_channel
"""

from __future__ import annotations

import argparse
import copy

import torch
from bench_common import BETA
from bench_common import CLOCKS
from bench_common import COMPRESSIONS
from bench_common import RESULTS_CSV
from bench_common import TARGET_COMPRESSIONS
from bench_common import build_layers
from bench_common import device_name
from bench_common import measure_interleaved
from bench_common import now
from bench_common import version_string
from bench_common import write_rows

import vcon_kernels as vk

SCENARIOS = ("overhead", "accum", "decode")


def overhead_fns(compression: str) -> dict:
    if compression.startswith("lowrank"):  # rank 64 does not fit a 64 -> 32 layer: rank 8 there
        dense = torch.nn.Linear(64, 32)
        layer = vk.VCONLinear.from_linear(copy.deepcopy(dense), vk.LowRank(rank=8))
        layer.set_beta(BETA)
    else:
        dense, layer = build_layers(compression, 64, 32)
    x = torch.randn(1, 64)
    xg = x.clone().requires_grad_(True)
    fns = {}
    for name, module in (("dense", dense), ("vcon", layer)):
        params = list(module.parameters())

        def fwd(m=module):
            m(x)

        def full(m=module, ps=params):
            for p in ps:
                p.grad = None
            xg.grad = None
            m(xg).sum().backward()

        def step(f=full):
            vk.state_cache.refresh_all()  # what optimizer.step() does
            f()

        fns[f"{name}_forward"] = fwd
        fns[f"{name}_full"] = full
        fns[f"{name}_step"] = step
    return fns


def accum_fns(compression: str, micro: int = 4, m: int = 256, k: int = 1024, n: int = 1024) -> dict:
    dense, layer = build_layers(compression, k, n)
    xs = torch.randn(micro, m, k)
    grad = torch.randn(m, n)
    fns = {}
    for name, module in (("dense", dense), ("vcon", layer)):
        opt = torch.optim.AdamW(module.parameters(), lr=1e-6)

        def step(mod=module, o=opt):
            for i in range(micro):
                mod(xs[i]).backward(grad)
            o.step()
            o.zero_grad(set_to_none=True)

        fns[name] = step
    return fns


def decode_fns(compression: str, m: int, k: int = 1024, n: int = 1024) -> dict:
    dense, layer = build_layers(compression, k, n)
    x = torch.randn(m, k)

    def run(mod):
        def fn():
            with torch.no_grad():
                mod(x)
        return fn

    return {"dense": run(dense), "vcon": run(layer)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenarios", default=",".join(SCENARIOS), help=f"comma list of {SCENARIOS}")
    parser.add_argument("--compressions", default=",".join(TARGET_COMPRESSIONS),
                        help=f"comma list of {tuple(COMPRESSIONS)}")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                        help="wall time (default) or process CPU time (robust on a busy machine; use --threads 1)")
    parser.add_argument("--csv", default=RESULTS_CSV)
    args = parser.parse_args(argv)
    scenarios = [s for s in args.scenarios.split(",") if s]
    compressions = [c for c in args.compressions.split(",") if c]
    for s in scenarios:
        if s not in SCENARIOS:
            parser.error(f"--scenarios: {s!r} is not one of {SCENARIOS}")
    for c in compressions:
        if c not in COMPRESSIONS:
            parser.error(f"--compressions: {c!r} is not one of {tuple(COMPRESSIONS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    meta = dict(device=device_name("cpu"), version=version_string(), date=now(), threads=threads, rounds=args.rounds)
    print(f"# {meta['device']}; {meta['version']}; {threads} threads; {args.rounds} interleaved rounds; "
          f"{args.clock} clock")
    rows = []

    def add(op, provider, mode, shape, stats, unit="ms"):
        rows.append(dict(op=op, provider=provider, mode=mode, shape=shape, dtype="float32",
                         median=f"{stats['median']:.6g}", p20=f"{stats['p20']:.6g}", p80=f"{stats['p80']:.6g}",
                         ratio_to_dense=f"{stats['ratio_to_dense']:.4f}", unit=unit, **meta))

    for compression in compressions:
        if "overhead" in scenarios:
            fns = overhead_fns(compression)
            for mode in ("forward", "full", "step"):
                pair = {"dense": fns[f"dense_{mode}"], "vcon": fns[f"vcon_{mode}"]}
                stats = measure_interleaved(pair, rounds=args.rounds, warmup=20, min_time_s=0.05, clock=args.clock)
                d, v = stats["dense"]["median"] * 1e3, stats["vcon"]["median"] * 1e3
                print(f"overhead {compression:14s} {mode:8s} M=1 64->32: dense {d:7.1f} us  vcon {v:7.1f} us  "
                      f"+{v - d:6.1f} us")
                add("hotpath_overhead", "vcon", mode, "1x64x32", stats["vcon"])
                add("hotpath_overhead", "dense", mode, "1x64x32", stats["dense"])
        if "accum" in scenarios:
            stats = measure_interleaved(accum_fns(compression), rounds=args.rounds, clock=args.clock)
            print(f"accum    {compression:14s} 4 x M=256 1024x1024 + AdamW: dense {stats['dense']['median']:7.2f} ms  "
                  f"vcon {stats['vcon']['median']:7.2f} ms  ratio {stats['vcon']['ratio_to_dense']:.3f}")
            add("hotpath_accum", "vcon", "full", "4x256x1024x1024", stats["vcon"])
            add("hotpath_accum", "dense", "full", "4x256x1024x1024", stats["dense"])
        if "decode" in scenarios:
            for m in (1, 16):
                stats = measure_interleaved(decode_fns(compression, m), rounds=args.rounds, clock=args.clock)
                d = stats["dense"]["median"]
                print(f"decode   {compression:14s} M={m:<3d} 1024x1024 no_grad: dense {d:7.3f} ms  "
                      f"vcon {stats['vcon']['median']:7.3f} ms  ratio {stats['vcon']['ratio_to_dense']:.3f}")
                add("hotpath_decode", "vcon", "forward", f"{m}x1024x1024", stats["vcon"])
                add("hotpath_decode", "dense", "forward", f"{m}x1024x1024", stats["dense"])
    write_rows(rows, args.csv)
    print(f"# wrote {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
