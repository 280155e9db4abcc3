"""The comparison table, its CSV/JSON files, and the accuracy + beta plot of a ``vcon compress`` run.

Rows aggregate the seeds of a method: ``mean ± sample std`` when there are several.
Paired differences compare VCON with each baseline seed by seed (same data order).

Example usage::

    rows = summarize(results, dense_info)
    print(format_table(rows))
    write_files("out/demo", payload, results, rows)
    plot_curves(results, "out/demo/curves.png", dense_acc=dense_info["val_acc"])
"""

from __future__ import annotations

import csv
import json
import os
import statistics
from collections import OrderedDict

METHOD_LABELS = {"dense": "dense (fine-tuned)", "oneshot": "one-shot + fine-tune", "gradual": "gradual", "vcon": "VCON"}
RUN_FIELDS = ("method", "seed", "test_acc", "test_loss", "val_acc", "val_loss", "train_time_s", "step_ms",
              "step_ms_median", "peak_mem_mib", "size_dense_mb", "size_before_mb", "size_after_mb",
              "layers_before_mb", "layers_after_mb", "finalize_max_abs_diff")
SUMMARY_FIELDS = ("test_acc", "test_loss", "val_acc", "train_time_s", "step_ms", "peak_mem_mib", "size_before_mb",
                  "size_after_mb", "layers_before_mb", "layers_after_mb")


