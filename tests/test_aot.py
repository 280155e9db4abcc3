"""The compile check's own claims: its stand-in shapes specialize like real layers, and the safe autotuner.

Both need kernels as ``JITFunction``s (not interpreted), so they run in a subprocess with
``TRITON_INTERPRET=0``; nothing is launched (no GPU here): launches are recorded and compiled.
"""

import os
import subprocess
import sys
import textwrap

import triton  # noqa: F401  (a missing Triton fails this module, it does not skip it)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _python(tmp_path, code: str, timeout=600):
    script = tmp_path / "check.py"  # a file: @triton.jit needs the source
    script.write_text(textwrap.dedent(code))
    env = dict(os.environ, TRITON_INTERPRET="0", VCON_TRITON_AUTOTUNE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc.stdout


def test_stand_in_shapes_specialize_like_a_real_4096_layer(tmp_path):
    """M = 32, K = 2048, N = 256 ("tokens") gives the JIT programs of M = 512, K = N = 4096, rank 64, groups 128."""
    out = _python(tmp_path, """
        import torch
        from vcon_kernels import configs as c
        from vcon_kernels.modules import VCONLinear
        from vcon_kernels.ops import aot, aot_record
        from vcon_kernels.ops.aot_compile import specialization_key

        def keys(layer, m):
            recs = aot_record.record_layer(layer, m, strategies=("fused",))  # weff would run torch.mm on CPU
            return [aot.variants([(k, kw, "")])[0]["key"] for k, kw in recs]

        modes = {
            "int8": (lambda r: c.Quantize(bits=8, grad="exact")),
            "prune_row": (lambda r: c.Prune(sparsity=0.5, granularity="row")),
            "prune_layer": (lambda r: c.Prune(sparsity=0.5, grad="exact")),
            "int4_group": (lambda r: c.Quantize(bits=4, granularity="group", group_size=128)),
            "nm_mask_int8": (lambda r: c.Compose(c.Prune(granularity="nm", update="once"), c.Quantize(bits=8))),
            "lowrank": (lambda r: c.LowRank(rank=r)),
        }
        # The per-row threshold compiles one program per row-length class (its row is held in registers):
        # record_threshold_launches records every class; the real layer's must be among them.
        rows_kernel = "_radix_rows_kernel"
        recorded = {aot.variants([(k_, kw, "")])[0]["key"]
                    for k_, kw, _ in aot_record.record_threshold_launches((torch.bfloat16,))}
        m, n, k, _, rank = aot_record.SHAPES["tokens"]
        for name, make in modes.items():
            torch.manual_seed(0)
            real = VCONLinear(4096, 4096, config=make(64), dtype=torch.bfloat16)
            small = VCONLinear(k, n, config=make(rank), dtype=torch.bfloat16)
            a, b = keys(real, 512), keys(small, m)
            assert all(x in recorded for x in a if x[0] == rows_kernel), name
            a = [x for x in a if x[0] != rows_kernel]
            b = [x for x in b if x[0] != rows_kernel]
            assert len(a) == len(b) > 0, (name, len(a), len(b))
            assert a == b, (name, [x for x, y in zip(a, b) if x != y][:1])
            print(name, len(a), "launches, same programs")
    """)
    assert out.count("same programs") == 6, out


def test_safe_autotuner_skips_a_config_that_does_not_compile_and_names_it(tmp_path):
    out = _python(tmp_path, """
        import warnings
        import triton
        import triton.language as tl
        from vcon_kernels.ops.aot_compile import compile_for
        from vcon_kernels.ops.safe_autotune import SafeAutotuner, safe_autotune
        from vcon_kernels.ops import vcon_matmul

        @triton.jit
        def dot_kernel(a_ptr, out_ptr, K: tl.constexpr, BLOCK_K: tl.constexpr):
            offs = tl.arange(0, 16)
            ks = tl.arange(0, BLOCK_K)
            a = tl.load(a_ptr + offs[:, None] * BLOCK_K + ks[None, :])
            b = tl.load(a_ptr + ks[:, None] * 16 + offs[None, :])
            tl.store(out_ptr + offs[:, None] * 16 + offs[None, :], tl.dot(a, b))

        # No GPU here: the check compiles for sm_90 instead of the current device (what a launch would do).
        SafeAutotuner.compile_check = staticmethod(
            lambda fn, args, cfg: compile_for(fn, dict(args, **cfg.kwargs), cfg.num_warps, cfg.num_stages, 90))
        good = triton.Config({"BLOCK_K": 16}, num_warps=4, num_stages=2)
        bad = triton.Config({"BLOCK_K": 8}, num_warps=4, num_stages=2)  # tl.dot needs K >= 16 on a GPU
        import torch
        args = dict(a_ptr=torch.empty(256, dtype=torch.float16), out_ptr=torch.empty(256, dtype=torch.float32), K=16)
        tuner = safe_autotune([bad, good], key=["K"])(dot_kernel)
        tuner.nargs = {}
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            kept = tuner.prune_configs(args)
            kept_again = tuner.prune_configs(args)
        assert kept == [good] and kept_again == [good], kept
        msgs = [str(w.message) for w in caught]
        assert len(msgs) == 1 and "BLOCK_K: 8" in msgs[0] and "does not compile" in msgs[0], msgs
        only_bad = safe_autotune([bad], key=["K"])(dot_kernel)
        only_bad.nargs = {}
        try:
            only_bad.prune_configs(args)
        except RuntimeError as exc:
            assert "none of the 1 autotune configs compiles" in str(exc) and "BLOCK_K: 8" in str(exc), exc
        else:
            raise AssertionError("no error when no config compiles")
        # the GEMM's early prune reads M_KEY from keyword arguments (every launch passes keywords)
        cfgs = vcon_matmul._vcon_matmul_tuned.configs
        kept = vcon_matmul._prune_configs(cfgs, {}, M_KEY=16)
        assert kept and all(c.kwargs["BLOCK_M"] <= 32 for c in kept), kept
        assert isinstance(vcon_matmul._vcon_matmul_tuned, SafeAutotuner)
        print("safe autotune ok")
    """)
    assert "safe autotune ok" in out
