"""What the sm_90 compiler makes of the GEMM kernels: bench/SM90.md + bench/data/sm90.csv (no GPU needed).

Compiles the recorded launches of the benchmark modes (``vcon_kernels/ops/aot_record.py``,
"tokens" shape class = M >= 512 training / prefill of a 4096 x 4096 layer, bf16) with the
JIT's own specialization (``vcon_kernels/ops/aot_compile.py``) for each tile config, and
reads from the artifacts:

* registers and spill-store bytes (ptxas ``-v`` log), shared memory, CTAs per SM (registers,
  shared memory and warps of an H100/H200 SM);
* PTX features: wgmma / mma.sync instructions, cp.async / TMA (``cp.async.bulk.tensor``), the
  wgmma wait depth in the main loop (``warp_group_dot_wait`` pendings in the TTGIR: 1 keeps one
  MMA in flight while the next tile is transformed, 0 serializes), scalar ``ld.shared.b16``
  (the transformed tile read element by element from shared memory);
* the bank-conflict degree of every shared-to-register load (``ttg.local_load``) of the TTGIR main loop,
  derived from its shared and register layouts (``bench/sm90_banks.py``), the W tile's named apart;
* hot-loop SASS instructions per weight element: the instructions of the innermost SASS loop
  that holds the MMA (``cuobjdump -sass``), divided by the W-tile elements per thread per K step.
  A static count: both sides of a uniform branch in the loop are counted.

Run (one thread, TRITON_INTERPRET unset; about 10-60 s per compile)::

    PYTHONPATH=. python bench/sm90_report.py                 # the default selection
    PYTHONPATH=. python bench/sm90_report.py --all-configs   # every tile config of the selection
    PYTHONPATH=. python bench/sm90_report.py --from-csv --before bench/data/sm90_before.csv --before-label X

The radix-select section comes from ``bench/sm90_radix.py``'s CSV next to the GEMM CSV (run that first).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import subprocess
import sys
import time

os.environ["TRITON_INTERPRET"] = "0"
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ.setdefault("TRITON_ALWAYS_COMPILE", "1")  # a cached kernel prints no ptxas log

HERE = os.path.dirname(os.path.abspath(__file__))
REGS_PER_SM, MAX_WARPS, SMEM_PER_SM, SMEM_RESERVED = 65536, 64, 233472, 1024
MODES = ("prune_layer", "int8_channel", "binary_tensor", "prune_nm", "lowrank")
# The configs the M >= 512 benchmark rows use most (the first two autotune rows); --all-configs: all.
DEFAULT_CONFIGS = ("BM128xBN128xBK64_w8s3", "BM256xBN128xBK64_w8s3")
ORIENT = {1: "fwd", 2: "dX", 0: "dW"}
# Rows of x in the recorded launches: a training micro-batch (the STE dW GEMM reduces over them).
TOKENS = 4096
# Hot-loop SASS instructions per weight element the issue asks for.
TARGETS = {"prune_layer": 6, "binary_tensor": 9, "int8_channel": 12, "prune_nm": 18}
# Shared-to-register bank-conflict degree of the transformed W tile the issue asks for (1 = conflict-free).
BANK_TARGET = 2
# A local_load whose shape fits both the W tile and the x tile (BLOCK_M == BLOCK_N) is the W tile: in the
# swap-AB transform GEMMs x is wgmma's B operand, read from shared memory by descriptor, never local_load-ed
# (at BLOCK_M 256, where the shapes differ, every such load is the W tile's).
W_ROLE = "W"
# GEMMs without a transformed W tile: low-rank (both factors go to wgmma from shared memory) and the STE dW.
NO_W_TILE = ("lowrank", "dense (STE dW)")


# What the tables above cannot say by themselves (measured on the compiled artifacts of this tree).
NOTES = [
    "", "## Swap-AB: the transformed W tile as the left operand of `tl.dot`", "",
    "The transform GEMMs compute their output tile transposed, `out^T = W_eff-tile . x^T` (`ops/vcon_matmul.py`), so",
    "the transformed tile is wgmma's A operand, which sm_90 takes from registers (B only from shared memory).",
    "What the compiler makes of it (the instruction counts quoted in these notes are Triton 3.7.1's):", "",
    "* MMAs stay in flight during the next tile's transform. Triton 3.7.1 splits each K step's dot into 2 wgmma of",
    "  K = 32, each followed by `wait(1)`; Triton 3.6.0 into 4 of K = 16 with `wait(3)` (`wgmma wait` column; the",
    "  `wait(0)` after the loop is not counted). Before: one wgmma from shared memory per K step and `wait(0)`.",
    "* Where the transform cannot run in wgmma's register layout, the tile passes through shared memory once,",
    "  as a layout conversion: TTGIR `convert_layout #blocked -> dot operand` = per thread and K step 4",
    "  `STS.128` + 4 `LDSM` (ldmatrix), a barrier and a fence (not 32 scalar stores as before). Triton removes",
    "  it (OptimizeDotOperands, the MMAv3 hoisting: the shared-memory load lands directly in the dot-operand",
    "  layout and the transform runs there) only when every value entering the transform inside the loop is",
    "  a load or a constant. A standalone kernel on 3.7.1: `extf / mulf / select / truncf` chains with per-row",
    "  vectors loaded before the loop are hoisted, a scalar `tl.load(beta_ptr)` broadcast into the tile is not",
    "  (prune-like transform: 316 loop instructions with 4 STS, 293 and no STS with beta loaded as a vector).",
    "  So beta is loaded as a vector in the GEMM loops (`transform.load_beta`): prune (fwd and dX) and binary",
    "  now load the W tile straight into the register layout (prune fwd 128x128: 336 -> 321 instructions,",
    "  binary 455 -> 417). The int8 forward too since the clamp bounds are constexprs there (`QMIN` / `QMAX`:",
    "  a splat of the runtime scalars `qmin` / `qmax` kept it out; its per-row reciprocals, computed before",
    "  the loop, do not): 4 STS + 4 LDSM and 16 KB of shared memory per stage set fewer, 128x128 fwd 689 -> 653",
    "  instructions (21.5 -> 20.4 per element), 256x128 23.0 -> 21.7; registers 148 -> 170 and 248 -> 250.",
    "  The int8 dX keeps the runtime bounds and the conversion: with constexpr bounds Triton hoists there too,",
    "  but its per-row values (scale, reciprocal, lift, beta: the W rows change every K step) then live in the",
    "  dot-operand layout, where they are recomputed per element or read from shared memory per K step",
    "  (measured: 24.3 -> 26.7 per element at 128x128; with lift and divisor precomputed and loaded, 26.0).",
    "  N:M (reshape and group sums, not elementwise) keeps the conversion.",
    "* Instructions per element did not fall at equal tiles: at 128x128 swap-AB gives -0.2 to +0.8 per element",
    "  against the shared-operand kernel (the split dot, and the conversion where it stays). The old first",
    "  autotune row 128x256, swapped, puts 256 W rows on wgmma's M side: 255 registers, a 32-byte spill and 64",
    "  STS per K step (prune fwd 13.2 per element). The first row is now 256x128: 256 tokens on wgmma's N side,",
    "  0 spills,",
    "  and the transform is amortized over 256 rows of x, so its cost against the MMA per 128 rows is half the",
    "  `SASS/elem` column (`per 128 rows`).",
    "* int8 per channel, the SASS of the 128x128 forward loop (32 weight elements per thread): 160 FMUL, 128 FFMA,",
    "  96 FADD, 64 FMNMX = 14 arithmetic instructions per element: the lift and reciprocal products and four",
    "  FMA of the exact quotient (`transform.div_by_scale`, no `div_rn`), 2 for round-half-even, 2 for the",
    "  clamp, 4 for the blend `beta_q w1 + (1 - beta_q) (code s)`, which must round as the torch backend",
    "  does (no FMA contraction). bf16 unpacking and packing (`SHF` / `PRMT` / `F2FP`, ~2) and loads,",
    "  addresses and the MMA (~4.4) make the 20.4; the dX adds the layout conversion (24.3). So the target",
    "  of 12 is not met (20.4-26.2): under 12 would need giving up bit-identity with `spec.py`'s IEEE",
    "  quotient (one reciprocal product alone is off by one code when `w / s` lies within an ulp or two of a",
    "  half-integer) or its unfused blend. Not tried: `FRND` (`cvt.rni`, libdevice `rint`, which the",
    "  interpreter lacks) would round in 1 instruction instead of 2 `FADD`, but it is not an FP32-pipe",
    "  instruction and its rate on sm_90 is not known here; a count, not a time, would improve.",
]


def occupancy(regs: int, warps: int, shared: int) -> int:
    per_warp = ((regs + 7) // 8 * 8) * 32
    per_warp = (per_warp + 255) // 256 * 256
    by_regs = REGS_PER_SM // (per_warp * warps)
    by_smem = SMEM_PER_SM // (shared + SMEM_RESERVED) if shared else 32
    return min(by_regs, by_smem, MAX_WARPS // warps, 32)


def wait_depths(ttgir: str) -> str:
    """Pendings of the ``warp_group_dot_wait``s inside the K loops that hold a ``warp_group_dot`` (the
    ``wait(0)`` that drains the pipeline after a loop is not counted); "-" without wgmma."""
    lines = ttgir.splitlines()
    found = set()
    for i, line in enumerate(lines):
        if "scf.for" not in line:
            continue
        indent = len(line) - len(line.lstrip())
        body = []
        for inner in lines[i + 1:]:
            if inner.strip().startswith("}") and len(inner) - len(inner.lstrip()) == indent:
                break
            body.append(inner)
        text = "\n".join(body)
        if "ttng.warp_group_dot " in text:
            found.update(re.findall(r"warp_group_dot_wait [^{]*\{pendings = (\d+)", text))
    return "/".join(sorted(found)) if found else "-"


def sass_loop_instructions(cubin: bytes, tmp: str) -> int:
    """Instructions of the innermost backward-branch loop of the SASS that contains an MMA."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    path = os.path.join(tmp, "k.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    text = subprocess.run([tool, "-sass", path], capture_output=True, text=True, timeout=120).stdout
    insts = []  # (address, text)
    for line in text.splitlines():
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?);", line)
        if m:
            insts.append((int(m.group(1), 16), m.group(2)))
    best = 0
    for addr, inst in insts:
        target = re.search(r"\bBRA\b[^0-9]*0x([0-9a-f]+)", inst)
        if not target:
            continue
        dest = int(target.group(1), 16)
        if dest >= addr:
            continue
        body = [t for a, t in insts if dest <= a <= addr]
        if any(("HGMMA" in t or "HMMA" in t) for t in body) and (best == 0 or len(body) < best):
            best = len(body)
    return best


