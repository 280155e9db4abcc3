"""Triton linear forward/backward (both strategies) against the plain-torch backend, every mode.

The torch backend is the oracle here (its own tests check it against reference.py); the
state (threshold, scales) comes from the torch backend so that only the GEMM kernels are
under test. Shapes are odd (K = 53 or 52, N = 37, M = 70: two M tiles of 64, masked edges).
"""

import pytest
import torch
import triton  # noqa: F401  (a missing Triton fails this module, it does not skip it)
from cases import LINEAR_CASES
from cases import make_linear
from cases import set_betas
from triton_helpers import DEVICE
from triton_helpers import TORCH
from triton_helpers import TRITON
from triton_helpers import assert_close
from triton_helpers import layer_tensors
from triton_helpers import matmul_tiles
from triton_helpers import no_tf32
from triton_helpers import on_device

import vcon_kernels as vk
from vcon_kernels.ops import dispatch
from vcon_kernels.reference import reference_keep_mask

CASES = sorted(LINEAR_CASES)


@pytest.fixture(autouse=True)
def full_fp32():
    with no_tf32():
        yield


def _run(backend, layer, x, g, bias):
    w, _, beta, mask, u, v = layer_tensors(layer)
    spec = layer.spec()
    thr, scales = TORCH.compute_state(w, beta, mask, spec)
    y = backend.linear_forward(x, w, bias, beta, thr, scales, mask, u, v, spec)
    needs = (True, True, bias is not None, u is not None)
    grads = backend.linear_backward(g, x, w, bias, beta, thr, scales, mask, u, v, spec, needs)
    return y, grads


def _compare(layer, m, dtype, strategy, with_bias=(True, False), seed=1):
    torch.manual_seed(seed)
    x = torch.randn(m, layer.in_features).to(device=DEVICE, dtype=dtype)
    g = torch.randn(m, layer.out_features).to(device=DEVICE, dtype=dtype)
    for has_bias in with_bias:
        bias = layer.bias.detach() if has_bias else None
        with dispatch.force(strategy):
            y, grads = _run(TRITON, layer, x, g, bias)
        y_ref, grads_ref = _run(TORCH, layer, x, g, bias)
        assert y.dtype == dtype and y.shape == y_ref.shape
        assert_close(y, y_ref, dtype, f"y (bias={has_bias})")
        for name, got, ref in zip(("dx", "dW", "db", "dU", "dV"), grads, grads_ref):
            if ref is None:
                assert got is None, name
                continue
            assert got.dtype == ref.dtype and got.shape == ref.shape, name
            assert_close(got, ref, dtype, f"{name} (bias={has_bias})")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("grad", ["ste", "exact"])
@pytest.mark.parametrize("case", CASES)
def test_fused_matches_torch_backend(case, grad, beta, dtype):
    layer = on_device(make_linear(case, grad, dtype))
    set_betas(layer, beta)
    # without a bias at beta = 0, with one otherwise: every mode, grad and dtype sees both
    _compare(layer, 70, dtype, "fused", with_bias=(beta != 0.0,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("grad", ["ste", "exact"])
@pytest.mark.parametrize("case", CASES)
def test_weff_strategy_matches_torch_backend(case, grad, dtype):
    """Build W_eff + torch.mm: the kernels are blend_weight / weight_grad (bit-exact, test_triton_blend)."""
    layer = on_device(make_linear(case, grad, dtype))
    set_betas(layer, 0.37)
    _compare(layer, 9, dtype, "weff", with_bias=(grad == "ste",))


@pytest.mark.parametrize("grad", ["ste", "exact"])
@pytest.mark.parametrize("case", ["prune_int4", "nm_int8_group", "prune_binary"])
def test_compose_stages_with_their_own_beta(case, grad):
    layer = on_device(make_linear(case, grad))
    set_betas(layer, 0.3, 0.8)
    _compare(layer, 11, torch.float32, "fused")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", ["prune_row", "prune_nm", "int4_group", "nm_int8_group", "prune_once", "lowrank",
                                  "nm_3_6"])