def _stats(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(results: list, dense_info) -> list:
    """One dict per method (dense first): mean and std of every summary field, and the seed count.

    ``dense_info``: the fine-tuned dense model's metrics (one row), or None when the dense
    reference is among ``results`` (method "dense": the paper's protocol, one run per seed).
    """
    rows = []
    if dense_info is not None:
        rows.append({"method": "dense", "n": 1, **{f"{k}_mean": dense_info.get(k) for k in
                                                   ("test_acc", "test_loss", "val_acc", "train_time_s", "step_ms",
                                                    "peak_mem_mib")},
                     "size_before_mb_mean": dense_info.get("size_mb"), "size_after_mb_mean": dense_info.get("size_mb"),
                     "cached": dense_info.get("cached", False), "steps": dense_info.get("steps")})
    by_method = OrderedDict()
    for r in sorted(results, key=lambda r: r["method"] != "dense"):  # dense first, the rest in run order
        by_method.setdefault(r["method"], []).append(r)
    for method, runs in by_method.items():
        row = {"method": method, "n": len(runs), "detail": runs[0].get("method_detail", "")}
        for field in SUMMARY_FIELDS:
            row[f"{field}_mean"], row[f"{field}_std"] = _stats([r.get(field) for r in runs])
        rows.append(row)
    return rows


def paired(results: list, metric: str = "test_acc", against: str = "vcon") -> dict:
    """{baseline: (mean difference in points, std, wins, n)} of ``against`` minus each baseline, per seed."""
    by = {}
    for r in results:
        by.setdefault(r["method"], {})[r["seed"]] = r[metric]
    out = {}
    if against not in by:
        return out
    for method, seeds in by.items():
        if method in (against, "dense"):  # the dense reference is not a competitor
            continue
        common = sorted(set(seeds) & set(by[against]))
        if not common:
            continue
        diffs = [100 * (by[against][s] - seeds[s]) for s in common]
        mean, std = _stats(diffs)
        out[method] = (mean, std, sum(d > 0 for d in diffs), len(diffs))
    return out


def _fmt(row, field, scale=1.0, digits=1, suffix=""):
    mean = row.get(f"{field}_mean")
    if mean is None:
        return "-"
    std = row.get(f"{field}_std")
    text = f"{mean * scale:.{digits}f}"
    if row.get("n", 1) > 1 and std is not None:
        text += f" ± {std * scale:.{digits}f}"
    return text + suffix


def _size(row, field):
    mean = row.get(f"{field}_mean")
    return "-" if mean is None else f"{mean:.3g}"


def format_table(rows: list) -> str:
    """A plain-text table (accuracy and loss on the test split; sizes in MB)."""
    header = ["method", "test acc %", "test loss", "val acc %", "train time s", "ms/step", "peak mem MiB",
              "model MB (before -> after finalize)", "compressed layers MB"]
    lines = []
    for row in rows:
        time_cell = _fmt(row, "train_time_s", digits=0)
        if row["method"] == "dense" and row.get("cached"):
            time_cell += " (cached)"
        if row["method"] == "dense":
            size = _size(row, "size_before_mb")
            layers = "-"
        else:
            size = f"{_size(row, 'size_before_mb')} -> {_size(row, 'size_after_mb')}"
            layers = f"{_size(row, 'layers_before_mb')} -> {_size(row, 'layers_after_mb')}"
        lines.append([METHOD_LABELS.get(row["method"], row["method"]), _fmt(row, "test_acc", 100, 2),
                      _fmt(row, "test_loss", digits=3), _fmt(row, "val_acc", 100, 2), time_cell,
                      _fmt(row, "step_ms", digits=0), _fmt(row, "peak_mem_mib", digits=0), size, layers])
    widths = [max(len(str(x)) for x in col) for col in zip(header, *lines)]

    def render(cells):
        return "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([render(header), sep, *(render(line) for line in lines)])


def format_notes(rows: list, steps: int) -> str:
    """Caveats of the table: a dense row that trained fewer steps than the compressed runs (``steps`` each)."""
    lines = []
    for row in rows:
        if row["method"] == "dense" and row.get("steps") is not None and row["steps"] < steps:
            lines.append(f"note: the dense model was fine-tuned for {row['steps']} steps, fewer than the {steps} "
                         "steps of each compressed run (which start from it), so the compressed rows trained "
                         "longer in total; raise --dense-steps for a like-for-like dense row")
    return "\n".join(lines)


def format_paired(results: list) -> str:
    lines = []
    for method, (mean, std, wins, n) in paired(results).items():
        label = METHOD_LABELS.get(method, method)
        spread = f" ± {std:.2f}" if n > 1 else ""
        lines.append(f"VCON - {label}: {mean:+.2f}{spread} points test accuracy (VCON ahead in {wins}/{n} seeds)")
    return "\n".join(lines)


def write_files(out_dir: str, payload: dict, results: list, rows: list) -> dict:
    """results.json (everything, curves included), runs.csv (one line per run), summary.csv; returns the paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "runs_csv": os.path.join(out_dir, "runs.csv"),
             "summary_csv": os.path.join(out_dir, "summary.csv")}
    clean = [{k: v for k, v in r.items() if k != "model"} for r in results]
    with open(paths["json"], "w") as f:
        json.dump({**payload, "summary": rows, "runs": clean}, f, indent=1, default=str)
    with open(paths["runs_csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=RUN_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(clean)
    fields = ["method", "n"] + [f"{k}_{s}" for k in SUMMARY_FIELDS for s in ("mean", "std")]
    with open(paths["summary_csv"], "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return paths


def mean_curves(results: list) -> dict:
    """{method: [(step, mean val acc, mean beta)]} at the evaluation points, averaged over seeds."""
    curves = OrderedDict()
    for r in results:
        for point in r["history"]:
            slot = curves.setdefault(r["method"], OrderedDict()).setdefault(point["step"], ([], []))
            if "val_acc" in point:
                slot[0].append(point["val_acc"])
            slot[1].append(point["beta"])
    return {m: [(s, statistics.fmean(a) if a else None, statistics.fmean(b)) for s, (a, b) in pts.items()]
            for m, pts in curves.items()}


def beta_curves(results: list) -> dict:
    """{method: [beta after step t for t = 0..T]} (the first seed's; beta does not depend on the seed)."""
    out = OrderedDict()
    for r in results:
        if "beta_curve" in r:
            out.setdefault(r["method"], r["beta_curve"])
    return out


def plot_curves(results: list, path: str, dense_acc=None, title: str = "") -> str:
    """PNG with validation accuracy (top) and beta / fraction still dense (bottom) against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"dense": "black", "oneshot": "tab:red", "gradual": "tab:orange", "vcon": "tab:blue"}
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    for method, pts in mean_curves(results).items():
        steps = [p[0] for p in pts if p[1] is not None]
        top.plot(steps, [100 * p[1] for p in pts if p[1] is not None], marker="o", ms=3,
                 label=METHOD_LABELS.get(method, method), color=colors.get(method))
        betas = beta_curves(results).get(method)
        if betas is None:
            bottom.plot([p[0] for p in pts], [p[2] for p in pts], color=colors.get(method))
        else:
            bottom.plot(range(len(betas)), betas, color=colors.get(method))
    if dense_acc is not None:
        top.axhline(100 * dense_acc, color="gray", ls="--", lw=1, label="dense")
    top.set_ylabel("validation accuracy (%)")
    top.legend(fontsize=8)
    top.grid(alpha=0.3)
    if title:
        top.set_title(title, fontsize=9)
    bottom.set_ylabel("beta (VCON) /\nfraction dense")
    bottom.set_xlabel("fine-tuning step")
    bottom.set_ylim(-0.05, 1.05)
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


__all__ = ["format_notes", "format_paired", "format_table", "mean_curves", "paired", "plot_curves", "summarize",
           "write_files"]
