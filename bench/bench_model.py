"""A training step of a 12-layer transformer-like stack: dense vs naive vs fused VCON.

The model (d = 768, MLP 3072, 12 heads, 12 blocks, sequence 128, batch 8, fp32) has
48 linear layers (qkv, attention output, MLP up, MLP down per block); every one of them
is converted (``vk.convert``), the small classification head is not. One step is
``zero_grad(set_to_none=True)``, forward, cross-entropy, backward and ``AdamW.step``,
at beta = 0.5 (mid-transition: both paths alive, the case the fused kernels are for).

Providers: ``dense`` (the unconverted model), ``naive`` (every VCON layer run by the
two-pass reference.py), ``fused`` (the VCON layers, default backend: C++ on CPU when
built, Triton on CUDA). Time per step: dense / naive / fused interleaved in one process,
median of per-round ratios. Peak memory: on CPU the peak RSS (``VmHWM``) of a fresh
subprocess per provider that builds the model and runs a few steps (reported whole, and
above the RSS measured just before the model is built, i.e. without the interpreter and
libraries); on CUDA ``torch.cuda.max_memory_allocated``.

Example usage::

    python bench/bench_model.py                          # prune, int8, binary, low rank
    python bench/bench_model.py --compressions prune_layer --rounds 5
    python bench/bench_model.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import CLOCKS  # noqa: E402
from bench_common import COMPRESSIONS  # noqa: E402
from bench_common import RESULTS_CSV  # noqa: E402
from bench_common import clock_unit  # noqa: E402
from bench_common import device_name  # noqa: E402
from bench_common import now  # noqa: E402
from bench_common import version_string  # noqa: E402
from bench_common import write_rows  # noqa: E402

import vcon_kernels as vk  # noqa: E402
from vcon_kernels.reference import ReferenceVCON  # noqa: E402

DEFAULT_COMPRESSIONS = ("prune_layer", "int8_channel", "binary_tensor", "lowrank_r64")
DEFAULT_PROVIDERS = ("dense", "naive", "fused")
# lora: the VCON model frozen under PEFT LoRA adapters; dense_lora: plain LoRA on the dense model;
# finalized: the VCON model after vk.finalize (what training at beta = 0 should cost at most).
PROVIDERS = DEFAULT_PROVIDERS + ("lora", "dense_lora", "finalized")


class Block(nn.Module):
    """Pre-norm transformer block: attention (fused qkv) and a GELU MLP."""

    def __init__(self, d: int, mlp: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x):
        b, s, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, d)
        x = x + self.proj(attn)
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class Stack(nn.Module):
    def __init__(self, layers=12, d=768, mlp=3072, heads=12, classes=10):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d, mlp, heads) for _ in range(layers))
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x).mean(dim=1))


def build(provider: str, compression: str, args, seed: int = 0):
    """(model, optimizer, step function) for one provider."""
    torch.manual_seed(seed)
    model = Stack(args.layers, args.d, args.mlp, args.heads).to(args.device)
    if provider not in ("dense", "dense_lora"):
        model = vk.convert(model, COMPRESSIONS[compression](), filter_fn=lambda mod, name: not name.endswith("head"))
        for layer in vk.vcon_layers(model):
            (layer[1] if isinstance(layer, tuple) else layer).set_beta(args.beta)
    if provider == "finalized":
        model = vk.finalize(model)
    if provider == "naive":
        for block in model.blocks:
            for name in ("qkv", "proj", "fc1", "fc2"):
                setattr(block, name, ReferenceVCON(getattr(block, name)))
    if provider in ("lora", "dense_lora"):
        # PEFT LoRA on every block linear; the base (VCON or dense) is frozen, only adapters train.
        import peft

        targets = ["qkv", "proj", "fc1", "fc2"]
        model = peft.get_peft_model(model, peft.LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                                                           target_modules=targets, modules_to_save=["head"]))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(args.batch, args.seq, args.d, generator=g).to(args.device)
    y = torch.randint(0, 10, (args.batch,), generator=g).to(args.device)

    def step():
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    return model, opt, step


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def time_steps(compression: str, args) -> dict:
    clock = CLOCKS[args.clock]
    """{provider: dict(median, p20, p80, ratio_to_dense)} in ms per step, interleaved rounds."""
    steps = {p: build(p, compression, args)[2] for p in args.providers}
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    times = {p: [] for p in steps}
    ratios = {p: [] for p in steps}
    order = list(steps)
    for _ in range(args.rounds):
        order = order[1:] + order[:1]  # rotate: every provider runs first, middle and last
        this = {}
        for p in order:
            _sync(args.device)
            t0 = clock()
            steps[p]()
            _sync(args.device)
            this[p] = (clock() - t0) * 1e3
            times[p].append(this[p])
        if "dense" in this:
            for p in this:
                ratios[p].append(this[p] / this["dense"])
    out = {}
    for p, ts in times.items():
        ts_sorted = sorted(ts)
        out[p] = dict(median=statistics.median(ts), p20=ts_sorted[int(0.2 * (len(ts) - 1))],
                      p80=ts_sorted[int(round(0.8 * (len(ts) - 1)))],
                      ratio_to_dense=statistics.median(ratios[p]) if ratios[p] else float("nan"))
    return out


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mb() -> float:
    """VmHWM: the peak RSS of this process image. (ru_maxrss would not do: Linux carries it
    over fork + exec, so a worker started by a big parent would report the parent's peak.)"""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(provider: str, compression: str, args) -> dict:
    """Runs in a fresh process: build, run a few steps, report the peak memory."""
    try:  # every worker loads the same libraries before its baseline (peft pulls in transformers)
        import peft  # noqa: F401
    except ImportError:
        pass
    if args.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = _rss_mb()
    _, _, step = build(provider, compression, args)
    for _ in range(args.memory_steps):
        step()
    _sync(args.device)
    if args.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = _peak_rss_mb()
    return dict(peak_mb=peak, base_mb=base)


def measure_memory(provider: str, compression: str, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", provider, "--compressions", compression,
           "--device", args.device, "--memory-steps", str(args.memory_steps), "--layers", str(args.layers),
           "--batch", str(args.batch), "--seq", str(args.seq), "--d", str(args.d), "--mlp", str(args.mlp),
           "--heads", str(args.heads), "--lora-rank", str(args.lora_rank), "--beta", str(args.beta)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"memory worker for {provider}/{compression} failed:\n{res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compressions", default=",".join(DEFAULT_COMPRESSIONS),
                        help=f"comma list of {tuple(COMPRESSIONS)}")
    parser.add_argument("--providers", default=",".join(DEFAULT_PROVIDERS),
                        help="comma list of dense,naive,fused,lora (frozen VCON base + LoRA),dense_lora")
    parser.add_argument("--lora-rank", type=int, default=16, help="LoRA rank of the lora providers")
    parser.add_argument("--beta", type=float, default=0.5,
                        help="beta of every VCON layer (0 = after the transition; compare with 'finalized')")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved timed steps per provider")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--memory-steps", type=int, default=3, help="steps in each memory subprocess")
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                        help="wall time (default) or process CPU time (robust on a busy machine; use --threads 1)")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d", type=int, default=768)
    parser.add_argument("--mlp", type=int, default=3072)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--csv", default=RESULTS_CSV)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.compressions = [c for c in args.compressions.split(",") if c]
    args.providers = [p for p in args.providers.split(",") if p]
    for c in args.compressions:
        if c not in COMPRESSIONS:
            parser.error(f"--compressions: {c!r} is not one of {tuple(COMPRESSIONS)}")
    for p in args.providers:
        if p not in PROVIDERS:
            parser.error(f"--providers: {p!r} is not one of {PROVIDERS}")
    if args.worker:
        print(json.dumps(worker(args.worker, args.compressions[0], args)))
        return 0

    shape = f"{args.layers}x(b{args.batch}xs{args.seq}xd{args.d}xmlp{args.mlp})"
    version, date, dev = version_string(), now(), device_name(args.device)
    backend = vk.backends.select(args.device).name
    print(f"# {args.layers}-layer stack, {shape}, fp32 training step (AdamW), beta {args.beta}; "
          f"fused backend: {backend}")
    print(f"# {dev}; {version}; {args.rounds} interleaved rounds; {args.clock} clock", flush=True)
    rows = []
    mem_dense = None
    if not args.no_memory and "dense" in args.providers:
        mem_dense = measure_memory("dense", args.compressions[0], args)
    for compression in args.compressions:
        stats = time_steps(compression, args)
        if "fused" in stats and "finalized" in stats:
            print(f"{compression:14s} fused / finalized step (medians): "
                  f"{stats['fused']['median'] / stats['finalized']['median']:.3f}")
        for p in args.providers:
            s = stats[p]
            line = f"{compression:14s} {p:10s} step {s['median']:9.1f} ms  ({s['ratio_to_dense']:.3f}x dense)"
            rows.append(dict(op=f"model:{compression}", provider=p if p != "fused" else f"fused-{backend}",
                             mode="train_step", shape=shape, dtype="float32", median=f"{s['median']:.2f}",
                             p20=f"{s['p20']:.2f}", p80=f"{s['p80']:.2f}", device=dev, version=version, date=date,
                             ratio_to_dense=f"{s['ratio_to_dense']:.4f}", unit=clock_unit(args.clock),
                             threads=torch.get_num_threads(), rounds=args.rounds))
            if not args.no_memory:
                mem = mem_dense if (p == "dense" and mem_dense) else measure_memory(p, compression, args)
                ratio = mem["peak_mb"] / mem_dense["peak_mb"] if mem_dense else float("nan")
                above = (mem["peak_mb"] - mem["base_mb"]) / (mem_dense["peak_mb"] - mem_dense["base_mb"]) \
                    if mem_dense else float("nan")
                line += f"   peak {mem['peak_mb']:8.1f} MB ({ratio:.3f}x; above start {above:.3f}x)"
                unit = "MB (max_memory_allocated)" if args.device == "cuda" else "MB (peak RSS)"
                rows.append(dict(op=f"model:{compression}", provider=p if p != "fused" else f"fused-{backend}",
                                 mode="peak_memory", shape=shape, dtype="float32", median=f"{mem['peak_mb']:.1f}",
                                 p20=f"{mem['base_mb']:.1f}", p80="", device=dev, version=version, date=date,
                                 ratio_to_dense=f"{ratio:.4f}", unit=unit, threads=torch.get_num_threads(),
                                 rounds=args.memory_steps))
            print(line, flush=True)
    write_rows(rows, args.csv)
    print(f"# wrote {len(rows)} rows to {args.csv} (peak_memory rows: p20 holds the RSS before the model)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
