"""``y = x W^T`` of a finalized layer: the C++ compressed kernels where they apply, else plain torch.

On CPU (the C++ extension built, fp32 / bf16 / fp16 activations in the storage's dtype, no
gradient wanted, no autocast) a storage's codes go straight to ``_C.infer_linear``:

* decode (at most ``DECODE_MAX_M[dtype]`` rows of x): a GEMV that reads each compressed row once;
* prefill, weights of at most ``WHOLE_MAX_BYTES`` dequantized: the whole weight dequantized
  into a reused workspace, then torch's own ``addmm`` (the GEMM and bias of ``F.linear``);
* prefill, larger weights: dequantized block by block into a reused per-thread workspace,
  each block through one GEMM (fp32 for fp32/fp16 activations, bf16 for bf16).

On CUDA (Triton importable, same conditions otherwise) the quantized, binary, N:M and N:M +
quantized storages go to the Triton weight-only GEMM ``ops/dequant_matmul.py``, which reads the
codes and rebuilds each weight tile in registers (decode and prefill autotune configs; from
``DENSE_MIN_M`` rows, one dequantize pass + cuBLAS); no host
synchronization (nothing reads a tensor's values on the host). CSR storages keep the path below.

Everything else (CSR on CUDA, fp64, autocast, autograd, torch.compile, a missing extension or
Triton) computes ``F.linear(x, storage.materialize(), bias)``: the weight rebuilt with the
arithmetic of the VCON layer at beta = 0 and no host synchronization.

Example usage::

    from vcon_kernels.compressed.matmul import compressed_linear
    y = compressed_linear(x, layer.storage, layer.bias)   # what CompressedLinear.forward does
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# The largest batch (rows of x) that takes the GEMV; above it the blocked dequantize + GEMM
# wins. Measured on the 2-core AVX-512 EPYC of bench/RESULTS.md (K = N = 2048, 1 thread):
# in fp32 the GEMV is 0.4-0.8x dense at M = 8 and loses to the GEMM from M = 16 for some
# formats; with bf16 activations dense bf16 (oneDNN, avx512_bf16) is 2-4x faster than fp32,
# so the GEMV only wins for the first rows.
DECODE_MAX_M = {torch.float32: 8, torch.float16: 8, torch.bfloat16: 2}
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Prefill: weights up to this size once dequantized (fp32 or bf16) are rebuilt whole and run
# through torch's addmm, exactly F.linear's GEMM; larger ones go block by block, so the
# workspace (kept by the calling thread across calls) stays bounded. Measured at MiniLM's
# shapes (M = 4608, K, N in {384, 1536}, bench/profile_prefill.py): blocked, the GEMM alone was
# 1.02-1.07x nn.Linear on 1 thread and the bias a further pass over y; whole, see INFER_NOTES.md.
WHOLE_MAX_BYTES = 16 << 20

try:
    from .. import _C
except ImportError:  # the extension is optional: plain torch computes the same
    _C = None
if _C is not None and getattr(_C, "INFER_VERSION", 0) < 2:  # a build older than these kernels
    _C = None


def fast_path_available() -> bool:
    """Whether the C++ compressed matmul kernels are built into this install."""
    return _C is not None


def _plain_call_wanted(x: torch.Tensor, storage) -> bool:
    """Whether this call must take ``materialize`` + ``F.linear`` whatever the device's kernels.

    x not in the layer's (fp32 / bf16 / fp16) dtype; torch.compile tracing (the graph gets materialize
    + F.linear, inductor fuses the dequantize); autocast (it picks the compute dtype: the plain path
    follows it); or a gradient wanted (the kernels have no derivative).
    """
    return (x.dtype not in FAST_DTYPES or x.dtype != storage.dtype or torch.compiler.is_compiling()
            or torch.is_autocast_enabled(x.device.type) or (torch.is_grad_enabled() and x.requires_grad))


def _fast_args(x: torch.Tensor, storage):
    """The storage's kernel arguments when the C++ kernels take this call, else None."""
    if _C is None or x.device.type != "cpu" or _plain_call_wanted(x, storage):
        return None
    return storage.infer_args()


