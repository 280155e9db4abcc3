"""Triton elementwise kernels: W_eff (blend_weight) and the exact-gradient epilogue (weight_grad)."""

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
from triton_helpers import on_device

import vcon_kernels as vk
from vcon_kernels.reference import reference_keep_mask


def _state(layer):
    w, _, beta, mask, _, _ = layer_tensors(layer)
    thr, scales = TORCH.compute_state(w, beta, mask, layer.spec())
    return w, beta, thr, scales, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("grad", ["ste", "exact"])
@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_blend_and_weight_grad_bit_exact(case, grad, beta, dtype):
    """Same fp32 formula, same IEEE division and rounding decisions: identical bits to the torch backend."""
    layer = on_device(make_linear(case, grad, dtype))
    set_betas(layer, beta, 1.0 - beta)
    spec = layer.spec()
    w, beta_t, thr, scales, mask = _state(layer)
    w_eff = TRITON.blend_weight(w, beta_t, thr, scales, mask, spec)
    assert w_eff.dtype == dtype
    assert torch.equal(w_eff, TORCH.blend_weight(w, beta_t, thr, scales, mask, spec))
    g = torch.randn(w.shape).to(device=DEVICE, dtype=dtype)
    dw = TRITON.weight_grad(g, w, beta_t, thr, scales, mask, spec)
    dw_ref = TORCH.weight_grad(g, w, beta_t, thr, scales, mask, spec)
    if spec.lowrank and dtype != torch.float32:
        # the torch backend rounds beta to the half dtype before G * beta; the kernel multiplies in
        # fp32 and rounds once (more accurate): equal to one ulp
        assert_close(dw, dw_ref, dtype, "dW")
    else:
        assert torch.equal(dw, dw_ref)


@pytest.mark.parametrize("n,m,k", [(2, 4, 52), (1, 8, 64), (3, 6, 48)])
def test_nm_ties_match_reference_ranks(n, m, k):
    """N:M keeps exactly n per group, lower index first on ties, both from registers (m a power of two
    dividing the tile) and from memory (m = 6); checked against reference.py's explicit rank count."""
    torch.manual_seed(0)
    cfg = vk.Prune(granularity="nm", n=n, m=m)
    layer = on_device(vk.VCONLinear(k, 19, config=cfg))
    with torch.no_grad():
        layer.weight.copy_(torch.randint(-2, 3, layer.weight.shape).float().to(DEVICE))  # many ties, zeros
    layer.set_beta(0.0)
    w, beta, thr, scales, mask = _state(layer)
    w_eff = TRITON.blend_weight(w, beta, thr, scales, mask, layer.spec())
    keep = reference_keep_mask(w, cfg)
    assert torch.equal(w_eff, torch.where(keep, w, torch.zeros_like(w)))
    # the exact gradient coefficient at beta = 0 is the mask itself
    dw = TRITON.weight_grad(torch.ones_like(w), w, beta, thr, scales, mask, vk.Prune(granularity="nm", n=n, m=m,
                            grad="exact").spec(19, k))
    assert torch.equal(dw, keep.float())


def test_quant_rounds_half_to_even():
    """Codes exactly at .5 (W / s = k + 0.5) round to the even integer, as torch.round."""
    w = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 126.5]], device=DEVICE)
    layer = on_device(vk.VCONLinear(8, 1, config=vk.Quantize(bits=8)))
    with torch.no_grad():
        layer.weight.copy_(w)  # s = 127 / 127 = 1
    layer.set_beta(0.0)
    state = _state(layer)
    got = TRITON.blend_weight(*state, layer.spec())
    assert got.tolist() == [[127.0, 0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 126.0]]


