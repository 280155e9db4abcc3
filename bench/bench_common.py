"""Shared pieces of the benchmark suite: compression modes, providers, timing, CSV, machine info.

Timing on a shared machine (other jobs come and go): every provider of one comparison is
built in the same process, warmed up, then measured in rounds; each round runs every
provider once in a fresh random order. A provider's figures are the median and the 20th
/ 80th percentiles of its per-round times, and its ratio to dense is the median of the
per-round ratios (each taken between measurements seconds apart), which cancels most of
the drift that a sequential "all of A, then all of B" would turn into a bias.

Example usage::

    from bench_common import layer_providers, measure_interleaved
    fns = layer_providers("prune_layer", m=2048, k=1024, n=1024, mode="full")
    stats = measure_interleaved(fns, rounds=15)
"""

from __future__ import annotations

import csv
import datetime
import os
import platform
import random
import statistics
import subprocess
import time
from typing import Callable

import torch

import vcon_kernels as vk
from vcon_kernels.reference import ReferenceVCON

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(BENCH_DIR, "data")
RESULTS_CSV = os.path.join(DATA_DIR, "results.csv")
CSV_COLUMNS = ["op", "provider", "mode", "shape", "dtype", "median", "p20", "p80", "device", "version", "date",
               "ratio_to_dense", "unit", "threads", "rounds"]

# Every compression mode, as the layers users build (beta = 0.5 mid-transition; the blend
# costs the same for every beta strictly between 0 and 1).
COMPRESSIONS: dict[str, Callable[[], vk.VCONConfig]] = {
    "prune_layer": lambda: vk.Prune(sparsity=0.5),
    "prune_row": lambda: vk.Prune(sparsity=0.5, granularity="row"),
    "prune_nm_2_4": lambda: vk.Prune(granularity="nm", n=2, m=4),
    "prune_frozen": lambda: vk.Prune(sparsity=0.5, update="once"),
    "int8_channel": lambda: vk.Quantize(bits=8),
    "int4_group128": lambda: vk.Quantize(bits=4, granularity="group", group_size=128),
    "binary_tensor": lambda: vk.Quantize(bits=1, granularity="tensor"),
    "prune_int8": lambda: vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize(bits=8)),
    "lowrank_r64": lambda: vk.LowRank(rank=64),
}
# The modes the issue sets CPU targets for (the rest are measured and reported).
TARGET_COMPRESSIONS = ("prune_layer", "int8_channel", "binary_tensor", "lowrank_r64")
MODES = ("forward", "backward", "full")
BETA = 0.5


def vcon_providers(device: str) -> list[str]:
    """The vcon providers that can run on ``device``: naive always, torch always, cpp / triton where built."""
    names = ["naive", "torch"]
    available = vk.backends.available()
    if device == "cpu" and available["cpp"] is True:
        names.append("cpp")
    if device == "cuda" and available["triton"] is True:
        names.append("triton")
    return names


def _backend_scope(provider: str):
    import contextlib

    if provider in ("torch", "cpp", "triton"):
        return vk.backends.use(provider)
    return contextlib.nullcontext()


def build_layers(compression: str, k: int, n: int, dtype=torch.float32, device="cpu", seed=0):
    """(dense nn.Linear, VCON layer sharing a copy of its parameters) for one compression."""
    torch.manual_seed(seed)
    dense = torch.nn.Linear(k, n, dtype=dtype, device=device)
    copy = torch.nn.Linear(k, n, dtype=dtype, device=device)
    with torch.no_grad():
        copy.weight.copy_(dense.weight)
        copy.bias.copy_(dense.bias)
    layer = vk.VCONLinear.from_linear(copy, COMPRESSIONS[compression]())
    layer.set_beta(BETA)
    return dense, layer


def _step(module, x, grad, mode: str, scope) -> Callable[[], None]:
    """A zero-argument function running one forward / backward / full step of ``module``.

    Gradients are reset to None before each backward, as ``optimizer.zero_grad()`` does in
    training: accumulating into existing ``.grad`` tensors would add a pass per parameter.
    Each forward / full step starts a new optimizer generation (``state_cache.refresh_all``, what
    every ``optimizer.step()`` does): a training step computes the layer's threshold / scales
    once, and a step that reused the previous call's state would hide that cost.
    """
    leaves = [p for p in module.parameters() if p.requires_grad] + [x]

    def clear():
        for t in leaves:
            t.grad = None

    if mode == "forward":
        def run():
            vk.state_cache.refresh_all()
            with scope():
                module(x)
        return run
    if mode == "full":
        def run():
            clear()
            vk.state_cache.refresh_all()
            with scope():
                module(x).backward(grad)
        return run
    if mode == "backward":
        holder = {}

        def run():
            if "y" not in holder:  # the graph is built once, outside the timing, and kept
                with scope():
                    holder["y"] = module(x)
            clear()
            with scope():
                holder["y"].backward(grad, retain_graph=True)
        return run
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _scope(provider: str, device: str, autocast):
    """The backend choice of ``provider``, inside ``torch.autocast(device, autocast)`` when given."""
    import contextlib

    stack = contextlib.ExitStack()
    if autocast is not None:
        stack.enter_context(torch.autocast(device, dtype=autocast))
    stack.enter_context(_backend_scope(provider))
    return stack


