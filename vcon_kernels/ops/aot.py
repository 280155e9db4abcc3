"""The honest GPU compile check: every recorded launch x every tile config, compiled as the JIT would.

The interpreter accepts code a GPU compiler rejects, and a compile without the JIT's argument
specialization is a different program (``aot_compile.py``). So this check

1. records the launches of every mode, dtype, gradient mode, strategy and bias at one shape
   per specialization class of a real layer (``aot_record.py``);
2. groups them into *variants*: launches the JIT would compile to the same program
   (``aot_compile.specialization_key``);
3. pairs every GEMM variant with **every** tile config it can get on a GPU (the autotune
   configs and the untuned default, ``vcon_matmul.tile_configs``), for sm_90 and sm_80;
4. compiles each job to a cubin with ptxas from the Triton wheel and fails on any error.

An autotune configuration over an architecture's shared memory compiles and is reported
(``over-smem``): the autotuner skips it at run time when the launch raises OutOfResources.
The untuned default config and the fixed launches of the small kernels have no such net:
over shared memory, they fail the check.

The full matrix is several hundred compiles of 1-30 s. CI (``--ci``) compiles a sample:
every small-kernel variant, and every GEMM variant with one config column chosen by a
rotation slot, as a Latin square (variant ``i`` takes column ``(i + slot) % C``), so each
run covers every variant and every column and ``C`` consecutive slots cover every (variant,
config) pair (``--check-rotation`` verifies that). The slot is the commit count of HEAD
unless ``--slot`` or ``VCON_AOT_SLOT`` sets it. Kernels must be ``JITFunction``s, so this
runs where ``TRITON_INTERPRET`` is not 1::

    TRITON_INTERPRET=0 python -m vcon_kernels.ops.aot --ci --shard 0/2     # CI
    TRITON_INTERPRET=0 python -m vcon_kernels.ops.aot --arch 90            # everything, sm_90
    TRITON_INTERPRET=0 python -m vcon_kernels.ops.aot --list --check-rotation

prints one line per job and exits non-zero if anything failed (after trying all of them).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

from .aot_compile import SHARED_LIMIT

ARCHS = (90, 80)


def _dtype_of(signature: dict) -> str:
    for name in ("a_ptr", "w_ptr", "x_ptr"):
        if name in signature:
            return signature[name].lstrip("*")
    return "?"


def _describe(fn, signature: dict, kwargs: dict, skip=("UPCAST",)) -> str:
    """Constexprs (declared, and ints the JIT specialized to constants) as k=v."""
    parts = []
    for p in fn.params:
        if signature[p.name] == "constexpr" and p.name not in skip:
            parts.append(f"{p.name}={kwargs[p.name]}")
    return ",".join(parts)


def variants(records) -> list:
    """``[Variant]`` deduplicated by specialization key (GEMM tile configs stripped), in a stable order."""
    import triton

    from . import dequant_matmul
    from . import vcon_matmul
    from .aot_compile import specialization_key
    from .aot_compile import specialize

    found: dict = {}
    for kernel, kwargs, origin in records:
        fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
        args = {k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")}
        gemm = fn is vcon_matmul._vcon_matmul_kernel
        dequant = fn is dequant_matmul._dequant_matmul_kernel  # finalized layers' GEMM: its own tile configs
        if gemm:  # the tile config is the job's, not the variant's
            args.update(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=8)
        if dequant:
            args.update(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_N=8)
        key = specialization_key(fn, args)
        if key not in found:
            signature = specialize(fn, args)[0]
            dtype = _dtype_of(signature)
            if gemm:
                configs = vcon_matmul.tile_configs(dtype)
            elif dequant:
                configs = dequant_matmul.tile_configs(dtype)
            else:
                configs = [("fixed", {}, kwargs.get("num_warps", 4), kwargs.get("num_stages", 3))]
            skip = ("UPCAST", "BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M", "GROUP_N") if gemm or dequant else ("UPCAST",)
            label = f"{fn.__name__} {dtype} {_describe(fn, signature, args, skip)}"
            found[key] = dict(fn=fn, kwargs=args, configs=configs, label=label, origin=origin, gemm=gemm,
                              dtype=dtype, key=key)
    return sorted(found.values(), key=lambda v: (v["label"], repr(v["key"])))


def jobs(found: list, archs=ARCHS) -> list:
    """Every (variant, config, arch): dicts with ``label``, ``variant``, ``config`` and ``arch``."""
    out = []
    for index, var in enumerate(found):
        for column, (cfg_label, cfg_args, warps, stages) in enumerate(var["configs"]):
            for arch in archs:
                out.append(dict(variant=var, index=index, column=column, arch=arch, config=cfg_label,
                                kwargs=dict(var["kwargs"], **cfg_args), num_warps=warps, num_stages=stages,
                                label=f"sm_{arch} {var['label']} [{cfg_label}] ({var['origin']})"))
    return out


# The GEMM constexprs that pick the program family (transform, orientation, epilogue).
MODE_NAMES = ("PRUNE", "QUANT", "B_IS_W", "EXACT_COEF", "LOWRANK")


def _stratum(job) -> tuple:
    """GEMM jobs of one dtype, transform, orientation and epilogue (``MODE_NAMES``): one program family."""
    var = job["variant"]
    fn = var["fn"]
    if not var["gemm"]:  # small elementwise kernels: one family per kernel and dtype
        return (fn.__name__, var["dtype"], ())
    declared = tuple((name, repr(var["kwargs"][name])) for name in MODE_NAMES)
    return (fn.__name__, var["dtype"], declared)


def strata(all_jobs: list) -> dict:
    """{stratum: jobs in diagonal order}: consecutive jobs differ in variant and in (config, arch) cell."""
    groups: dict = {}
    for job in all_jobs:
        groups.setdefault(_stratum(job), []).append(job)
    out = {}
    for key, group in sorted(groups.items(), key=lambda kv: repr(kv[0])):
        local = {vid: i for i, vid in enumerate(dict.fromkeys(id(j["variant"]) for j in group))}
        cells = 1 + max(j["column"] * 2 + (j["arch"] != 90) for j in group)
        out[key] = sorted(group, key=lambda j: ((j["column"] * 2 + (j["arch"] != 90) - local[id(j["variant"])])
                                                % cells, local[id(j["variant"])], j["arch"]))
    return out


def per_stratum(groups: dict, budget: int) -> dict:
    """Jobs per run for each stratum: proportional to its size, at least one (every mode, every run)."""
    total = sum(len(g) for g in groups.values())
    return {key: max(1, (budget * len(g)) // total) for key, g in groups.items()}


def period(groups: dict, budget: int) -> int:
    """Slots until every job of every stratum was sampled once."""
    take = per_stratum(groups, budget)
    return max(-(-len(g) // take[key]) for key, g in groups.items())


def sample(groups: dict, budget: int, slot: int) -> list:
    """The CI sample of one rotation slot: a window of ``k`` jobs of every stratum, moving with the slot."""
    take = per_stratum(groups, budget)
    picked = []
    for offset, (key, group) in enumerate(groups.items()):
        k, n = take[key], len(group)
        start = (slot * k + offset) % n  # strata start at different cells (configs, architectures)
        picked += [group[(start + i) % n] for i in range(min(k, n))]
    return picked


def default_slot() -> int:
    env = os.environ.get("VCON_AOT_SLOT")
    if env:
        return int(env)
    try:
        out = subprocess.run(["git", "rev-list", "--count", "HEAD"], capture_output=True, text=True, timeout=30,
                             cwd=os.path.dirname(os.path.abspath(__file__)))
        return int(out.stdout.strip())
    except (OSError, ValueError, subprocess.SubprocessError):
        return int(time.time() // 86400)


def check_rotation(groups: dict, budget: int) -> int:
    """The rotation period; raises unless that many consecutive slots cover every job."""
    slots = period(groups, budget)
    seen = set()
    for slot in range(slots):
        seen |= {id(j) for j in sample(groups, budget, slot)}
    missing = [j["label"] for g in groups.values() for j in g if id(j) not in seen]
    if missing:
        raise RuntimeError(f"{len(missing)} jobs never sampled, e.g. {missing[:3]}")
    return slots


def run_jobs(todo: list, out=print) -> list:
    """Compile every job (all of them, errors included); returns ``(job, seconds, compiled or exception)``."""
    from .aot_compile import compile_for

    results = []
    for job in todo:
        start = time.perf_counter()
        try:
            result = compile_for(job["variant"]["fn"], job["kwargs"], job["num_warps"], job["num_stages"],
                                 job["arch"])
        except Exception as exc:  # noqa: BLE001  (every compiler error is a failure of this check)
            result = exc
        seconds = time.perf_counter() - start
        results.append((job, seconds, result))
        if not isinstance(result, Exception) and job["config"] in ("fixed", "default") and \
                result.metadata.shared > SHARED_LIMIT[job["arch"]]:
            # no autotuner stands behind an untuned launch: over shared memory, it fails at run time
            result = RuntimeError(f"{result.metadata.shared} bytes of shared memory > {SHARED_LIMIT[job['arch']]}")
        results[-1] = (job, seconds, result)
        if isinstance(result, Exception):
            out(f"FAIL {job['label']}: {type(result).__name__}: {str(result)[:600]}")
        else:
            shared = result.metadata.shared
            word = "ok" if shared <= SHARED_LIMIT[job["arch"]] else "over-smem"
            out(f"{word} {seconds:5.2f}s shared={shared} {job['label']}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, 90 or 80 (repeatable)")
    parser.add_argument("--ci", action="store_true", help="the rotation sample instead of every job")
    parser.add_argument("--budget", type=int, default=120, help="about how many jobs one --ci run compiles")
    parser.add_argument("--slot", type=int, help="rotation slot (default: VCON_AOT_SLOT or HEAD's commit count)")
    parser.add_argument("--shard", default="0/1", help="i/n: every n-th job starting at i")
    parser.add_argument("--match", help="only jobs whose label contains this string")
    parser.add_argument("--list", action="store_true", help="list the jobs, compile nothing")
    parser.add_argument("--list-all", action="store_true", help="with --list: also every job after the selection")
    parser.add_argument("--check-rotation", action="store_true", help="verify that the slots cover every job")
    args = parser.parse_args(argv)
    from .utils import INTERPRET

    if INTERPRET:
        print("TRITON_INTERPRET=1: kernels are interpreted, nothing to compile; run with TRITON_INTERPRET=0")
        return 2
    archs = tuple(args.arch or ARCHS)
    bad = [a for a in archs if a not in SHARED_LIMIT]
    if bad:
        parser.error(f"--arch must be one of {sorted(SHARED_LIMIT)}, got {bad}")
    from .aot_record import record_launches

    start = time.perf_counter()
    found = variants(record_launches())
    all_jobs = jobs(found, archs)
    groups = strata(all_jobs)
    gemms = sum(v["gemm"] for v in found)
    print(f"{len(found)} variants ({gemms} GEMM), {len(all_jobs)} jobs in {len(groups)} strata; "
          f"recorded in {time.perf_counter() - start:.1f}s", flush=True)
    if args.check_rotation:
        slots = check_rotation(groups, args.budget)
        print(f"rotation: {slots} slots of about {args.budget} jobs cover all {len(all_jobs)} jobs")
    todo = all_jobs
    if args.ci:
        slot = default_slot() if args.slot is None else args.slot
        todo = sample(groups, args.budget, slot)
        print(f"CI sample, slot {slot}: {len(todo)} jobs (every stratum, a window moving with the slot)")
    if args.match:
        todo = [j for j in todo if args.match in j["label"]]
    index, count = (int(p) for p in args.shard.split("/"))
    mine = todo[index::count]
    print(f"running {len(mine)} (shard {index}/{count})", flush=True)
    if args.list:
        for job in mine:
            print(job["label"])
        if args.list_all:
            print("== every job")
            for job in all_jobs:
                print(job["label"])
        return 0
    results = run_jobs(mine, out=lambda line: print(line, flush=True))
    failed = [r for r in results if isinstance(r[2], Exception)]
    over = [r for r in results if not isinstance(r[2], Exception) and r[2].metadata.shared > SHARED_LIMIT[r[0]["arch"]]]
    print(f"compiled {len(results) - len(failed)}/{len(results)} in {sum(r[1] for r in results):.1f}s; "
          f"{len(failed)} failed; {len(over)} configs over shared memory (skipped by the autotuner at run time)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
