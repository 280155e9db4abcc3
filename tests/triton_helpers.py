"""Shared helpers of the Triton kernel tests (interpreted on CPU: see conftest.py)."""

from __future__ import annotations

import contextlib

import torch

import vcon_kernels as vk
from vcon_kernels import ops

# CPU (interpreted) here; the GPU run of bench/gpu_check.sh runs the same tests natively on CUDA.
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

# Without Triton (or with TRITON_INTERPRET unset on a CPU machine) this raises at import:
# the kernel tests fail, they are never skipped.
TRITON = vk.backends.get("triton")
TORCH = vk.backends.get("torch")

# Tolerances against the plain-torch backend. fp32: GEMM accumulation order only. bf16: one bf16
# ulp (2**-8 relative) of the outputs, from a different rounding path (the interpreter stands in
# for the GPU's bf16 tensor cores by rounding operands to bf16 and computing in fp32).
TOL = {
    torch.float32: dict(atol=3e-5, rtol=2e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
    torch.float16: dict(atol=1e-3, rtol=2e-3),
}


def on_device(module):
    return module.to(DEVICE)


@contextlib.contextmanager
def no_tf32():
    """Full fp32 convolutions and matmuls on a GPU (the references are compared at fp32 tolerances)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def layer_tensors(layer):
    """(weight, bias, beta, mask, u, v) of a VCON layer, detached."""
    u = getattr(layer, "lowrank_u", None)
    v = getattr(layer, "lowrank_v", None)
    bias = None if layer.bias is None else layer.bias.detach()
    return (layer.weight_2d().detach(), bias, layer.beta, layer.mask,
            None if u is None else u.detach(), None if v is None else v.detach())


@contextlib.contextmanager
def matmul_tiles(block_m: int, block_n: int, block_k: int):
    """Shrink the GEMM tiles (without autotuning) so that small shapes span several tiles in every dimension."""
    ops.vcon_matmul.TILE_OVERRIDE.update(BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k)
    try:
        yield
    finally:
        ops.vcon_matmul.TILE_OVERRIDE.clear()


def assert_close(actual, expected, dtype, what=""):
    """Elementwise within TOL[dtype]; for half dtypes atol scales with the tensor's largest entry
    (GEMM outputs whose operands were rounded differently, e.g. the low-rank t' = (1 - beta) x V^T
    rounded once here and twice in the torch backend, differ by a few ulps of the largest terms)."""
    tol = dict(TOL[dtype])
    if dtype != torch.float32 and expected.numel():
        tol["atol"] = tol["atol"] * max(1.0, float(expected.float().abs().max()))
    torch.testing.assert_close(actual.float(), expected.float(), **tol, msg=lambda m: f"{what}: {m}")