def layer_providers(compression: str, m: int, k: int, n: int, mode: str, dtype=torch.float32, device="cpu",
                    providers=None, autocast=None) -> dict[str, Callable[[], None]]:
    """{provider: step function} for one layer: dense nn.Linear and every vcon provider.

    ``autocast`` (e.g. torch.bfloat16): every provider runs under ``torch.autocast`` with fp32
    parameters and inputs, as mixed-precision training does (the dense baseline included).
    """
    dense, layer = build_layers(compression, k, n, dtype, device)
    x = torch.randn(m, k, dtype=dtype, device=device, requires_grad=True)
    grad = torch.randn(m, n, dtype=autocast or dtype, device=device)
    wanted = providers or (["dense"] + vcon_providers(device))
    fns = {}
    for name in wanted:
        module = dense if name == "dense" else ReferenceVCON(layer) if name == "naive" else layer
        fns[name] = _step(module, x, grad, mode, lambda p=name: _scope(p, device, autocast))
    return fns


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


CLOCKS = {
    # Wall time: what a user waits for; on a shared machine it includes every preemption.
    "wall": time.perf_counter,
    # CPU time of this process (all its threads): immune to time slicing by other jobs, so
    # it shows the work itself. With one torch thread it is the single-core time; with
    # more it also counts OpenMP spin-waits, so use it with --threads 1.
    "cpu": time.process_time,
}


def clock_unit(clock: str) -> str:
    return "ms" if clock == "wall" else "ms (cpu)"


def measure_interleaved(fns: dict[str, Callable[[], None]], rounds: int = 15, warmup: int = 2,
                        min_time_s: float = 0.02, device: str = "cpu", baseline: str = "dense", seed: int = 0,
                        clock: str = "wall") -> dict:
    """{provider: dict(median, p20, p80, ratio_to_dense, times)} in milliseconds per call.

    Each measurement repeats a call ``inner`` times (chosen so one measurement lasts at
    least ``min_time_s``) and divides, so sub-millisecond steps are not timer noise.
    ``clock`` is "wall" or "cpu" (see CLOCKS).
    """
    now_s = CLOCKS[clock]
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    inner = {}
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()
        _sync(device)
        once = max(time.perf_counter() - start, 1e-6)
        inner[name] = max(1, min(1000, int(min_time_s / once)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    ratios: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    rng = random.Random(seed)
    for _ in range(rounds):
        rng.shuffle(order)
        this_round = {}
        for name in order:
            fn, reps = fns[name], inner[name]
            _sync(device)
            start = now_s()
            for _ in range(reps):
                fn()
            _sync(device)
            this_round[name] = (now_s() - start) / reps * 1e3
            times[name].append(this_round[name])
        if baseline in this_round:
            for name, t in this_round.items():
                ratios[name].append(t / this_round[baseline])
    out = {}
    for name, ts in times.items():
        out[name] = dict(
            median=statistics.median(ts), p20=_quantile(ts, 0.2), p80=_quantile(ts, 0.8),
            ratio_to_dense=statistics.median(ratios[name]) if ratios[name] else float("nan"), times=ts,
        )
    return out


# -- provenance ---------------------------------------------------------------------------------------
def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cpus, torch threads {torch.get_num_threads()})"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=BENCH_DIR,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=BENCH_DIR).stdout.strip()
        return out + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def version_string() -> str:
    isa = ""
    if vk.backends.available()["cpp"] is True:
        isa = f" cpp-{vk.backends.get('cpp').isa}"
    return f"vcon_kernels {vk.__version__} ({git_commit()}) torch {torch.__version__}{isa}"


def now() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


# -- CSV ------------------------------------------------------------------------------------------------
def _key(row: dict) -> tuple:
    return tuple(str(row.get(c, "")) for c in ("op", "provider", "mode", "shape", "dtype", "device", "unit"))


def write_rows(rows: list[dict], path: str = RESULTS_CSV) -> None:
    """Merge ``rows`` into the CSV: a new measurement replaces the old row with the same key."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    merged: dict[tuple, dict] = {}
    if os.path.exists(path):
        with open(path, newline="") as f:
            for row in csv.DictReader(f):
                merged[_key(row)] = row
    for row in rows:
        merged[_key(row)] = {c: row.get(c, "") for c in CSV_COLUMNS}
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in merged.values():
            writer.writerow({c: row.get(c, "") for c in CSV_COLUMNS})


def read_rows(path: str = RESULTS_CSV) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))
