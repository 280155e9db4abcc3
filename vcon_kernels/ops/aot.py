"""Ahead-of-time GPU compile of every kernel variant the launchers produce, on any machine.

The interpreter accepts code a GPU compiler rejects (``tl.dot`` with K < 16, dtype
mismatches, shared memory over the limit), so the CPU test suite also compiles every
kernel and constexpr variant to a cubin for sm_80 and sm_90 with
``triton.compile(..., target=GPUTarget("cuda", cap, 32))`` (ptxas ships with Triton).

The variants are not listed by hand: the launchers run on tiny CPU tensors with
``utils.capture_launches`` recording each launch instead of running it, over every
compression mode, dtype, strategy, gradient mode and bias choice, so what compiles is
exactly what the backend would launch. This must run in a process where
``TRITON_INTERPRET`` is not 1 (kernels must be ``JITFunction``s, not interpreted):

    TRITON_INTERPRET=0 python -m vcon_kernels.ops.aot --arch 90 --arch 80

prints one line per variant and exits non-zero on the first failure.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

# Shared memory per block, bytes (sm_80: A100, 163 KB; sm_90: H100/H200, 227 KB).
SHARED_LIMIT = {80: 166912, 90: 232448}


def _cases():
    """(name, config factory, in_features): the shared test cases (tests/cases.py) in one place."""
    from .. import configs as c

    return [
        ("prune_layer", lambda g: c.Prune(sparsity=0.6, grad=g), 64),
        ("prune_row", lambda g: c.Prune(sparsity=0.3, granularity="row", grad=g), 64),
        ("prune_nm", lambda g: c.Prune(granularity="nm", n=2, m=4, grad=g), 64),
        ("prune_once", lambda g: c.Prune(sparsity=0.6, update="once", grad=g), 64),
        ("int8_channel", lambda g: c.Quantize(bits=8, grad=g), 64),
        ("int4_group", lambda g: c.Quantize(bits=4, granularity="group", group_size=16, grad=g), 64),
        ("int2_tensor", lambda g: c.Quantize(bits=2, granularity="tensor", grad=g), 64),
        ("binary_tensor", lambda g: c.Quantize(bits=1, granularity="tensor", grad=g), 64),
        ("binary_channel", lambda g: c.Quantize(bits=1, granularity="channel", grad=g), 64),
        ("prune_int4", lambda g: c.Compose(c.Prune(sparsity=0.5, grad=g), c.Quantize(bits=4, grad=g)), 64),
        ("nm_int8_group", lambda g: c.Compose(c.Prune(granularity="nm", grad=g),
                                              c.Quantize(bits=8, granularity="group", group_size=16, grad=g)), 64),
        ("nm_mask_int8", lambda g: c.Compose(c.Prune(granularity="nm", update="once", grad=g),
                                             c.Quantize(bits=8, grad=g)), 64),
        ("nm_3_6", lambda g: c.Prune(granularity="nm", n=3, m=6, grad=g), 48),  # m not a power of 2
        ("prune_binary", lambda g: c.Compose(c.Prune(sparsity=0.8, grad=g), c.Quantize(bits=1, grad=g)), 64),
        ("lowrank", lambda g: c.LowRank(rank=8, grad=g), 64),
    ]


def record_launches(dtypes=(torch.float32, torch.bfloat16, torch.float16)) -> list:
    """Every (kernel, kwargs) the Triton ops launch, over modes x dtypes x strategies x grads x bias."""
    from ..modules import VCONLinear
    from . import dispatch
    from .blend_weight import blend_weight
    from .linear_backward import linear_backward
    from .linear_forward import linear_forward
    from .scales import quant_scales
    from .threshold import prune_threshold
    from .utils import capture_launches
    from .weight_grad import weight_grad
    from .weight_state import WeightState

    records: list = []
    with capture_launches(records):
        for _name, factory, k in _cases():
            for dtype in dtypes:
                for grad in ("ste", "exact"):
                    torch.manual_seed(0)
                    layer = VCONLinear(k, 32, config=factory(grad), dtype=dtype)
                    spec, w, beta = layer.spec(), layer.weight.detach(), layer.beta
                    thr = torch.zeros(spec.threshold_shape(32), dtype=torch.float32)
                    scales = torch.ones(spec.scales_shape(32, k), dtype=torch.float32)
                    u = v = None
                    if spec.lowrank:
                        u, v = layer.lowrank_u.detach(), layer.lowrank_v.detach()
                    if spec.has_prune and spec.prune == 1:
                        prune_threshold(w, spec.sparsity, spec.per_row)
                    state = WeightState(w, beta, thr, scales, layer.mask, spec)
                    if spec.has_quant:
                        quant_scales(state)
                    if spec.has_prune or spec.has_quant:
                        blend_weight(state)
                        weight_grad(torch.ones_like(w), state)
                    x = torch.ones(16, k, dtype=dtype)
                    for strategy in dispatch.STRATEGIES:
                        with dispatch.force(strategy):
                            for bias in (layer.bias.detach(), None):
                                y = linear_forward(x, w, bias, beta, thr, scales, layer.mask, u, v, spec)
                                linear_backward(y, x, w, bias, beta, thr, scales, layer.mask, u, v, spec, (True,) * 4)
    return records


def _triton_type(value) -> str:
    from .utils import TORCH_TO_TRITON

    if isinstance(value, torch.Tensor):
        return "*" + TORCH_TO_TRITON[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def variants(records, all_configs_for=()) -> dict:
    """{key: (jit_fn, signature, constexprs, options)} deduplicated; autotuned kernels get their configs."""
    import triton

    out = {}
    for kernel, kwargs in records:
        fn = kernel
        configs = [None]
        if isinstance(kernel, triton.runtime.Autotuner):
            fn = kernel.fn
            configs = kernel.configs
        for config in configs:
            args = dict(kwargs)
            options = {"num_warps": args.pop("num_warps", 4), "num_stages": args.pop("num_stages", 3)}
            if config is not None:
                args.update(config.kwargs)
                options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
            signature, constexprs = {}, {}
            for param in fn.params:
                value = args[param.name]
                if param.is_constexpr:
                    signature[param.name] = "constexpr"
                    constexprs[param.name] = value
                else:
                    signature[param.name] = _triton_type(value)
            key = (fn.__name__, json.dumps(signature, sort_keys=True), repr(sorted(constexprs.items())),
                   repr(sorted(options.items())))
            out[key] = (fn, signature, constexprs, options)
    return out


def compile_variant(fn, signature, constexprs, options, arch: int):
    """Compile one variant to a cubin for ``sm_<arch>``; returns the CompiledKernel."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                              options=dict(options, enable_fp_fusion=False))
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"{fn.__name__}: no cubin for sm_{arch}")
    return compiled