def select(configs, modes):
    import torch

    from vcon_kernels.ops import aot
    from vcon_kernels.ops import aot_record

    picked = []
    for name, factory, structured in aot_record.cases():
        if name not in modes:
            continue
        layer, _ = aot_record._layer(name, factory, structured, "tokens", "ste", torch.bfloat16)
        # TOKENS rows of x: the same specialization class as the recording's 32 (multiples of 16), and the
        # K of the STE dW GEMM (a reduction over the tokens) is then a realistic one
        recs = [(k, kw, f"{name}/ste/tokens") for k, kw in aot_record.record_layer(layer, TOKENS, strategies=("fused",),
                                                                                    biases=(True,))]
        for var in aot.variants(recs):
            kw = var["kwargs"]
            if not var["gemm"] or (kw["B_IS_W"] == 0 and name not in ("int8_channel",)) or kw["N"] < 64 \
                    or kw["K"] < 64 or kw["EXACT_COEF"]:
                continue  # thin low-rank GEMMs; one dW (the STE dW is the same GEMM for every mode)
            for label, cfg, warps, stages in var["configs"]:
                if label in configs or configs == "all":
                    mode = "dense (STE dW)" if kw["B_IS_W"] == 0 else name
                    picked.append((mode, ORIENT[kw["B_IS_W"]], label, var, cfg, warps, stages))
    return picked


