"""GPU benchmark of the Triton backend against the issue-3 targets (run by ``bench/gpu_check.sh``).

Measures, on one CUDA GPU, in bf16 (medians of ``triton.testing.do_bench``):

1. forward + backward of one layer (M = 8192 tokens, K = N = 4096, x needs its gradient),
   VCON at beta = 0.5 per mode and strategy (auto / fused / weff) against a dense
   ``nn.Linear`` (cuBLAS); the naive two-pass ``reference.py``; targets 1.10 (1.15 low rank);
2. the same at M = 512 (decode-like), plus the forward alone: prologue fusion against
   "build W_eff + cuBLAS", i.e. the crossover for ``ops/dispatch.py``;
3. the magnitude threshold (radix select) against ``torch.kthvalue``;
4. peak memory of a 12-layer stack training step against the dense stack (target 1.02).

Writes ``bench_gpu.csv`` under ``--out`` and prints a short table last.

Example usage::

    python bench/bench_gpu.py --out /tmp/out            # full run, a few minutes on an H100/H200
    python bench/bench_gpu.py --quick                    # smaller shapes, for a smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import time

import torch
import triton
from torch import nn

import vcon_kernels as vk
from vcon_kernels import ops
from vcon_kernels import torch_transforms as transforms
from vcon_kernels.ops import dispatch
from vcon_kernels.reference import ReferenceVCON

MODES = {
    "prune90_layer": lambda: vk.Prune(sparsity=0.9),
    "prune50_row": lambda: vk.Prune(sparsity=0.5, granularity="row"),
    "nm_2:4": lambda: vk.Prune(granularity="nm", n=2, m=4),
    "int8_channel": lambda: vk.Quantize(bits=8),
    "int4_group128": lambda: vk.Quantize(bits=4, granularity="group", group_size=128),
    "binary_tensor": lambda: vk.Quantize(bits=1, granularity="tensor"),
    "prune50+int8": lambda: vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize(bits=8)),
    "nm_2:4+int8": lambda: vk.Compose(vk.Prune(granularity="nm"), vk.Quantize(bits=8)),
    "lowrank64": lambda: vk.LowRank(rank=64),
}
TARGETS = {"lowrank64": 1.15}
DEFAULT_TARGET = 1.10


def timed(fn, rep_ms: int, grads=None) -> float:
    """Median milliseconds of ``fn`` (after two untimed calls: autotuning and JIT compile)."""
    fn()
    fn()
    torch.cuda.synchronize()
    return triton.testing.do_bench(fn, warmup=10, rep=rep_ms, grad_to_none=grads, return_mode="median")


def make_pair(mode: str, k: int, n: int, dtype):
    torch.manual_seed(0)
    dense = nn.Linear(k, n, device="cuda", dtype=dtype)
    layer = vk.VCONLinear.from_linear(nn.Linear(k, n, device="cuda", dtype=dtype), MODES[mode]())
    with torch.no_grad():
        layer.weight.copy_(dense.weight)
        layer.bias.copy_(dense.bias)
    layer.set_beta(0.5)
    return dense, layer


def train_step(module, x, gy):
    def fn():
        module(x).backward(gy)
    return fn


def params_of(module, x):
    return [x] + [p for p in module.parameters()]


def bench_layers(rows, m, k, n, dtype, rep_ms, strategies, naive):
    x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
    gy = torch.randn(m, n, device="cuda", dtype=dtype)
    dense, _ = make_pair("int8_channel", k, n, dtype)
    dense_ms = timed(train_step(dense, x, gy), rep_ms, params_of(dense, x))
    dense_fwd = timed(lambda: dense(x.detach()), rep_ms)
    rows.append(dict(section="layer", mode="dense", m=m, strategy="cublas", metric="fwd+bwd_ms", value=dense_ms,
                     ratio=1.0, target="", note=""))
    for mode in MODES:
        _, layer = make_pair(mode, k, n, dtype)
        target = TARGETS.get(mode, DEFAULT_TARGET)
        # correctness on the benchmark shape: Triton against the plain-torch backend
        with torch.no_grad(), vk.backends.use("torch"):
            y_ref = layer(x.detach()).float()
        with torch.no_grad():
            err = float((layer(x.detach()).float() - y_ref).norm() / y_ref.norm())
        for strategy in strategies:
            ctx = dispatch.force(strategy) if strategy != "auto" else contextlib.nullcontext()
            with ctx:
                picked = dispatch.choose(m, layer.spec(), dtype)
                ms = timed(train_step(layer, x, gy), rep_ms, params_of(layer, x))
                fwd = timed(lambda lay=layer: lay(x.detach()), rep_ms)
            rows.append(dict(section="layer", mode=mode, m=m, strategy=f"{strategy}->{picked}", metric="fwd+bwd_ms",
                             value=ms, ratio=ms / dense_ms, target=target if strategy == "auto" else "",
                             note=f"rel_err_vs_torch={err:.1e}"))
            rows.append(dict(section="layer", mode=mode, m=m, strategy=f"{strategy}->{picked}", metric="fwd_ms",
                             value=fwd, ratio=fwd / dense_fwd, target="", note=""))
        if naive:
            ref = ReferenceVCON(layer)
            ms = timed(train_step(ref, x, gy), rep_ms, params_of(layer, x))
            rows.append(dict(section="layer", mode=mode, m=m, strategy="naive_two_pass", metric="fwd+bwd_ms",
                             value=ms, ratio=ms / dense_ms, target="~2.0", note=""))
        del layer
        torch.cuda.empty_cache()


def bench_threshold(rows, k, n, rep_ms):
    for dtype in (torch.bfloat16, torch.float32):
        w = torch.randn(n, k, device="cuda", dtype=dtype)
        for per_row in (False, True):
            ours = timed(lambda w=w, per_row=per_row: ops.prune_threshold(w, 0.9, per_row), rep_ms)
            ref = timed(lambda w=w, per_row=per_row: transforms.prune_threshold(w, 0.9, per_row), rep_ms)
            same = bool(torch.equal(ops.prune_threshold(w, 0.9, per_row), transforms.prune_threshold(w, 0.9, per_row)))
            rows.append(dict(section="threshold", mode="per_row" if per_row else "per_layer", m=0,
                             strategy=str(dtype).replace("torch.", ""), metric="ms", value=ours, ratio=ours / ref,
                             target="", note=f"kthvalue_ms={ref:.3f} equal={same}"))


def bench_memory(rows, m, k, depth, dtype):
    def stack(config):
        torch.manual_seed(0)
        layers = []
        for _ in range(depth):
            layers += [nn.Linear(k, k, device="cuda", dtype=dtype), nn.GELU()]
        model = nn.Sequential(*layers)
        if config is not None:
            vk.convert(model, config)
            for _, layer in vk.vcon_layers(model):
                layer.set_beta(0.5)
        return model

    def peak(model, strategy):
        x = torch.randn(m, k, device="cuda", dtype=dtype, requires_grad=True)
        ctx = dispatch.force(strategy) if strategy else contextlib.nullcontext()
        with ctx:
            for _ in range(2):  # the second step is measured (autotuning, caches warm)
                model.zero_grad(set_to_none=True)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                model(x).float().square().mean().backward()
                torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20, base / 2**20

    dense_peak, dense_base = peak(stack(None), None)
    rows.append(dict(section="memory", mode="dense", m=m, strategy="cublas", metric="peak_step_MiB",
                     value=dense_peak, ratio=1.0, target="", note=f"resident_MiB={dense_base:.0f}"))
    for mode in ("prune90_layer", "int8_channel", "nm_2:4+int8", "lowrank64"):
        model = stack(MODES[mode]())
        for strategy in ("fused", "weff"):
            p, base = peak(model, strategy)
            total_ratio = (p + base) / (dense_peak + dense_base)
            rows.append(dict(section="memory", mode=mode, m=m, strategy=strategy, metric="peak_step_MiB", value=p,
                             ratio=total_ratio, target=1.02, note=f"resident_MiB={base:.0f} (ratio: resident+peak)"))
        del model
        torch.cuda.empty_cache()


def write(rows, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "bench_gpu.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["section", "mode", "m", "strategy", "metric", "value", "ratio",
                                               "target", "note", "gpu", "torch", "triton", "timestamp"])
        writer.writeheader()
        extra = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, triton=triton.__version__,
                     timestamp=time.strftime("%Y-%m-%dT%H:%M:%S"))
        for row in rows:
            writer.writerow({**row, **extra})
    return path


def print_table(rows):
    print(f"\n{'section':9s} {'mode':14s} {'M':>5s} {'strategy':16s} {'metric':13s} {'value':>9s} {'ratio':>6s} "
          f"{'target':>6s}  note")
    for r in rows:
        ok = ""
        if isinstance(r["target"], float):
            ok = " ok" if r["ratio"] <= r["target"] else " MISS"
        print(f"{r['section']:9s} {r['mode']:14s} {r['m']:5d} {r['strategy']:16s} {r['metric']:13s} "
              f"{r['value']:9.3f} {r['ratio']:6.3f} {str(r['target']):>6s}{ok}  {r['note']}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=os.environ.get("OUT", "out"))
    parser.add_argument("--quick", action="store_true", help="small shapes (smoke test)")
    parser.add_argument("--rep-ms", type=int, default=60)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_gpu.py needs a CUDA GPU")
    k = n = 1024 if args.quick else 4096
    big, small = (1024, 128) if args.quick else (8192, 512)
    dtype = torch.bfloat16
    rows: list = []
    start = time.time()
    with vk.backends.use("triton"):
        bench_layers(rows, big, k, n, dtype, args.rep_ms, ("auto", "fused", "weff"), naive=True)
        print(f"[{time.time() - start:.0f}s] layer M={big} done", flush=True)
        bench_layers(rows, small, k, n, dtype, args.rep_ms, ("fused", "weff"), naive=False)
        print(f"[{time.time() - start:.0f}s] layer M={small} done", flush=True)
        bench_threshold(rows, k, n, args.rep_ms)
        bench_memory(rows, 2048 if args.quick else 8192, k, 12, dtype)
        print(f"[{time.time() - start:.0f}s] threshold and memory done", flush=True)
    path = write(rows, args.out)
    print(f"wrote {path}")
    print_table(rows)


if __name__ == "__main__":
    main()