def test_many_tiles_in_every_dimension(case, dtype):
    """16 x 16 x 16 tiles on M=37, N=37, K=53/52/48: 3 x 3 output tiles, 4 K steps, ragged edges,
    N:M groups read from registers (m=4 <= 16) or from memory (m=6)."""
    if case == "nm_3_6":
        torch.manual_seed(0)
        layer = on_device(vk.VCONLinear.from_linear(torch.nn.Linear(48, 37, dtype=dtype),
                                                    vk.Prune(granularity="nm", n=3, m=6, grad="exact")))
    else:
        layer = on_device(make_linear(case, "exact", dtype))
    set_betas(layer, 0.37)
    with matmul_tiles(16, 16, 16):
        _compare(layer, 37, dtype, "fused", with_bias=(True,))


@pytest.mark.parametrize("tiles", [16, 64])
@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4), (2, 8), (1, 2), (5, 16), (3, 6)])
def test_fused_nm_keep_is_exact_with_ties(n, m, tiles):
    """The fused GEMMs' own N:M keep-masks, bit for bit, on weights full of ties and zeros.

    x = I and dY = I make y = W_eff^T and dX = W_eff exactly (one nonzero product per output);
    dY = ones makes the exact-gradient dW its coefficient. Groups of 4 with a constexpr n use the
    3-input logic form, other powers of two the reshaped rank count (both in registers), m = 6 the
    reads from memory; 16-wide tiles put several groups and K steps in every tile."""
    k = 48 if m == 6 else 64
    torch.manual_seed(n * 100 + m)
    layer = on_device(vk.VCONLinear(k, k, config=vk.Prune(granularity="nm", n=n, m=m, grad="exact")))
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-2, 3, layer.weight.shape).float().to(DEVICE))
    set_betas(layer, 0.37)
    w, _, beta, mask, _, _ = layer_tensors(layer)
    spec = layer.spec()
    thr, scales = TORCH.compute_state(w, beta, mask, spec)
    eye = torch.eye(k, device=DEVICE)
    w_eff = TORCH.blend_weight(w, beta, thr, scales, mask, spec)
    keep = reference_keep_mask(w, vk.Prune(granularity="nm", n=n, m=m))
    assert torch.equal(w_eff, torch.where(keep, w, w * 0.37))
    with dispatch.force("fused"), matmul_tiles(tiles, tiles, tiles):
        y = TRITON.linear_forward(eye, w, None, beta, thr, scales, mask, None, None, spec)
        dx = TRITON.linear_backward(eye, eye, w, None, beta, thr, scales, mask, None, None, spec,
                                    (True, False, False, False))[0]
        dw = TRITON.linear_backward(torch.ones(k, k, device=DEVICE), eye, w, None, beta, thr, scales, mask, None,
                                    None, spec, (False, True, False, False))[1]
    assert torch.equal(y, w_eff.t())
    assert torch.equal(dx, w_eff)
    assert torch.equal(dw, torch.where(keep, 1.0, 0.37))


def test_fp16_fused():
    layer = on_device(make_linear("nm_int8_group", "exact", torch.float16))
    set_betas(layer, 0.37)
    _compare(layer, 20, torch.float16, "fused", with_bias=(True,))


def test_partial_needs():
    """Only what is asked for is computed; db without dW comes from a plain reduction."""
    layer = on_device(make_linear("prune_layer", "exact"))
    set_betas(layer, 0.5)
    w, bias, beta, mask, u, v = layer_tensors(layer)
    spec = layer.spec()
    thr, scales = TORCH.compute_state(w, beta, mask, spec)
    x, g = torch.randn(6, 53, device=DEVICE), torch.randn(6, 37, device=DEVICE)
    for needs in [(True, False, False, False), (False, True, False, False), (False, False, True, False)]:
        got = TRITON.linear_backward(g, x, w, bias, beta, thr, scales, mask, u, v, spec, needs)
        ref = TORCH.linear_backward(g, x, w, bias, beta, thr, scales, mask, u, v, spec, needs)
        for a, b in zip(got, ref):
            assert (a is None) == (b is None)
            if a is not None:
                torch.testing.assert_close(a, b)