def measure(job, tmp):
    from vcon_kernels.ops.aot_compile import compile_for
    from vcon_kernels.ops.aot_compile import spill_bytes

    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import sm90_banks

    mode, orient, label, var, cfg, warps, stages = job
    start = time.perf_counter()
    try:
        ck = compile_for(var["fn"], dict(var["kwargs"], **cfg), warps, stages, 90)
    except Exception as exc:  # noqa: BLE001  (a failure is a row of the report)
        return dict(mode=mode, gemm=orient, config=label, error=f"{type(exc).__name__}: {str(exc)[:120]}")
    regs = re.search(r"Used (\d+) registers", ck.ptxas_log)
    regs = int(regs.group(1)) if regs else -1
    ptx = ck.asm["ptx"]
    elems = cfg["BLOCK_K"] * cfg["BLOCK_N"] / (32 * warps)  # W-tile elements per thread per K step
    loop = sass_loop_instructions(ck.asm["cubin"], tmp)
    # the transform is redone once per BLOCK_M rows of x: its cost against the MMA scales as this
    per_128 = round(loop / elems * 128 / cfg["BLOCK_M"], 1) if loop else "-"
    return dict(
        mode=mode, gemm=orient, config=label, regs=regs, spill_bytes=spill_bytes(ck), shared=ck.metadata.shared,
        ctas_per_sm=occupancy(regs, warps, ck.metadata.shared),
        wgmma=len(re.findall(r"wgmma\.mma_async", ptx)), mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
        cp_async=len(re.findall(r"cp\.async\.(?:cg|ca)\.shared\.global", ptx)),
        tma=len(re.findall(r"cp\.async\.bulk\.tensor", ptx)), wgmma_wait=wait_depths(ck.asm["ttgir"]),
        ld_shared_b16=len(re.findall(r"ld\.shared\.b16", ptx)),
        bank_conflicts=sm90_banks.cell(sm90_banks.local_loads(ck.asm["ttgir"]), cfg["BLOCK_M"], cfg["BLOCK_N"],
                                       cfg["BLOCK_K"], w_role=W_ROLE, has_w=mode not in NO_W_TILE),
        sass_loop=loop,
        sass_per_elem=round(loop / elems, 1) if loop else "-", sass_per_elem_128=per_128,
        compile_s=round(time.perf_counter() - start, 1),
    )


