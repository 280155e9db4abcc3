"""Loading a compressed all-MiniLM-L6-v2: peak memory and time, each load in a fresh process.

Folders (written once into ``--work``): the 36 encoder linears finalized as int4 group 32 and
as CSR at 90% sparsity (``hf.save_pretrained_compressed``), and the int4 model exported to
compressed-tensors. Providers:

* ``dense``: ``AutoModelForSequenceClassification.from_pretrained`` of the original folder;
* ``vcon <fmt>``: ``hf.from_pretrained_compressed`` (the architecture built on the meta device);
* ``vcon <fmt>, built first``: what the loader did before: build (and randomly initialize) the
  dense model, then ``vk.load_compressed(model, dir)``;
* ``compressed-tensors int4``: plain transformers + compressed-tensors (no vcon_kernels), plus one
  forward (which decompresses the weights to dense).

Each run is a fresh subprocess; it reports its RSS just before loading, its peak RSS (VmHWM)
after the load and one forward of 5 tokens (which touches every weight), and the wall time of
the load call. Medians over ``--repeats`` runs; the machine may be
shared (see the load average printed with the table).

Example usage::

    python bench/bench_load.py --repeats 3
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHILD = r"""
import json, os, sys, time
def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
import torch, transformers
transformers.utils.logging.set_verbosity_error()
kind, folder = sys.argv[1], sys.argv[2]
if kind.startswith("vcon"):
    import vcon_kernels as vk
    from vcon_kernels.integrations import hf
ids = torch.tensor([[101, 1037, 2204, 2143, 102]])
before = rss("VmRSS")
t = time.perf_counter()
if kind == "dense" or kind == "ct":
    model = transformers.AutoModelForSequenceClassification.from_pretrained(folder, num_labels=2)
    if kind == "ct":
        with torch.no_grad():
            model(input_ids=ids)  # compressed-tensors decompresses on the first forward: part of loading
elif kind == "vcon":
    model = hf.from_pretrained_compressed(folder)
else:  # vcon-built: build the dense model first (random init), then load into it
    config = transformers.AutoConfig.from_pretrained(folder)
    model = vk.load_compressed(transformers.BertForSequenceClassification(config), folder)
seconds = time.perf_counter() - t
with torch.no_grad():
    model(input_ids=ids)  # touches every weight (a loaded file may be paged in lazily)
print(json.dumps({"rss_before": before, "peak": rss("VmHWM"), "seconds": seconds}))
"""


def prepare(work: str) -> dict:
    sys.path.insert(0, ROOT)
    import torch
    import transformers

    import vcon_kernels as vk
    from vcon_kernels.integrations import hf
    from vcon_kernels.tasks.minilm_rt import minilm_path
    from vcon_kernels.tasks.minilm_rt import quiet_transformers

    quiet_transformers()
    folders = {"dense": minilm_path()}
    configs = {"int4 g32": vk.Quantize(bits=4, granularity="group", group_size=32), "CSR 90%": vk.Prune(sparsity=0.9)}
    for name, config in configs.items():
        path = os.path.join(work, name.replace(" ", "-").replace("%", ""))
        folders[name] = path
        if name == "int4 g32":
            folders["ct int4 g32"] = path + "-ct"
        if os.path.exists(os.path.join(path, "vcon_compression.json")):
            continue
        torch.manual_seed(0)
        model = transformers.AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=2)
        hf.convert(model, config, include=["*encoder.layer.*"])
        for _, layer in vk.vcon_layers(model):
            layer.set_beta(0.0)
        model = vk.finalize(model)
        hf.save_pretrained_compressed(model, path)
        if name == "int4 g32":
            hf.save_pretrained_compressed(model, path + "-ct", format="compressed-tensors")
    return folders


def run(kind: str, folder: str) -> dict:
    env = {**os.environ, "PYTHONPATH": ROOT, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", CHILD, kind, folder], capture_output=True, text=True, env=env,
                         timeout=600)
    if res.returncode:
        raise RuntimeError(f"{kind} {folder}: {res.stderr[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--work", default=os.path.join(tempfile.gettempdir(), "vcon-bench-load"))
    parser.add_argument("--csv", default=os.path.join(HERE, "data", "load.csv"))
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    os.makedirs(args.work, exist_ok=True)
    folders = prepare(args.work)
    cases = [("dense", "dense", folders["dense"]),
             ("vcon int4 g32", "vcon", folders["int4 g32"]),
             ("vcon int4 g32, built first", "vcon-built", folders["int4 g32"]),
             ("vcon CSR 90%", "vcon", folders["CSR 90%"]),
             ("vcon CSR 90%, built first", "vcon-built", folders["CSR 90%"]),
             ("compressed-tensors int4 g32 (+1 forward)", "ct", folders["ct int4 g32"])]
    rows = []
    for _ in range(args.repeats):  # interleaved, so that a load spike hits every provider alike
        for label, kind, folder in cases:
            rows.append({"provider": label, **run(kind, folder)})
    summary = []
    for label, _, folder in cases:
        mine = [r for r in rows if r["provider"] == label]
        files = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder) if f.endswith(".safetensors"))
        summary.append({"provider": label, "file_mb": files / 1e6,
                        "peak_above_start_mb": statistics.median((r["peak"] - r["rss_before"]) / 1e6 for r in mine),
                        "peak_mb": statistics.median(r["peak"] / 1e6 for r in mine),
                        "seconds": statistics.median(r["seconds"] for r in mine), "runs": len(mine)})
    os.makedirs(os.path.dirname(args.csv), exist_ok=True)
    with open(args.csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(summary[0]))
        writer.writeheader()
        writer.writerows(summary)
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; medians of {args.repeats} fresh processes")
    print("| provider | safetensors MB | peak RSS above start MB | peak RSS MB | load s |")
    print("|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['provider']} | {s['file_mb']:.1f} | {s['peak_above_start_mb']:.0f} | {s['peak_mb']:.0f} | "
              f"{s['seconds']:.2f} |")
    print(f"wrote {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
