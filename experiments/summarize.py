"""Markdown tables from grid.py's JSON lines: mean ± std over seeds, and VCON's paired differences.

Usage::

    python experiments/summarize.py experiments/logs/minilm-main.jsonl [more.jsonl ...] [--split val|test]
        [--by compression|lr|transition|tag|mask_update|grad ...]

Rows are grouped by ``--by`` fields (default: compression); columns are the methods. The
last columns are VCON minus each baseline, seed by seed (same data order): the mean
difference in points, its std, and in how many seeds VCON was ahead.
"""

import argparse
import json
import statistics
from collections import OrderedDict

METHODS = ("dense", "oneshot", "gradual", "vcon-shared-bn", "vcon")
LABELS = {"dense": "dense", "oneshot": "one-shot", "gradual": "gradual", "vcon-shared-bn": "VCON (shared BN)",
          "vcon": "VCON"}


def load(paths):
    runs = []
    for path in paths:
        with open(path) as f:
            runs += [json.loads(line) for line in f if line.strip()]
    return runs


def mean_std(values):
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0), len(values)


def cell(stats, scale=100.0, digits=2):
    if stats is None:
        return "-"
    mean, std, n = stats
    return f"{mean * scale:.{digits}f} ± {std * scale:.{digits}f}" if n > 1 else f"{mean * scale:.{digits}f}"


def table(runs, split="test", by=("compression",), metric="acc"):
    key = f"{split}_{metric}"
    groups = OrderedDict()
    for r in runs:
        if key not in r:
            continue
        group = tuple(str(r.get(b, "")) for b in by)
        groups.setdefault(group, {}).setdefault(r["method"], {})[r["seed"]] = r[key]
    methods = [m for m in METHODS if any(m in g for g in groups.values())]
    header = list(by) + ["seeds"] + [f"{LABELS[m]} ({split} {metric})" for m in methods]
    baselines = [m for m in methods if m not in ("vcon", "dense")] if "vcon" in methods else []
    header += [f"VCON − {LABELS[b]} (wins)" for b in baselines]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for group, by_method in groups.items():
        seeds_done = [len(by_method[m]) for m in methods if by_method.get(m)]
        row = list(group) + [str(min(seeds_done)) if min(seeds_done) == max(seeds_done)
                             else f"{min(seeds_done)}-{max(seeds_done)}"]
        for m in methods:
            row.append(cell(mean_std(list(by_method.get(m, {}).values()))))
        for b in baselines:
            seeds = sorted(set(by_method.get(b, {})) & set(by_method.get("vcon", {})))
            diffs = [by_method["vcon"][s] - by_method[b][s] for s in seeds]
            stats = mean_std(diffs)
            if stats is None:
                row.append("-")
            else:
                sign = "+" if stats[0] >= 0 else ""
                wins = sum(d > 0 for d in diffs)
                row.append(f"{sign}{cell(stats)} ({wins}/{len(diffs)})")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("files", nargs="+")
    p.add_argument("--split", default="test", choices=("val", "test"))
    p.add_argument("--metric", default="acc", choices=("acc", "loss"))
    p.add_argument("--by", nargs="+", default=["compression"])
    args = p.parse_args()
    print(table(load(args.files), args.split, tuple(args.by), args.metric))


if __name__ == "__main__":
    main()
