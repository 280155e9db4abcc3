"""Finalized (compressed) layers vs the dense ``nn.Linear`` they replace: inference time.

One layer: every finalized format (``vk.finalize`` of a VCON layer at beta = 0) against a
dense ``nn.Linear`` of the same shape and dtype, ``torch.inference_mode``, for M (rows of
x) in {1, 16, 128, 2048}, K = N in {2048, 4096}, fp32 and bf16, 1 and 2 threads. Dense and
every format of one (M, K, dtype, threads) are measured interleaved in one process
(bench_common.measure_interleaved: median of per-round ratios), so the ratios are taken
between measurements seconds apart even on a shared, noisy machine.

Whole model: all-MiniLM-L6-v2 (the bundled copy of the minilm-rt task), 96 sentences x 48
tokens (random token ids: the time does not depend on the text), every encoder linear
finalized in each format, against the dense model; 2 threads (`--model-threads`).

Writes bench/data/infer.csv (merged by key), bench/data/infer_ratio_vs_m.png and
bench/data/infer.md (``_cpu`` suffixes with ``--clock cpu``): the markdown tables of
bench/RESULTS.md ("Finalized modules").

Example usage::

    python bench/bench_infer.py                       # the RESULTS.md grid (K = 4096 without M = 2048)
    python bench/bench_infer.py --k 2048 --m 1 16 --threads 1 --formats int8_channel csr_90
    python bench/bench_infer.py --model-only
    python bench/bench_infer.py --k 2048 --m 1 --threads 1 --clock cpu --rounds 15 --no-model
    python bench/bench_infer.py --tables-only --clock cpu    # data/infer_cpu.md from the CSV
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import DATA_DIR  # noqa: E402
from bench_common import device_name  # noqa: E402
from bench_common import measure_interleaved  # noqa: E402
from bench_common import now  # noqa: E402
from bench_common import read_rows  # noqa: E402
from bench_common import version_string  # noqa: E402
from bench_common import write_rows  # noqa: E402

import vcon_kernels as vk  # noqa: E402

INFER_CSV = os.path.join(DATA_DIR, "infer.csv")
FORMATS = {
    "int8_channel": lambda: vk.Quantize(bits=8),
    "int8_group128": lambda: vk.Quantize(bits=8, granularity="group", group_size=128),
    "int4_group128": lambda: vk.Quantize(bits=4, granularity="group", group_size=128),
    "int4_group32": lambda: vk.Quantize(bits=4, granularity="group", group_size=32),
    "binary_channel": lambda: vk.Quantize(bits=1),
    "nm_2_4": lambda: vk.Prune(granularity="nm", n=2, m=4),
    "nm_2_4_int8": lambda: vk.Compose(vk.Prune(granularity="nm", n=2, m=4), vk.Quantize(bits=8)),
    "csr_90": lambda: vk.Prune(sparsity=0.9),
    "csr_90_int8": lambda: vk.Compose(vk.Prune(sparsity=0.9), vk.Quantize(bits=8)),
    "lowrank_r128": lambda: vk.LowRank(rank=128),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def finalized_layer(fmt: str, k: int, n: int, dtype: torch.dtype, seed: int = 0):
    """(dense nn.Linear, its finalized compressed twin) of one format."""
    torch.manual_seed(seed)
    dense = nn.Linear(k, n, dtype=torch.float32)
    layer = vk.VCONLinear.from_linear(nn.Linear(k, n), FORMATS[fmt]())
    with torch.no_grad():
        layer.weight.copy_(dense.weight)
        layer.bias.copy_(dense.bias)
    layer.set_beta(0.0)
    final = vk.finalize(nn.Sequential(layer))[0]
    return dense.to(dtype), final.to(dtype)


def _forward(module, x):
    def run():
        with torch.inference_mode():
            module(x)
    return run


def _row(op, provider, shape, dtype, threads, stats, rounds, clock="wall"):
    return dict(op=op, provider=provider, mode=f"forward_{threads}t_{clock}", shape=shape, dtype=dtype,
                median=f"{stats['median']:.4f}", p20=f"{stats['p20']:.4f}", p80=f"{stats['p80']:.4f}",
                device=device_name("cpu"), version=version_string(), date=now(),
                ratio_to_dense=f"{stats['ratio_to_dense']:.3f}", unit="ms", threads=threads, rounds=rounds)


def bench_layers(args) -> list[dict]:
    rows = []
    for k in args.k:
        layers = {d: {f: finalized_layer(f, k, k, DTYPES[d]) for f in args.formats} for d in args.dtypes}
        for dname in args.dtypes:
            dense = layers[dname][args.formats[0]][0]
            for threads in args.threads:
                torch.set_num_threads(threads)
                for m in args.m:
                    if k >= 4096 and m >= 2048 and not args.big:
                        continue
                    x = torch.randn(m, k, dtype=DTYPES[dname])
                    fns = {"dense": _forward(dense, x)}
                    fns.update({f: _forward(layers[dname][f][1], x) for f in args.formats})
                    rounds = args.rounds if m < 2048 else max(3, args.rounds // 3)
                    stats = measure_interleaved(fns, rounds=rounds, min_time_s=0.02, clock=args.clock)
                    shape = f"{m}x{k}x{k}"
                    new = [_row("infer_linear", name, shape, dname, threads, st, rounds, args.clock)
                           for name, st in stats.items()]
                    write_rows(new, args.csv)  # as it goes: an interrupted run keeps what it measured
                    rows += new
                    line = "  ".join(f"{f} {stats[f]['ratio_to_dense']:.2f}" for f in args.formats)
                    print(f"{dname} K={k} M={m} {threads}t dense {stats['dense']['median']:.3f} ms | {line}",
                          flush=True)
    return rows


def bench_model(args) -> list[dict]:
    from vcon_kernels.tasks.minilm_rt import minilm_path
    from vcon_kernels.tasks.minilm_rt import quiet_transformers

    quiet_transformers()
    import transformers

    torch.set_num_threads(args.model_threads)
    path = minilm_path()

    def load():
        model = transformers.AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
        return model.eval()

    dense = load()
    ids = torch.randint(1000, 20000, (96, 48))
    mask = torch.ones_like(ids)
    models = {"dense": dense}
    for fmt in args.formats:
        model = vk.convert(load(), FORMATS[fmt](), filter_fn=lambda mod, name: "encoder" in name)
        for _, layer in vk.vcon_layers(model):
            layer.set_beta(0.0)
        models[fmt] = vk.finalize(model)

    def run(model):
        def f():
            with torch.inference_mode():
                model(input_ids=ids, attention_mask=mask)
        return f

    stats = measure_interleaved({name: run(m) for name, m in models.items()}, rounds=args.model_rounds,
                                clock=args.clock)
    threads = args.model_threads
    rows = [_row("infer_minilm", name, "96x48", "fp32", threads, st, args.model_rounds, args.clock)
            for name, st in stats.items()]
    cells = "  ".join(f"{n} {s['median']:.0f} ms ({s['ratio_to_dense']:.2f})" for n, s in stats.items())
    print(f"MiniLM 96x48 fp32 {threads}t {args.clock}: {cells}", flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    """The RESULTS.md tables: ratio to dense per format, one column per (dtype, threads, M)."""
    out = []
    layer = [r for r in rows if r["op"] == "infer_linear"]
    for k in sorted({int(r["shape"].split("x")[1]) for r in layer}):
        here = [r for r in layer if int(r["shape"].split("x")[1]) == k]
        cols = sorted({(r["dtype"], r["threads"], int(r["shape"].split("x")[0])) for r in here})
        head = [f"{d} {t}t M={m}" for d, t, m in cols]
        out.append(f"K = N = {k}: ratio to dense `nn.Linear` (same dtype, M, threads); first row: dense ms\n")
        out.append("| format | " + " | ".join(head) + " |")
        out.append("|---" * (len(head) + 1) + "|")
        by = {(r["provider"], r["dtype"], r["threads"], int(r["shape"].split("x")[0])): r for r in here}
        dense = [by.get(("dense", *c)) for c in cols]
        out.append("| dense (ms) | " + " | ".join(f"{float(r['median']):.3g}" if r else "" for r in dense) + " |")
        for fmt in [f for f in FORMATS if any(r["provider"] == f for r in here)]:
            cells = [by.get((fmt, *c)) for c in cols]
            out.append(f"| {fmt} | " + " | ".join(f"{float(r['ratio_to_dense']):.2f}" if r else "" for r in cells)
                       + " |")
        out.append("")
    model = [r for r in rows if r["op"] == "infer_minilm"]
    if model:
        out.append("MiniLM (96 x 48 tokens, fp32, every encoder linear finalized)\n")
        out.append("| model | threads, clock | median ms | ratio to dense |\n|---|---|---|---|")
        for r in model:
            out.append(f"| {r['provider']} | {r['mode'].removeprefix('forward_')} | {float(r['median']):.0f} | "
                       f"{float(r['ratio_to_dense']):.2f} |")
    return "\n".join(out)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layer = [r for r in rows if r["op"] == "infer_linear" and r["provider"] != "dense"]
    combos = sorted({(r["dtype"], r["threads"], r["shape"].split("x")[1]) for r in layer})
    fig, axes = plt.subplots(1, len(combos), figsize=(4.5 * len(combos), 4), squeeze=False)
    for ax, (d, t, k) in zip(axes[0], combos):
        for fmt in FORMATS:
            pts = sorted((int(r["shape"].split("x")[0]), float(r["ratio_to_dense"])) for r in layer
                         if r["provider"] == fmt and (r["dtype"], r["threads"], r["shape"].split("x")[1]) == (d, t, k))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=fmt)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set_xscale("log")
        ax.set_title(f"{d}, K=N={k}, {t} thread(s)")
        ax.set_xlabel("M")
        ax.set_ylabel("finalized / dense")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    parser.add_argument("--m", nargs="+", type=int, default=[1, 16, 128, 2048])
    parser.add_argument("--k", nargs="+", type=int, default=[2048, 4096])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--model-rounds", type=int, default=5)
    parser.add_argument("--model-threads", type=int, default=2)
    parser.add_argument("--clock", default="wall", choices=["wall", "cpu"],
                        help="cpu: process CPU time, immune to other jobs' time slicing (use with --threads 1)")
    parser.add_argument("--big", action="store_true", help="also K = 4096 at M = 2048 (minutes per dtype)")
    parser.add_argument("--model-only", action="store_true")
    parser.add_argument("--no-model", action="store_true")
    parser.add_argument("--tables-only", action="store_true", help="measure nothing: rewrite tables and plot")
    parser.add_argument("--csv", default=INFER_CSV)
    args = parser.parse_args(argv)
    if not args.tables_only:
        rows = [] if args.model_only else bench_layers(args)
        if not args.no_model:
            rows += bench_model(args)
        write_rows(rows, args.csv)
    # The tables and the plot cover every run of this clock in the CSV (runs of other K, M or
    # threads accumulate), not only this one.
    suffix = "" if args.clock == "wall" else f"_{args.clock}"
    rows = [r for r in read_rows(args.csv) if r["mode"].endswith(f"_{args.clock}")]
    if any(r["op"] == "infer_linear" for r in rows):
        plot(rows, os.path.join(DATA_DIR, f"infer_ratio_vs_m{suffix}.png"))
    text = markdown(rows)
    with open(os.path.join(DATA_DIR, f"infer{suffix}.md"), "w") as f:
        f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