def test_interpreter_fma_rounds_once():
    """The interpreter's fma (patched by vcon_kernels.ops.utils under TRITON_INTERPRET) rounds once, as a GPU's
    FFMA: checked against exact rationals, incl. an fp64 sum that lands exactly between two fp32 values."""
    from fractions import Fraction

    import numpy as np

    from vcon_kernels.ops.utils import _exact_fma32

    rng = np.random.default_rng(0)
    x = rng.standard_normal(4000).astype(np.float32)
    y = rng.standard_normal(4000).astype(np.float32)
    z = np.concatenate([-(x * y)[:2000], rng.standard_normal(2000).astype(np.float32)]).astype(np.float32)
    # 2^8 (1 + 2^-20) * 2^8 (1 - 2^-20) + (2^40 + 2^17) = 2^40 + 2^17 + 2^16 - 2^-24: fp64 rounds it to the
    # fp32 midpoint 2^40 + 2^17 + 2^16, whose tie would go to the even 2^40 + 2^18; the exact value is below
    x = np.append(x, np.float32(256 * (1 + 2**-20)))
    y = np.append(y, np.float32(256 * (1 - 2**-20)))
    z = np.append(z, np.float32(2**40 + 2**17))
    got = _exact_fma32(x, y, z)
    assert got[-1] == np.float32(2**40 + 2**17)
    for i in range(len(x)):
        exact = Fraction(float(x[i])) * Fraction(float(y[i])) + Fraction(float(z[i]))
        err = abs(Fraction(float(got[i])) - exact)
        for nb in (np.nextafter(got[i], np.float32(-np.inf)), np.nextafter(got[i], np.float32(np.inf))):
            assert err <= abs(Fraction(float(nb)) - exact), (i, x[i], y[i], z[i])


@pytest.mark.parametrize("beta", [0.0, 0.37])
def test_fused_quant_codes_at_rounding_boundaries(beta):
    """The fused GEMMs divide by a per-row reciprocal plus two exact FMA corrections, not by div_rn: their
    codes must still be those of the IEEE quotient. Rows of W1 = (k + 1/2) s' +- 0..3 ulp (quotients at and
    around every rounding boundary, ties included), with scales from 1e-38 (subnormal s') to 1e4;
    x = I and dY = I make y = W_eff^T and dX = W_eff exactly."""
    from triton_helpers import matmul_tiles

    from vcon_kernels.ops import dispatch

    k = 64
    amax = torch.tensor([127.0, 1.0, 3.3e-3, 7.1, 1e4, 1e-30, 1e-38, 2.9e-36] * 8)
    s = amax / 127
    half = torch.arange(k, dtype=torch.float32) % 21 - 10 + 0.5  # k + 1/2 for k in [-10, 10]
    w = (half[None, :] * s[:, None]).float()
    steps = (torch.arange(k) % 7 - 3)[None, :].expand(k, k)
    for _ in range(3):  # move each element by its own number of ulps (-3..3)
        w = torch.where(steps > 0, torch.nextafter(w, torch.tensor(float("inf"))), w)
        w = torch.where(steps < 0, torch.nextafter(w, torch.tensor(float("-inf"))), w)
        steps = steps - steps.sign()
    w[:, 0] = amax  # sets the row's scale
    layer = on_device(vk.VCONLinear(k, k, config=vk.Quantize(bits=8)))
    with torch.no_grad():
        layer.weight.copy_(w.to(DEVICE))
    layer.set_beta(beta)
    w, beta_t, thr, scales, mask = _state(layer)
    spec = layer.spec()
    w_eff = TORCH.blend_weight(w, beta_t, thr, scales, mask, spec)
    assert torch.equal(TRITON.blend_weight(w, beta_t, thr, scales, mask, spec), w_eff)
    eye = torch.eye(k, device=DEVICE)
    with dispatch.force("fused"), matmul_tiles(16, 16, 16):
        y = TRITON.linear_forward(eye, w, None, beta_t, thr, scales, mask, None, None, spec)
        dx = TRITON.linear_backward(eye, eye, w, None, beta_t, thr, scales, mask, None, None, spec,
                                    (True, False, False, False))[0]
    assert torch.equal(y, w_eff.t())
    assert torch.equal(dx, w_eff)
