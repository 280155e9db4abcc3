"""Finalized (compressed) layers against dense ``nn.Linear`` on one CUDA GPU (run by ``bench/gpu_check.sh``).

For every storage format a finalized ``CompressedLinear`` can have, K = N = 4096, M in {1, 16,
128, 2048} tokens, bf16 and fp16 activations, it times under ``torch.inference_mode``:

* ``dense``: ``nn.Linear`` (cuBLAS) with the rebuilt weight;
* ``finalized``: ``CompressedLinear.forward`` (the Triton dequantizing GEMM ``ops/dequant_matmul.py``
  for quantized / binary / N:M formats; CSR rebuilds the weight);
* ``materialize``: ``F.linear(x, storage.materialize(), bias)``, the path the kernel replaced;
* ``fused`` / ``onepass``: the kernel path's two strategies whatever ``dequant_matmul.DENSE_MIN_M``
  picks (the fused GEMM; one-pass dequantize + cuBLAS), to place that threshold from data.

Timing: CUDA events around a batch of calls that cycle over enough copies of the layer to
exceed the L2 cache (each call reads its weight from HBM, as in a model), median of the
per-call mean over several batches. Also per row: the largest relative difference of the
finalized output to ``F.linear(x, materialize())`` and whether the call ran with
``torch.cuda.set_sync_debug_mode("error")`` without a host synchronization.

Writes ``bench_gpu_infer.csv`` under ``--out`` row by row (a timeout keeps what was measured) and
prints a table last. ``--dry-run`` runs every step once at a tiny size on whatever device there is
(on CPU: the kernels interpreted, TRITON_INTERPRET=1; the CSV then holds no meaningful times).

Example usage::

    VCON_TRITON_AUTOTUNE=0 python bench/bench_gpu_infer.py --out /tmp/out    # one config per M regime
    python bench/bench_gpu_infer.py --out /tmp/out --dtypes bf16               # autotuned (slow compile)
    TRITON_INTERPRET=1 python bench/bench_gpu_infer.py --dry-run --out /tmp/x  # CPU smoke test
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from vcon_kernels.compressed import NMQuantizedWeight  # noqa: E402
from vcon_kernels.compressed import NMSparseWeight  # noqa: E402
from vcon_kernels.compressed import QuantizedWeight  # noqa: E402
from vcon_kernels.compressed import SparseWeight  # noqa: E402
from vcon_kernels.compressed import matmul  # noqa: E402
from vcon_kernels.compressed.modules import CompressedLinear  # noqa: E402
from vcon_kernels.ops import dequant_matmul  # noqa: E402
from vcon_kernels.spec import TransformSpec  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FIELDS = ["dtype", "format", "M", "K", "N", "path", "weight_MB", "dense_ms", "finalized_ms", "materialize_ms",
          "ratio", "ratio_materialize", "fused_ms", "onepass_ms", "max_rel_diff", "no_host_sync", "autotune"]


def _quant(rows, cols, bits, group, dtype, gen):
    spec = TransformSpec(bits=bits, group_size=group)
    if bits == 1:
        codes = torch.randint(0, 2, (rows, cols), generator=gen).float() * 2 - 1
    else:
        codes = torch.randint(spec.qmin, spec.qmax + 1, (rows, cols), generator=gen).float()
    scales = (torch.rand(spec.scales_shape(rows, cols), generator=gen) + 0.5) / (rows * 4)
    return codes, scales, spec


def _nm_keep(rows, cols, n, m, gen):
    order = torch.rand(rows, cols // m, m, generator=gen).argsort(-1)[..., :n]
    return torch.zeros(rows, cols // m, m, dtype=torch.bool).scatter_(-1, order, True).reshape(rows, cols)


def make_storage(name: str, rows: int, cols: int, dtype, gen):
    """A finalized storage of format ``name`` with random codes (timing does not depend on the values)."""
    group = min(128, cols)
    quant = {"int8_channel": (8, cols), "int8_group128": (8, group), "int4_channel": (4, cols),
             "int4_group128": (4, group), "int2_channel": (2, cols), "binary_channel": (1, cols)}
    if name in quant:
        return QuantizedWeight(*_quant(rows, cols, *quant[name], dtype, gen), dtype)
    if name == "nm_2:4":
        w = torch.randn(rows, cols, generator=gen) / cols ** 0.5
        return NMSparseWeight(w.to(dtype), _nm_keep(rows, cols, 2, 4, gen), 2, 4)
    if name == "nm_2:4+int8":
        codes, scales, spec = _quant(rows, cols, 8, cols, dtype, gen)
        keep = _nm_keep(rows, cols, 2, 4, gen)
        return NMQuantizedWeight(codes * keep, keep, 2, 4, scales, spec, dtype)
    if name == "csr_90":
        w = torch.randn(rows, cols, generator=gen) / cols ** 0.5
        return SparseWeight(w.to(dtype), torch.rand(rows, cols, generator=gen) > 0.9)
    raise ValueError(f"unknown format {name!r}")


FORMATS = ["int8_channel", "int4_group128", "nm_2:4+int8", "nm_2:4", "binary_channel", "int8_group128",
           "int4_channel", "int2_channel", "csr_90"]


class Timer:
    """Median per-call milliseconds of ``calls`` (a list of thunks, cycled) in batches."""

    def __init__(self, device, batches: int, per_batch: int):
        self.cuda = device.type == "cuda"
        self.batches, self.per_batch = batches, per_batch

    def __call__(self, calls) -> float:
        for fn in calls[:2]:  # compile / autotune outside the timing
            fn()
        means = []
        for _ in range(self.batches):
            if self.cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                torch.cuda.synchronize()
                start.record()
                for i in range(self.per_batch):
                    calls[i % len(calls)]()
                end.record()
                end.synchronize()
                means.append(start.elapsed_time(end) / self.per_batch)
            else:
                t = time.perf_counter()
                for i in range(self.per_batch):
                    calls[i % len(calls)]()
                means.append((time.perf_counter() - t) * 1e3 / self.per_batch)
        return statistics.median(means)


def _no_host_sync(module, x) -> str:
    if x.device.type != "cuda":
        return "n/a"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        module(x)
        return "yes"
    except RuntimeError as exc:
        return f"no: {str(exc).splitlines()[0][:60]}"
    finally:
        torch.cuda.set_sync_debug_mode("default")


def _weight_mb(storage) -> float:
    return sum(b.numel() * b.element_size() for b in storage.buffers()) / 2 ** 20


def run(args) -> list:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("no GPU: run with --dry-run and TRITON_INTERPRET=1 (kernels interpreted on CPU)")
        matmul.TRITON_DEVICES = ("cpu",)  # CPU tensors take the CUDA branch: the interpreted kernel
    from vcon_kernels.ops.utils import AUTOTUNE

    k = n = args.size
    timer = Timer(device, args.batches, args.per_batch)
    l2_bytes = 60 << 20  # H100 50 MB, H200 60 MB: cycle over > 3x that per timed batch
    gen = torch.Generator().manual_seed(0)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "bench_gpu_infer.csv")
    rows = []
    deadline = time.monotonic() + args.budget_s
    with open(path, "w", newline="") as f, torch.inference_mode():
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for dname in args.dtypes:
            dtype = DTYPES[dname]
            bias = (torch.randn(n, generator=gen) * 0.1).to(device=device, dtype=dtype)
            dense_ms: dict = {}
            for fmt in args.formats:
                if time.monotonic() > deadline:
                    print(f"budget of {args.budget_s}s spent: stopping before {dname} {fmt}", flush=True)
                    return rows
                storage = make_storage(fmt, n, k, dtype, gen).to(device)
                layer = CompressedLinear(storage, bias).to(device)
                w = storage.materialize()
                copies = max(2, min(16, -(-3 * l2_bytes // max(1, int(_weight_mb(storage) * 2 ** 20)))))
                layers = [layer] + [copy.deepcopy(layer) for _ in range(copies - 1 if device.type == "cuda" else 0)]
                dense_copies = max(2, min(16, -(-3 * l2_bytes // (w.numel() * w.element_size()))))
                for m in args.m:
                    x = torch.randn(m, k, generator=gen).to(device=device, dtype=dtype)
                    if m not in dense_ms:
                        lins = []
                        for _ in range(dense_copies if device.type == "cuda" else 1):
                            lin = nn.Linear(k, n, device=device, dtype=dtype)
                            lin.weight.copy_(w)
                            lin.bias.copy_(bias)
                            lins.append(lin)
                        dense_ms[m] = timer([lambda lin=lin, x=x: lin(x) for lin in lins])
                        del lins
                    fin_ms = timer([lambda mod=mod, x=x: mod(x) for mod in layers])
                    mat_ms = timer([lambda mod=mod, x=x: F.linear(x, mod.storage.materialize(), mod.bias)
                                    for mod in layers])
                    # both strategies of the kernel path, whatever DENSE_MIN_M picks (to set it from data)
                    fused_ms = onepass_ms = float("inf")
                    if matmul._triton_ok(x, storage, bias):
                        saved = dequant_matmul.DENSE_MIN_M
                        try:
                            dequant_matmul.DENSE_MIN_M = None
                            fused_ms = timer([lambda mod=mod, x=x: mod(x) for mod in layers])
                            dequant_matmul.DENSE_MIN_M = 0
                            onepass_ms = timer([lambda mod=mod, x=x: mod(x) for mod in layers])
                        finally:
                            dequant_matmul.DENSE_MIN_M = saved
                    y = layer(x).float()
                    ref = F.linear(x, w, bias).float()
                    diff = float(((y - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item())
                    row = dict(dtype=dname, format=fmt, M=m, K=k, N=n,
                               path="triton" if matmul._triton_ok(x, storage, bias) else "materialize",
                               weight_MB=round(_weight_mb(storage), 2), dense_ms=round(dense_ms[m], 5),
                               finalized_ms=round(fin_ms, 5), materialize_ms=round(mat_ms, 5),
                               ratio=round(fin_ms / dense_ms[m], 3), ratio_materialize=round(mat_ms / dense_ms[m], 3),
                               fused_ms=round(fused_ms, 5), onepass_ms=round(onepass_ms, 5),
                               max_rel_diff=f"{diff:.2e}", no_host_sync=_no_host_sync(layer, x),
                               autotune=int(AUTOTUNE))
                    writer.writerow(row)
                    f.flush()
                    rows.append(row)
                    print(" ".join(f"{key}={row[key]}" for key in FIELDS), flush=True)
                del layers, layer, storage, w
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    return rows


def print_table(rows) -> None:
    print("\nfinalized / dense nn.Linear (median ms; ratio < 1: faster than dense)")
    print(f"{'dtype':5s} {'format':15s} {'M':>5s} {'path':11s} {'dense':>9s} {'final':>9s} {'ratio':>6s} "
          f"{'mater.':>6s} {'fused':>6s} {'1pass':>6s} {'diff':>8s} sync")
    for r in rows:
        print(f"{r['dtype']:5s} {r['format']:15s} {r['M']:5d} {r['path']:11s} {r['dense_ms']:9.4f} "
              f"{r['finalized_ms']:9.4f} {r['ratio']:6.2f} {r['ratio_materialize']:6.2f} "
              f"{r['fused_ms'] / r['dense_ms']:6.2f} {r['onepass_ms'] / r['dense_ms']:6.2f} {r['max_rel_diff']:>8s} "
              f"{r['no_host_sync']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="out")
    parser.add_argument("--size", type=int, default=4096, help="K = N")
    parser.add_argument("--m", type=int, nargs="+", default=[1, 16, 128, 2048])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16"], choices=sorted(DTYPES))
    parser.add_argument("--formats", nargs="+", default=FORMATS, choices=FORMATS)
    parser.add_argument("--batches", type=int, default=15)
    parser.add_argument("--per-batch", type=int, default=20)
    parser.add_argument("--budget-s", type=float, default=1e9, help="stop starting new formats after this long")
    parser.add_argument("--dry-run", action="store_true", help="tiny size, one batch of one call: a smoke test")
    args = parser.parse_args(argv)
    if args.dry_run:
        args.size, args.m, args.batches, args.per_batch = 64, [1, 16], 1, 1
    rows = run(args)
    print_table(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