def _dtype_of(signature) -> str:
    for name in ("a_ptr", "w_ptr"):
        if name in signature:
            return signature[name][1:]
    return "?"


def _full_transform(c: dict) -> bool:
    """The GEMM variant with the most code: N:M ranks and fake quantization in the forward prologue."""
    return c["PRUNE"] == 2 and c["QUANT"] == 1 and c["B_IS_W"] == 1


def plan(found: dict, archs) -> list:
    """Compile jobs ``(label, fn, signature, constexprs, options, arch, strict)``.

    * every constexpr variant of every kernel (both strategies, every mode) in bf16, per arch;
    * the other dtypes where the code differs: every variant of the small kernels in fp32 and
      fp16 on sm_90; the full-transform forward GEMM in fp32 (sm_80 and sm_90: fp32 tiles are
      the ones near an A100's shared memory) and fp16, and the fp32 low-rank fold;
    * autotune configs of the full-transform bf16 forward GEMM: the largest on every arch, the
      smallest (decode) on sm_90 (``strict=False``: a config over an architecture's shared
      memory is skipped by the autotuner at run time, not an error).

    About 45 GEMM compiles of 4-10 s each and 80 small ones: what fits a CPU CI budget.
    """
    from .vcon_matmul import GPU_CONFIGS

    by_variant: dict = {}
    for (name, _sig, _cx, _opts), (fn, signature, constexprs, options) in found.items():
        cx = {k: v for k, v in constexprs.items() if k != "BLOCK_K"}  # fp32 halves BLOCK_K
        key = (name, repr(sorted(cx.items())), repr(sorted(options.items())), _dtype_of(signature))
        by_variant.setdefault(key, (fn, signature, constexprs, options))
    jobs = []
    for (name, _cx, _opts, dtype), (fn, signature, constexprs, options) in sorted(by_variant.items()):
        if name != "_vcon_matmul_kernel":
            job_archs = archs if dtype in ("bf16", "?") else [a for a in archs if a == 90]
        elif dtype == "bf16":
            job_archs = archs
        elif dtype == "fp32" and _full_transform(constexprs):
            job_archs = archs
        elif (dtype == "fp16" and _full_transform(constexprs)) or (dtype == "fp32" and constexprs["LOWRANK"]
                                                                      and constexprs["B_IS_W"] == 1):
            job_archs = [a for a in archs if a == 90]
        else:
            continue
        label = f"{name} {dtype} {describe_constexprs(constexprs)} {options}"
        jobs += [(label, fn, signature, constexprs, options, arch, True) for arch in job_archs]
    for (name, _cx, _opts, dtype), (fn, signature, constexprs, _options) in sorted(by_variant.items()):
        if not (name == "_vcon_matmul_kernel" and dtype == "bf16" and _full_transform(constexprs)):
            continue
        for (bm, bn, bk, warps, stages), job_archs in ((GPU_CONFIGS[0], archs), (GPU_CONFIGS[-1], [90])):
            cx = dict(constexprs, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk)
            options = {"num_warps": warps, "num_stages": stages}
            label = f"{name} bf16 autotune-config {describe_constexprs(cx)} {options}"
            jobs += [(label, fn, signature, cx, options, arch, False) for arch in job_archs if arch in archs]
    return jobs