COLUMNS = ["mode", "gemm", "config", "regs", "spill_bytes", "shared", "ctas_per_sm", "wgmma", "mma_sync", "cp_async",
           "tma", "wgmma_wait", "ld_shared_b16", "bank_conflicts", "sass_loop", "sass_per_elem", "sass_per_elem_128",
           "compile_s", "error"]


def before_after(rows, before_rows, label) -> list:
    """Markdown lines: registers / spills / SASS per element of each row against an earlier run's CSV."""
    old = {(r["mode"], r["gemm"], r["config"]): r for r in before_rows}
    lines = ["", f"## Before -> after ({label})", "",
             "(`(new)` / `(gone)`: a config only this run / only the earlier run compiled. Until this report counted",
             "the waits of the K loops only, `wgmma wait` listed every wait of the kernel: an earlier `0/1` is a",
             "loop `1` plus the drain after the loop.)", "",
             "| mode | GEMM | config | regs | spill B | cp.async | wgmma wait | SASS/elem | per 128 rows |",
             "|---|---|---|---|---|---|---|---|---|"]
    keys = ("regs", "spill_bytes", "cp_async", "wgmma_wait", "sass_per_elem", "sass_per_elem_128")
    seen = set()
    for r in rows:
        b = old.get((r["mode"], r["gemm"], r["config"]))
        if r.get("error") or (b is not None and b.get("error")):
            continue
        if b is None:  # a config the earlier run did not have
            cells = [f"(new) {r.get(k, '-')}" for k in keys]
        else:
            seen.add((r["mode"], r["gemm"], r["config"]))
            cells = [f"{b.get(k, '-')} -> {r.get(k, '-')}" if str(b.get(k, "-")) != str(r.get(k, "-"))
                     else str(r.get(k, "-")) for k in keys]
        lines.append(f"| {r['mode']} | {r['gemm']} | {r['config']} | " + " | ".join(cells) + " |")
    for key, b in old.items():  # configs the earlier run had and this one has not
        if key not in seen and not b.get("error") and b["mode"] in {r["mode"] for r in rows}:
            lines.append(f"| {b['mode']} | {b['gemm']} | {b['config']} | "
                         + " | ".join(f"{b.get(k, '-')} (gone)" for k in keys) + " |")
    return lines


