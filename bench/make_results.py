"""Regenerate bench/RESULTS.md from bench/data/results.csv (the latest row of every key).

Example usage::

    python bench/bench_layer.py --quick && python bench/bench_model.py && python bench/make_results.py
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_common import BENCH_DIR  # noqa: E402
from bench_common import COMPRESSIONS  # noqa: E402
from bench_common import RESULTS_CSV  # noqa: E402
from bench_common import read_rows  # noqa: E402

TARGET = "2048x1024x1024"
# fused / dense targets of the CPU work (issue: fp32, 2 cores, measured side by side).
FULL_TARGET = {"prune_layer": 1.05, "int8_channel": 1.05, "binary_tensor": 1.05, "lowrank_r64": 1.10}
FORWARD_TARGET = 1.10
MODEL_TIME_TARGET = 1.10
MODEL_MEMORY_TARGET = 1.05
FUSED = ("cpp", "triton")

REPRODUCE = """\
```bash
make bench                                   # the three commands below (about 30-60 min on 2 busy cores)
python bench/bench_layer.py --quick          # every compression at 2048x1024x1024 + the M sweep at K=N=1024
python bench/bench_model.py                  # 12-layer stack: time per step and peak memory
python bench/make_results.py                 # this file, from bench/data/results.csv
```
Other runs: `python bench/bench_layer.py` (the full sweep M in {16,128,1024,4096} x K=N in
{512,1024,4096} x every compression and mode: hours on 2 cores), `--modes/--shapes/--m/--kn/
--compressions/--providers/--threads` to filter, `pytest bench/ --benchmark-only` for the
pytest-benchmark regression suite."""


def _f(value, fmt="{:.2f}") -> str:
    try:
        return fmt.format(float(value))
    except (TypeError, ValueError):
        return "-"


def _index(rows):
    return {(r["op"], r["provider"], r["mode"], r["shape"], r["dtype"]): r for r in rows}


def _fused_provider(rows) -> str:
    names = {r["provider"] for r in rows}
    return next((p for p in FUSED if p in names), "cpp")


def _verdict(ratio, target) -> str:
    try:
        ratio = float(ratio)
    except (TypeError, ValueError):
        return "not measured"
    if ratio <= target:
        return "met"
    return f"missed by {ratio - target:.3f}"


def targets_table(idx, fused, dtype="float32") -> list[str]:
    out = ["| compression | forward fused/dense | full fused/dense | full target | forward target "
           "| naive full / dense | plain-torch vcon full / dense | dense full ms (p20-p80) |",
           "|---|---|---|---|---|---|---|---|"]
    for op, target in FULL_TARGET.items():
        fwd = idx.get((op, fused, "forward", TARGET, dtype), {})
        full = idx.get((op, fused, "full", TARGET, dtype), {})
        naive = idx.get((op, "naive", "full", TARGET, dtype), {})
        torch_ = idx.get((op, "torch", "full", TARGET, dtype), {})
        dense = idx.get((op, "dense", "full", TARGET, dtype), {})
        fwd_ratio, full_ratio = fwd.get("ratio_to_dense"), full.get("ratio_to_dense")
        spread = f"{_f(dense.get('p20'), '{:.1f}')}-{_f(dense.get('p80'), '{:.1f}')}"
        out.append(
            f"| {op} | {_f(fwd_ratio, '{:.3f}')} ({_verdict(fwd_ratio, FORWARD_TARGET)})"
            f" | {_f(full_ratio, '{:.3f}')} ({_verdict(full_ratio, target)})"
            f" | {target:.2f} | {FORWARD_TARGET:.2f} | {_f(naive.get('ratio_to_dense'))} "
            f"| {_f(torch_.get('ratio_to_dense'))} | {_f(dense.get('median'), '{:.1f}')} ({spread}) |"
        )
    return out


AUTOCAST_TARGET = 1.15  # full step under CPU bf16 autocast, prune / int8 / binary (mixed-precision issue)


def autocast_table(idx, fused) -> list[str]:
    """The bf16-autocast rows (fp32 parameters, `bench_layer.py --dtype autocast_bf16`), or [] if none."""
    out = ["| compression | full fused/dense | target | forward fused/dense | plain-torch vcon full / dense "
           "| dense full ms (p20-p80) |", "|---|---|---|---|---|---|"]
    for op in ("prune_layer", "int8_channel", "binary_tensor", "lowrank_r64"):
        full = idx.get((op, fused, "full", TARGET, "autocast_bf16"))
        if full is None:
            continue
        fwd = idx.get((op, fused, "forward", TARGET, "autocast_bf16"), {})
        torch_ = idx.get((op, "torch", "full", TARGET, "autocast_bf16"), {})
        dense = idx.get((op, "dense", "full", TARGET, "autocast_bf16"), {})
        target = AUTOCAST_TARGET if op != "lowrank_r64" else None
        verdict = f" ({_verdict(full['ratio_to_dense'], target)})" if target else ""
        out.append(f"| {op} | {_f(full['ratio_to_dense'], '{:.3f}')}{verdict} | {target or '-'} "
                   f"| {_f(fwd.get('ratio_to_dense'), '{:.3f}')} | {_f(torch_.get('ratio_to_dense'))} "
                   f"| {_f(dense.get('median'), '{:.1f}')} ({_f(dense.get('p20'), '{:.1f}')}-"
                   f"{_f(dense.get('p80'), '{:.1f}')}) |")
    return out if len(out) > 2 else []


def m_sweep_table(rows, fused, dtype="float32") -> list[str]:
    sweep = {}
    for r in rows:
        if r["provider"] != fused or r["dtype"] != dtype:
            continue
        m, k, n = (int(v) for v in r["shape"].split("x"))
        if k == 1024 and n == 1024:
            sweep.setdefault((r["op"], r["mode"]), {})[m] = float(r["ratio_to_dense"])
    ms = sorted({m for values in sweep.values() for m in values})
    if not ms:
        return ["(no M sweep measured)"]
    out = ["| compression | mode | " + " | ".join(f"M={m}" for m in ms) + " | target | met from M = |",
           "|---|---|" + "---|" * len(ms) + "---|---|"]
    for (op, mode), values in sorted(sweep.items()):
        if len(values) < 2:
            continue
        target = FORWARD_TARGET if mode == "forward" else FULL_TARGET.get(op, 1.05)
        # crossover: the smallest M from which every larger measured M meets the target
        crossover = "-"
        for m in sorted(values):
            if all(values[m2] <= target for m2 in values if m2 >= m):
                crossover = str(m)
                break
        cells = " | ".join(_f(values.get(m)) for m in ms)
        out.append(f"| {op} | {mode} | {cells} | {target:.2f} | {crossover} |")
    return out


def model_table(rows) -> list[str]:
    models = [r for r in rows if r["op"].startswith("model:")]
    if not models:
        return ["(bench_model.py not run yet)"]
    shape = models[0]["shape"]
    out = [f"Stack {shape} (blocks x (batch, sequence, width, MLP width)), fp32, AdamW step at beta = 0.5; "
           "the 4 linear layers of every block are VCON layers.", "",
           "| compression | provider | step ms (p20-p80) | time / dense | peak memory MB | memory / dense |",
           "|---|---|---|---|---|---|"]
    idx = _index(models)
    ops = sorted({r["op"] for r in models})
    for op in ops:
        providers = sorted({r["provider"] for r in models if r["op"] == op},
                           key=lambda p: ("dense", "naive").index(p) if p in ("dense", "naive") else 2)
        for p in providers:
            t = idx.get((op, p, "train_step", shape, "float32"), {})
            mem = idx.get((op, p, "peak_memory", shape, "float32"), {})
            out.append(f"| {op[6:]} | {p} | {_f(t.get('median'), '{:.0f}')} ({_f(t.get('p20'), '{:.0f}')}-"
                       f"{_f(t.get('p80'), '{:.0f}')}) | {_f(t.get('ratio_to_dense'), '{:.3f}')} "
                       f"| {_f(mem.get('median'), '{:.0f}')} | {_f(mem.get('ratio_to_dense'), '{:.3f}')} |")
    out += ["", f"Targets for the fused provider: time <= {MODEL_TIME_TARGET:.2f}x dense, "
                f"peak memory <= {MODEL_MEMORY_TARGET:.2f}x dense. Peak memory on CPU is the peak RSS (VmHWM) of a "
                "fresh process, interpreter and libraries included (about 220 MB of it)."]
    return out


def all_modes_table(idx, rows, dtype="float32") -> list[str]:
    providers = [p for p in ("dense", "naive", "torch", "cpp", "triton") if any(r["provider"] == p for r in rows)]
    out = ["| compression | mode | " + " | ".join(providers) + " |", "|---|---|" + "---|" * len(providers)]
    for op in COMPRESSIONS:
        for mode in ("forward", "backward", "full"):
            cells = []
            for p in providers:
                r = idx.get((op, p, mode, TARGET, dtype))
                cells.append("-" if r is None else f"{float(r['median']):.1f} ms ({float(r['ratio_to_dense']):.2f}x)")
            if any(c != "-" for c in cells):
                out.append(f"| {op} | {mode} | " + " | ".join(cells) + " |")
    return out


def _config_name(device: str, unit: str, dates=()) -> str:
    """E.g. "AMD EPYC, 1 thread, CPU time, 2026-12-06": rows of other machines or days are other configurations."""
    threads = device.rsplit("torch threads ", 1)[-1].rstrip(")") if "torch threads" in device else "?"
    clock = "CPU time" if "cpu" in unit else "wall time"
    when = f", {' to '.join(sorted(set(dates))[::max(len(set(dates)) - 1, 1)])}" if dates else ""
    return f"{device.split(' (')[0]}, {threads} thread{'s' if threads != '1' else ''}, {clock}{when}"


def _configs(rows) -> list[tuple]:
    """[(device, unit)] of the timed rows, the most recently measured first."""
    latest = {}
    for r in rows:
        if r["mode"] != "peak_memory":
            key = (r["device"], r["unit"])
            latest[key] = max(latest.get(key, ""), r["date"])
    return sorted(latest, key=lambda c: (latest[c], c), reverse=True)


def render(rows, notes_path: str) -> str:
    dates = sorted({r["date"][:10] for r in rows})
    latest = max(rows, key=lambda r: r["date"]) if rows else {}
    lines = [
        "# vcon_kernels: benchmark results",
        "",
        "Generated by `bench/make_results.py` from `bench/data/results.csv` (the latest measurement of each case).",
        "",
        f"- Measured: {', '.join(dates) or '-'} (latest row {latest.get('date', '-')})",
        f"- Machine of the latest row: {(latest.get('device') or '-').split(' (')[0]}, {os.cpu_count()} cpus "
        "(each configuration below names its machine and dates)",
        f"- Code: {latest.get('version', '-')}",
        "- Method: every provider of a comparison runs in the same process, interleaved in random order per round;",
        "  medians (and 20th/80th percentiles) of per-round times, ratios = medians of per-round ratios to dense.",
        "  The machine is shared with other jobs, so absolute times move by 2x between runs; the ratios are what",
        "  the targets are about. Configurations: wall time with torch's threads (the targets' definition), and",
        "  CPU time with one thread (`--threads 1 --clock cpu`), which other jobs' time slicing cannot inflate.",
        "",
        "## How to reproduce",
        "",
        REPRODUCE,
        "",
    ]
    for device, unit in _configs(rows):
        cfg_rows = [r for r in rows if r["device"] == device and r["unit"] in (unit, "") or
                    (r["device"] == device and r["mode"] == "peak_memory")]
        layer_rows = [r for r in cfg_rows if not r["op"].startswith("model:")]
        fused = _fused_provider(layer_rows)
        idx = _index(layer_rows)
        name = _config_name(device, unit, [r["date"][:10] for r in cfg_rows])
        threads = device.rsplit("torch threads ", 1)[-1].rstrip(")") if "torch threads" in device else "?"
        tag = f"{threads}t_{'cpu' if 'cpu' in unit else 'wall'}"
        lines += [f"# Configuration: {name}", ""]
        if layer_rows:
            lines += [
                f"## CPU targets: one layer, M=2048, K=N=1024, fp32 ({fused} = the fused path; {name})",
                "",
                *targets_table(idx, fused),
                "",
            ]
            autocast = autocast_table(idx, fused)
            if autocast:
                lines += [
                    f"## Mixed precision: the same layer under CPU bf16 autocast, fp32 parameters ({name})",
                    "",
                    "Every provider, nn.Linear included, runs under `torch.autocast('cpu', torch.bfloat16)` "
                    "(`bench_layer.py --dtype autocast_bf16`).",
                    "",
                    *autocast,
                    "",
                ]
            lines += [
                f"## How the ratio moves with M (K = N = 1024, fused / dense; {name})",
                "",
                *m_sweep_table(layer_rows, fused),
                "",
                f"## Every compression and mode at {TARGET} (median {unit}, ratio to dense; {name})",
                "",
                *all_modes_table(idx, layer_rows),
                "",
                f"![ratio vs M, full step](data/ratio_vs_m_full_{tag}.png)",
                f"![ratio vs M, forward](data/ratio_vs_m_forward_{tag}.png)",
                f"![ratios at the target shape](data/ratio_at_target_shape_{tag}.png)",
                "",
            ]
        model_rows = [r for r in cfg_rows if r["op"].startswith("model:")]
        if model_rows:
            lines += [f"## 12-layer transformer-like stack ({name})", "", *model_table(model_rows), ""]
    if os.path.exists(notes_path):
        with open(notes_path) as f:
            lines += ["# Notes", "", f.read().strip(), ""]
    lines += infer_section()
    return "\n".join(lines)


def infer_section() -> list[str]:
    """The finalized-modules section: bench_infer.py's tables (data/infer.md) + INFER_NOTES.md."""
    tables = os.path.join(BENCH_DIR, "data", "infer.md")
    notes = os.path.join(BENCH_DIR, "INFER_NOTES.md")
    if not os.path.exists(tables):
        return []
    with open(tables) as f:
        out = ["# Finalized modules (`python bench/bench_infer.py`, data/infer.csv)", "", f.read().strip(), "",
               "![ratio vs M](data/infer_ratio_vs_m.png)", ""]
    cpu_tables = os.path.join(BENCH_DIR, "data", "infer_cpu.md")
    if os.path.exists(cpu_tables):  # runs with --clock cpu (process CPU time, 1 thread)
        with open(cpu_tables) as f:
            out += ["## Finalized modules, process CPU time (`--clock cpu --threads 1`)", "", f.read().strip(), "",
                    "![ratio vs M, CPU time](data/infer_ratio_vs_m_cpu.png)", ""]
    if os.path.exists(notes):
        with open(notes) as f:
            out += [f.read().strip(), ""]
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--csv", default=RESULTS_CSV)
    parser.add_argument("--out", default=os.path.join(BENCH_DIR, "RESULTS.md"))
    parser.add_argument("--notes", default=os.path.join(BENCH_DIR, "NOTES.md"),
                        help="hand-written analysis appended as the Notes section")
    args = parser.parse_args(argv)
    rows = read_rows(args.csv)
    with open(args.out, "w") as f:
        f.write(render(rows, args.notes))
    print(f"wrote {args.out} from {len(rows)} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())