def describe_constexprs(constexprs: dict) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(constexprs.items()) if k != "UPCAST")


def run_jobs(jobs, out=print) -> list:
    """Compile every job; returns ``(label, arch, seconds, shared, fits)``; raises on a compile error."""
    results = []
    for label, fn, signature, constexprs, options, arch, strict in jobs:
        start = time.perf_counter()
        try:
            compiled = compile_variant(fn, signature, constexprs, options, arch)
        except Exception as exc:
            raise RuntimeError(f"sm_{arch} {label}: {type(exc).__name__}: {exc}") from exc
        shared = compiled.metadata.shared
        fits = shared <= SHARED_LIMIT[arch]
        if strict and not fits:
            raise RuntimeError(f"sm_{arch} {label}: {shared} bytes of shared memory > limit {SHARED_LIMIT[arch]}")
        seconds = time.perf_counter() - start
        results.append((label, arch, seconds, shared, fits))
        out(f"{'ok' if fits else 'over-smem'} sm_{arch} {seconds:5.2f}s shared={shared} {label}")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 (repeatable)")
    parser.add_argument("--shard", default="0/1", help="i/n: compile every n-th variant starting at i")
    parser.add_argument("--list", action="store_true", help="only list the variants")
    args = parser.parse_args(argv)
    from .utils import INTERPRET

    if INTERPRET:
        print("TRITON_INTERPRET=1: kernels are interpreted, nothing to compile; run with TRITON_INTERPRET=0")
        return 2
    archs = args.arch or [80, 90]
    index, count = (int(p) for p in args.shard.split("/"))
    jobs = plan(variants(record_launches()), archs)
    mine = jobs[index::count]
    print(f"{len(jobs)} compile jobs, running {len(mine)} (shard {index}/{count})", flush=True)
    if args.list:
        for job in mine:
            print(f"sm_{job[5]} {job[0]}")
        return 0
    results = run_jobs(mine, out=lambda line: print(line, flush=True))
    over = [r for r in results if not r[4]]
    print(f"compiled {len(results)} in {sum(r[2] for r in results):.1f}s; {len(over)} autotune configs over "
          "shared memory (skipped by the autotuner at run time)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
