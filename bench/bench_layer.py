"""One VCON linear layer against nn.Linear: time per forward / backward / full step.

Providers: ``dense`` (nn.Linear, the baseline), ``naive`` (the two-pass reference.py),
``torch`` (vcon, plain-torch backend), ``cpp`` (vcon, C++ CPU backend) and ``triton``
(vcon on CUDA, when present). Each comparison (one compression, one shape, one mode)
measures all providers interleaved in one process; ratios to dense are medians of
per-round ratios (bench_common.measure_interleaved).

Shapes are ``M x K x N``: M rows of input (batch x sequence), a K -> N layer. The full
sweep is M in {16, 128, 1024, 4096} x K = N in {512, 1024, 4096}, every compression and
mode: hours on 2 cores. ``--quick`` runs what the targets need: every compression and
mode at 2048 x 1024 x 1024, and the M sweep (forward, full) at K = N = 1024 for the
target compressions.

Writes a table to stdout, rows to bench/data/results.csv (merged by key) and PNG plots
to bench/data/.

Example usage::

    python bench/bench_layer.py --quick
    python bench/bench_layer.py --modes full --compressions prune_layer --m 16,128,1024,4096 --kn 1024
    python bench/bench_layer.py --shapes 2048x1024x1024 --rounds 31 --threads 2
    python bench/bench_layer.py --dtype autocast_bf16 --modes full --shapes 2048x1024x1024   # mixed precision
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import CLOCKS  # noqa: E402
from bench_common import COMPRESSIONS  # noqa: E402
from bench_common import DATA_DIR  # noqa: E402
from bench_common import MODES  # noqa: E402
from bench_common import RESULTS_CSV  # noqa: E402
from bench_common import TARGET_COMPRESSIONS  # noqa: E402
from bench_common import clock_unit  # noqa: E402
from bench_common import device_name  # noqa: E402
from bench_common import layer_providers  # noqa: E402
from bench_common import measure_interleaved  # noqa: E402
from bench_common import now  # noqa: E402
from bench_common import read_rows  # noqa: E402
from bench_common import version_string  # noqa: E402
from bench_common import write_rows  # noqa: E402

FULL_M = (16, 128, 1024, 4096)
FULL_KN = (512, 1024, 4096)
TARGET_SHAPE = (2048, 1024, 1024)
QUICK_M = (16, 128, 512, 1024, 2048, 4096)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64,
          # fp32 parameters and inputs under torch.autocast(bf16): mixed-precision training
          "autocast_bf16": torch.float32}
AUTOCAST = {"autocast_bf16": torch.bfloat16}


def _csv_list(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _shape(text: str) -> tuple:
    try:
        m, k, n = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"shape must be MxKxN (e.g. 2048x1024x1024), got {text!r}") from None
    return m, k, n


def plan(args) -> list[tuple]:
    """[(compression, (m, k, n), mode)] in run order."""
    modes = args.modes or list(MODES)
    compressions = args.compressions or list(COMPRESSIONS)
    if args.shapes:
        shapes = args.shapes
    elif args.m or args.kn:
        shapes = [(m, kn, kn) for kn in (args.kn or FULL_KN) for m in (args.m or FULL_M)]
    elif args.quick:
        shapes = None
    else:
        shapes = [(m, kn, kn) for kn in FULL_KN for m in FULL_M] + [TARGET_SHAPE]
    jobs = []
    for mode in modes:
        if shapes is None:  # quick: every compression at the target shape, the M sweep for the targeted ones
            jobs += [(c, TARGET_SHAPE, mode) for c in compressions]
            if mode != "backward":
                jobs += [(c, (m, 1024, 1024), mode) for c in compressions if c in TARGET_COMPRESSIONS
                         for m in QUICK_M if (m, 1024, 1024) != TARGET_SHAPE]
        else:
            jobs += [(c, s, mode) for c in compressions for s in shapes]
    return jobs


def run(args) -> list[dict]:
    device = args.device
    dtype = DTYPES[args.dtype]
    version, date, dev = version_string(), now(), device_name(device)
    rows = []
    jobs = plan(args)
    print(f"# {len(jobs)} comparisons on {dev}; {version}; {args.rounds} interleaved rounds each; "
          f"{args.clock} clock", flush=True)
    header = f"{'mode':8s} {'compression':14s} {'shape':16s} " + " ".join(f"{p:>17s}" for p in args.providers)
    print(header + "   (median ms, ratio to dense)", flush=True)
    for compression, (m, k, n), mode in jobs:
        fns = layer_providers(compression, m, k, n, mode, dtype, device, providers=args.providers,
                              autocast=AUTOCAST.get(args.dtype))
        stats = measure_interleaved(fns, rounds=args.rounds, device=device, clock=args.clock)
        shape = f"{m}x{k}x{n}"
        cells = []
        for provider in args.providers:
            s = stats.get(provider)
            if s is None:
                cells.append(f"{'-':>17s}")
                continue
            cells.append(f"{s['median']:9.3f} ({s['ratio_to_dense']:5.2f})")
            rows.append(dict(op=compression, provider=provider, mode=mode, shape=shape, dtype=args.dtype,
                             median=f"{s['median']:.4f}", p20=f"{s['p20']:.4f}", p80=f"{s['p80']:.4f}", device=dev,
                             version=version, date=date, ratio_to_dense=f"{s['ratio_to_dense']:.4f}",
                             unit=clock_unit(args.clock),
                             threads=torch.get_num_threads(), rounds=args.rounds))
        print(f"{mode:8s} {compression:14s} {shape:16s} " + " ".join(cells), flush=True)
        del fns
    return rows


# -- plots -----------------------------------------------------------------------------------------------
def config_tag(threads: int, clock: str) -> str:
    """Suffix of the plot files of one measurement configuration, e.g. "2t_wall"."""
    return f"{threads}t_{clock}"


def plot(rows: list[dict], out_dir: str = DATA_DIR, dtype: str = "float32", tag: str = "") -> list[str]:
    """PNG plots from the CSV rows of one configuration: ratio to dense against M (K = N = 1024),
    and at the target shape. File names end in ``_{tag}``."""
    suffix = f"_{tag}" if tag else ""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("# matplotlib not installed: no plots (pip install -e '.[bench]')")
        return []
    os.makedirs(out_dir, exist_ok=True)
    written = []
    cpu_rows = [r for r in rows if r["dtype"] == dtype and r["provider"] != "dense"]
    for mode in MODES:
        sweep = {}
        for r in cpu_rows:
            m, k, n = (int(v) for v in r["shape"].split("x"))
            if r["mode"] == mode and k == 1024 and n == 1024 and r["provider"] in ("cpp", "triton", "naive"):
                sweep.setdefault((r["op"], r["provider"]), []).append((m, float(r["ratio_to_dense"])))
        sweep = {key: points for key, points in sweep.items() if len(points) >= 2}
        if not sweep:
            continue
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for (op, provider), points in sorted(sweep.items()):
            points.sort()
            style = "--" if provider == "naive" else "-"
            ax.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=f"{op} ({provider})")
        ax.axhline(1.0, color="black", lw=0.8)
        ax.axhline(1.05, color="grey", ls=":", lw=0.8)
        ax.axhline(1.10, color="grey", ls=":", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log", base=2)
        ax.set_xlabel("M (rows of input), K = N = 1024")
        ax.set_ylabel("time / dense nn.Linear (median of rounds)")
        ax.set_title(f"VCON linear, {mode} step, {dtype} ({tag})")
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        path = os.path.join(out_dir, f"ratio_vs_m_{mode}{suffix}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    target = "x".join(str(v) for v in TARGET_SHAPE)
    at_target = [r for r in cpu_rows if r["shape"] == target]
    if at_target:
        ops = sorted({r["op"] for r in at_target})
        modes = [m for m in MODES if any(r["mode"] == m for r in at_target)]
        providers = [p for p in ("naive", "torch", "cpp", "triton") if any(r["provider"] == p for r in at_target)]
        fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4.5), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            width = 0.8 / max(len(providers), 1)
            for i, provider in enumerate(providers):
                values = []
                for op in ops:
                    match = [r for r in at_target if r["op"] == op and r["mode"] == mode and r["provider"] == provider]
                    values.append(float(match[0]["ratio_to_dense"]) if match else 0.0)
                ax.bar([j + i * width for j in range(len(ops))], values, width, label=provider)
            ax.axhline(1.0, color="black", lw=0.8)
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(ops))])
            ax.set_xticklabels(ops, rotation=45, ha="right", fontsize=8)
            ax.set_title(f"{mode}, {target}")
            ax.set_ylabel("time / dense")
            ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(out_dir, f"ratio_at_target_shape{suffix}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the target shape + the M sweep at K = N = 1024")
    parser.add_argument("--modes", type=_csv_list, help=f"comma list of {MODES}")
    parser.add_argument("--compressions", type=_csv_list, help=f"comma list of {tuple(COMPRESSIONS)}")
    parser.add_argument("--shapes", type=lambda s: [_shape(v) for v in _csv_list(s)], help="comma list of MxKxN")
    parser.add_argument("--m", type=lambda s: [int(v) for v in _csv_list(s)], help="comma list of M (with --kn)")
    parser.add_argument("--kn", type=lambda s: [int(v) for v in _csv_list(s)], help="comma list of K = N")
    parser.add_argument("--providers", type=_csv_list, help="comma list of dense,naive,torch,cpp,triton")
    parser.add_argument("--rounds", type=int, default=15, help="interleaved rounds per comparison (default 15)")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--clock", default="wall", choices=tuple(CLOCKS),
                        help="wall time (default) or process CPU time (robust on a busy machine; use --threads 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES))
    parser.add_argument("--csv", default=RESULTS_CSV, help="CSV to merge the rows into")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    for name in args.compressions or []:
        if name not in COMPRESSIONS:
            parser.error(f"--compressions: {name!r} is not one of {tuple(COMPRESSIONS)}")
    for name in args.modes or []:
        if name not in MODES:
            parser.error(f"--modes: {name!r} is not one of {MODES}")
    if args.threads:
        torch.set_num_threads(args.threads)
    from bench_common import vcon_providers

    args.providers = args.providers or (["dense"] + vcon_providers(args.device))
    rows = run(args)
    write_rows(rows, args.csv)
    print(f"# wrote {len(rows)} rows to {args.csv}")
    if not args.no_plots:
        dev, unit = device_name(args.device), clock_unit(args.clock)
        mine = [r for r in read_rows(args.csv) if r["device"] == dev and r["unit"] == unit]
        tag = config_tag(torch.get_num_threads(), args.clock)
        for path in plot(mine, os.path.dirname(os.path.abspath(args.csv)), args.dtype, tag):
            print(f"# plot {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