def _w_bank_summary(rows) -> tuple:
    """(worst W-tile bank-conflict degree over the rows, whether it meets BANK_TARGET); 0 = the tile never
    passes through shared memory. Unmeasured or not analysed rows make the answer unknown, never a pass."""
    import sm90_banks

    degrees = [sm90_banks.w_degree(r.get("bank_conflicts", "")) for r in rows]
    if any(d is None for d in degrees):
        return "not analysed", "unknown"
    worst = max(degrees)
    return ("none (regs)" if worst == 0 else str(worst)), ("yes" if worst <= BANK_TARGET else "no")


def write(rows, md_path, csv_path, triton_version, seconds, before=None):
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    os.makedirs(os.path.dirname(csv_path), exist_ok=True)
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            w.writerow(r)
    head = ["mode", "GEMM", "config", "regs", "spill B", "smem", "CTAs/SM", "wgmma", "mma.sync", "cp.async", "TMA",
            "wgmma wait", "ld.shared.b16", "bank conflicts", "SASS loop", "SASS/elem", "per 128 rows"]
    keys = COLUMNS[:17]
    lines = [
        "# What the sm_90 compiler makes of the GEMM kernels (generated by bench/sm90_report.py)",
        "",
        f"Triton {triton_version}, GPUTarget(cuda, 90) = sm_90a (H100/H200), bf16, JIT-faithful specialization of",
        "the recorded launches of a 4096 x 4096-class layer at M >= 512 (`ops/aot_record.py` \"tokens\"). No GPU ran",
        f"anything: these are compiler artifacts. {len(rows)} compiles in {seconds:.0f} s on a shared, loaded 2-core",
        f"machine. Regenerate with `PYTHONPATH=. python bench/sm90_report.py` (CSV: "
        f"`bench/data/{os.path.basename(csv_path)}`).",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
    ]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['mode']} | {r['gemm']} | {r['config']} | **compile fails**: {r['error']} |"
                         + " |" * (len(head) - 4))
        else:
            lines.append("| " + " | ".join(str(r.get(k, "-")) for k in keys) + " |")
    lines += ["", "## Targets of issue 12 (M >= 512 configs above, fwd and dX)", "",
              "| mode | spill bytes (max) | 0 spills | wgmma wait | MMA in flight | SASS/elem (min-max) | target | met "
              "| per 128 rows (min-max) | W-tile bank conflicts (max) | <= 2 |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode, target in TARGETS.items():
        mine = [r for r in rows if r["mode"] == mode and not r.get("error")]
        if not mine:
            continue
        spills = max(int(r["spill_bytes"]) for r in mine)
        waits = sorted({str(r["wgmma_wait"]) for r in mine})
        per = [float(r["sass_per_elem"]) for r in mine if r["sass_per_elem"] not in ("-", "")]
        lo, hi = (min(per), max(per)) if per else (float("nan"), float("nan"))
        per128 = [float(r["sass_per_elem_128"]) for r in mine if r.get("sass_per_elem_128") not in (None, "-", "")]
        amort = f"{min(per128)}-{max(per128)}" if per128 else "-"
        in_flight = all(w.isdigit() and int(w) >= 1 for w in waits)
        bank, bank_met = _w_bank_summary(mine)
        lines.append(f"| {mode} | {spills} | {'yes' if spills == 0 else 'no'} | {'/'.join(waits)} | "
                     f"{'yes' if in_flight else 'no'} | {lo}-{hi} | <= {target} | "
                     f"{'yes' if hi <= target else 'no'} | {amort} | {bank} | {bank_met} |")
    lines += NOTES
    from sm90_radix import section  # the radix select's section, from its own CSV

    lines += section(csv_path)
    if before is not None:
        lines += before_after(rows, *before)
    lines += ["", "Columns: `wgmma wait` = pendings of `warp_group_dot_wait` in the TTGIR main loop (1: one MMA",
              "stays in flight while the next W tile is transformed; 0: each K step waits for its MMA);",
              "`ld.shared.b16` = scalar 16-bit shared-memory loads in the PTX (the transformed tile read element",
              "by element); `SASS loop` =",
              "instructions of the innermost SASS loop holding the MMA, static (both sides of uniform branches);",
              "`SASS/elem` = that / W-tile elements per thread per K step (the issue metric); `per 128 rows` = that x",
              "128 / BLOCK_M: the transform is redone once per BLOCK_M rows of x, so this is what its cost against",
              "the MMA scales with (transform / MMA time ~ 11.8 x SASS/elem / BLOCK_M on an H200, GPU_AUDIT.md).",
              "`bank conflicts` = per `ttg.local_load` (shared -> registers) in the TTGIR main loop: the tile (`W` =",
              "the transformed weight tile, BLOCK_N x BLOCK_K either way round, BLOCK_N being wgmma's M side under",
              "swap-AB; `x` = the activation tile, BLOCK_M x BLOCK_K), its shape and its worst bank-conflict degree",
              "over the warp-level load instructions: the largest number of distinct 4-byte words one bank must",
              "deliver to a warp (per hardware phase: 8 lanes for 16-byte, 16 for 8-byte accesses), so 1 =",
              "conflict-free and 32 = serialized (`bench/sm90_banks.py`, the sm_90 audit's method). In brackets:",
              "the source buffer (`swizzled` / `nvmma` shared layout) and the access: `ldmatrix` for a read into",
              "wgmma's register operand layout (8 rows of 16 bytes per pass), `16 B` / `4 B` per lane for an",
              "`ld.shared` into a blocked layout (the transform's). Conflict-free here is counted, not assumed",
              "(the swizzles XOR 16-byte chunks by row; unswizzled, 8 lanes read 128 contiguous bytes). `W: none",
              "(regs)` would mean the W tile reaches registers without a `local_load`; `none (no local_load)`:",
              "both operands go to wgmma from shared memory by descriptor (low-rank). `vec 1x64` = per-row",
              "vectors staged with the tile; `not analysed` = a layout pair the model does not cover (32-bit",
              "vectors into a dot-operand layout), never a number. The layout conversion of the notes above",
              "(`convert_layout`, int8 dX and N:M: STS + ldmatrix of the transformed tile) is lowered after the TTGIR",
              "and is not in this column. The STE dW GEMM (`dense (STE dW)`, no transform) is recorded with",
              f"{TOKENS} tokens as its K; `SASS/elem` there counts the x tile's elements.",
              ""]
    with open(md_path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--all-configs", action="store_true", help="every tile config (default: the M >= 512 two)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, from {MODES}")
    parser.add_argument("--from-csv", action="store_true", help="only rewrite SM90.md from the CSV")
    parser.add_argument("--md", default=os.path.join(HERE, "SM90.md"))
    parser.add_argument("--csv", default=os.path.join(HERE, "data", "sm90.csv"))
    parser.add_argument("--before", help="an earlier run's CSV: add a before -> after table")
    parser.add_argument("--before-label", default="earlier run", help="what --before is (e.g. its commit)")
    args = parser.parse_args(argv)
    before = None
    if args.before:
        with open(args.before) as f:
            before = ([{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)], args.before_label)
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in MODES]
    if bad:
        parser.error(f"--modes must be from {MODES}, got {bad}")
    if args.from_csv:  # rewrite the table from an earlier run's CSV (no compiles)
        import triton

        with open(args.csv) as f:
            rows = [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(f)]
        write(rows, args.md, args.csv, triton.__version__, sum(float(r.get("compile_s", 0)) for r in rows), before)
        return 0
    import tempfile

    import torch
    import triton

    torch.set_num_threads(1)
    jobs = select("all" if args.all_configs else DEFAULT_CONFIGS, modes)
    rows, start = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for job in jobs:
            row = measure(job, tmp)
            print(row, flush=True)
            rows.append(row)
    write(rows, args.md, args.csv, triton.__version__, time.perf_counter() - start, before)
    return 1 if any(r.get("error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
