"""Compile one recorded launch for a GPU on any machine, specialized exactly as the GPU JIT would.

On a GPU, ``JITFunction.run`` does not compile the kernel's plain signature: through
``native_specialize_impl`` (``triton._C.libtriton``) every int argument equal to 1 becomes a
constexpr and every int divisible by 16 and every 16-byte aligned pointer gets
``tt.divisibility=16``. Those facts change the program (vectorized loads, the software
pipeliner, layouts: compiling without them gives a different kernel, one that can compile
where the real one fails). :func:`specialize` calls the same function with the CUDA backend,
so the ``ASTSource`` built here is the one the JIT builds for that launch.

Example usage::

    sig, cx, attrs = specialize(fn, kwargs)
    compiled = compile_for(fn, kwargs, num_warps=4, num_stages=3, arch=90)
    compiled.metadata.shared, compiled.n_regs, compiled.asm["ptx"]
"""

from __future__ import annotations

import contextlib
import io
import re

# Shared memory per block, bytes (sm_80: A100, 163 KB; sm_90: H100/H200, 227 KB).
SHARED_LIMIT = {80: 166912, 90: 232448}


def specialize(fn, kwargs: dict):
    """``(signature, constexprs, attrs)`` as ``JITFunction.run`` + ``_pack_args`` build them for CUDA."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        if param.name not in kwargs:
            raise KeyError(f"{fn.__name__}: no value recorded for argument {param.name!r}")
        value = kwargs[param.name]
        if param.is_constexpr:
            signature[param.name] = "constexpr"
            constexprs[(i,)] = value
            continue
        ty, spec = native_specialize_impl(CUDABackend, value, param.is_const, not param.do_not_specialize,
                                          not param.do_not_specialize_on_alignment)
        signature[param.name] = ty
        if ty == "constexpr":
            constexprs[(i,)] = spec
        elif isinstance(spec, str):
            attrs[(i,)] = CUDABackend.parse_attr(spec)
    return signature, constexprs, attrs


def specialization_key(fn, kwargs: dict) -> tuple:
    """What the JIT caches a compiled program by (without options): equal keys, one program."""
    signature, constexprs, attrs = specialize(fn, kwargs)
    names = [p.name for p in fn.params]
    return (fn.__name__, tuple(signature.items()),
            tuple(sorted((names[i[0]], repr(v)) for i, v in constexprs.items())),
            tuple(sorted((names[i[0]], repr(v)) for i, v in attrs.items())))


def compile_for(fn, kwargs: dict, num_warps: int, num_stages: int, arch: int):
    """The ``CompiledKernel`` (ttir .. ptx, cubin) for ``sm_<arch>``; ptxas' verbose log in ``.ptxas_log``.

    ``enable_fp_fusion=False`` as every launch (``utils.launch``). Raises whatever the compiler
    raises (an MLIR pass failure is a ``RuntimeError``, ptxas a ``PTXASError``).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature, constexprs, attrs = specialize(fn, kwargs)
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    with contextlib.redirect_stdout(log):
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options=dict(num_warps=num_warps, num_stages=num_stages, enable_fp_fusion=False))
    if not compiled.asm.get("cubin"):
        raise RuntimeError(f"{fn.__name__}: no cubin for sm_{arch}")
    compiled.ptxas_log = log.getvalue()
    return compiled


def spill_bytes(compiled) -> int:
    """Spill-store bytes from the ptxas log (needs ``TRITON_DUMP_PTXAS_LOG=1``), else Triton's n_spills."""
    found = re.search(r"(\d+) bytes spill stores", getattr(compiled, "ptxas_log", ""))
    return int(found.group(1)) if found else int(getattr(compiled, "n_spills", 0) or 0)