# Devices whose calls take the Triton kernel (a tuple so that a test can route CPU tensors there,
# under TRITON_INTERPRET=1, to check the routing itself).
TRITON_DEVICES = ("cuda",)
_dequant = None  # ops.dequant_matmul once imported; False when Triton cannot be imported


def _dequant_module():
    global _dequant
    if _dequant is None:
        try:
            from ..ops import dequant_matmul
        except ImportError:  # no Triton in this install: the materialize path computes the same
            dequant_matmul = False
        _dequant = dequant_matmul
    return _dequant


def _triton_ok(x: torch.Tensor, storage, bias) -> bool:
    """Whether the Triton dequantizing GEMM takes this call (CUDA, no autograd, no autocast, not compiling)."""
    if x.device.type not in TRITON_DEVICES or _plain_call_wanted(x, storage):
        return False
    if bias is not None and bias.dtype != x.dtype:
        return False
    kernels = _dequant_module()
    return bool(kernels) and kernels.supports(storage)


def _fast_ok(x: torch.Tensor, storage) -> bool:
    return _fast_args(x, storage) is not None


def dense_weight(storage) -> torch.Tensor:
    """``storage.materialize()``, in one C++ pass on CPU (``_C.infer_dequantize``) where it applies.

    For the layers that still rebuild their weight per call (``CompressedConv2d``): the same
    values as ``materialize()`` (bit for bit), without its tensor ops and temporaries.
    """
    if (_C is None or storage.dtype not in FAST_DTYPES or torch.compiler.is_compiling()
            or storage.infer_args() is None):
        return storage.materialize()
    fmt, a, b, crow, scales, bits, qmin, group_size, n, m, index_bits = storage.infer_args()
    if a.device.type != "cpu":
        return storage.materialize()
    return _C.infer_dequantize(fmt, a, b, crow, scales, storage.shape[0], storage.shape[1], bits, qmin, group_size,
                               n, m, index_bits, storage.dtype)


def compressed_linear(x: torch.Tensor, storage, bias=None) -> torch.Tensor:
    """``x @ W^T + bias`` for a compressed ``storage`` (any leading dims of ``x``)."""
    if x.shape[-1] != storage.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features in its last dim, the layer expects {storage.shape[1]}")
    if _triton_ok(x, storage, bias):  # CUDA: the codes go straight to the Triton GEMM
        x2 = x.reshape(-1, storage.shape[1])
        if x2.stride(-1) != 1:  # any row stride is fine, columns must be contiguous to load fast
            x2 = x2.contiguous()
        late_bias = bias is not None and torch.is_grad_enabled() and bias.requires_grad
        y = _dequant.dequant_linear(x2, storage, None if late_bias else bias)
        if late_bias:
            y = y + bias
        return y.reshape(*x.shape[:-1], storage.shape[0])
    args = _fast_args(x, storage)  # built once per call: at decode each microsecond is ~1% of the layer
    if args is None:
        return F.linear(x, storage.materialize(), bias)
    fmt, a, b, crow, scales, bits, qmin, group_size, n, m, index_bits = args
    x2 = x.reshape(-1, storage.shape[1]).contiguous()
    # The bias goes into the kernel's GEMM (no extra pass over y) unless autograd wants its gradient.
    late_bias = bias is not None and torch.is_grad_enabled() and bias.requires_grad
    y = _C.infer_linear(x2, fmt, a, b, crow, scales, storage.shape[0], bits, qmin, group_size, n, m, index_bits,
                        DECODE_MAX_M[x.dtype], None if late_bias else bias, WHOLE_MAX_BYTES)
    if late_bias:
        y = y + bias
    return y.reshape(*x.shape[:-1], storage.shape[0])
