"""Hypothesis property tests: the fused layers against the naive two-pass ``reference.py``.

For random configs (every kind and granularity, both gradient modes, random sparsity, N:M,
bits, group sizes, ranks, mask update policies), random shapes (batch dims including empty
ones, odd N and K), random per-stage betas and dtypes (fp64, fp32, bf16), the fused
``VCONLinear`` / ``VCONConv2d`` must match ``ReferenceVCON`` in the output and in every
gradient (input, weight, bias, U, V), on every backend that runs natively here.

Where exact agreement is not the contract, the strategies stay away on purpose:

* ties in |W| at a pruning threshold (the layer keeps every tie, the reference's topk keeps
  exactly k): fp32/fp64 weights are Gaussian (a tie is a measure-zero event), bf16 weights are
  drawn as distinct bf16 magnitudes;
* prune + quantize with 0 < beta_prune < 1 in fp32/bf16: the reference blends the pruned path
  as ``beta W + (1 - beta) W`` for kept weights, which is W only up to one ulp, and that ulp can
  flip a rounding code (a whole quantization step); beta_prune is drawn from {0, 1/2, 1} there,
  where the blend is exact. fp64 draws any beta (a flip needs a 1e-16 coincidence).

bf16 compares by SQNR (the reference adds bf16 GEMM outputs, the fused path blends weights in
fp32). Runs are derandomized so CI is reproducible; set ``VCON_HYPOTHESIS_EXAMPLES=500`` (and
optionally ``VCON_HYPOTHESIS_RANDOM=1``) to explore more.
"""

import math
import os

import pytest
import torch
from hypothesis import HealthCheck
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from torch import nn

import vcon_kernels as vk
from vcon_kernels.reference import ReferenceVCON

SETTINGS = dict(
    deadline=None,
    derandomize=not os.environ.get("VCON_HYPOTHESIS_RANDOM"),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    database=None,
)
EXAMPLES = int(os.environ.get("VCON_HYPOTHESIS_EXAMPLES", "0"))


def examples(default: int) -> int:
    return EXAMPLES or default


def native_backends():
    """Backends that run natively on CPU here (Triton interpreted on CPU is far too slow for this)."""
    names = [name for name, ok in vk.backends.available().items() if ok is True]
    return [n for n in names if n != "triton" or torch.cuda.is_available()]


BACKENDS = native_backends()
DTYPES = [torch.float64, torch.float32, torch.bfloat16]
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-5, atol=3e-5)}
BF16_SQNR_DB = 30.0  # bf16 has 8 mantissa bits (~48 dB per rounding); two roundings apart, small K
BF16_CANCEL_ATOL = 1e-4


# -- strategies --------------------------------------------------------------------------------------
@st.composite
def prune_configs(draw, grad, unit):
    """(config, K multiple) for a Prune stage; ``unit`` is what K must be a multiple of so far."""
    granularity = draw(st.sampled_from(["layer", "row", "nm"]))
    update = draw(st.sampled_from(["step", "once", 2]))
    if granularity == "nm":
        m = draw(st.sampled_from([2, 4, 8]))
        n = draw(st.integers(1, m - 1))
        return vk.Prune(granularity="nm", n=n, m=m, update=update, grad=grad), m
    sparsity = draw(st.floats(0.0, 0.95))
    return vk.Prune(sparsity=sparsity, granularity=granularity, update=update, grad=grad), 1


@st.composite
def quant_configs(draw, grad):
    bits = draw(st.sampled_from([1, 2, 4, 8]))
    granularity = draw(st.sampled_from(["channel", "group", "tensor"]))
    group_size = draw(st.integers(1, 8)) if granularity == "group" else None
    unit = group_size if granularity == "group" else 1
    return vk.Quantize(bits=bits, granularity=granularity, group_size=group_size, grad=grad), unit


def draw_weight_config(draw, kind: str, grad: str):
    """(config, unit) for a weight-transform kind; unit: what the input dim must be a multiple of.

    Low rank returns (None, 1): its rank depends on the shape, drawn by the caller.
    """
    if kind == "prune":
        return draw(prune_configs(grad, 1))
    if kind == "quantize":
        return draw(quant_configs(grad))
    if kind == "compose":
        prune, u1 = draw(prune_configs(grad, 1))
        quant, u2 = draw(quant_configs(grad))
        return vk.Compose(prune, quant), u1 * u2 // math.gcd(u1, u2)
    return None, 1


@st.composite
def layer_setups(draw, max_k=48):
    """(config, N, K, betas per stage, dtype)."""
    grad = draw(st.sampled_from(["ste", "exact"]))
    kind = draw(st.sampled_from(["prune", "quantize", "compose", "lowrank"]))
    dtype = draw(st.sampled_from(DTYPES))
    n = draw(st.integers(1, 24))
    config, unit = draw_weight_config(draw, kind, grad)
    k = unit * draw(st.integers(1, max(1, max_k // unit)))
    if kind == "lowrank":
        config = vk.LowRank(rank=draw(st.integers(1, min(n, k))), grad=grad)
    beta = st.floats(0.0, 1.0)
    if kind == "compose":
        exact_blend = dtype == torch.float64
        betas = (draw(beta if exact_blend else st.sampled_from([0.0, 0.5, 1.0])), draw(beta))
    else:
        betas = (draw(beta),)
    return config, n, k, betas, dtype


def distinct_bf16(shape, gen):
    """bf16 values with pairwise distinct magnitudes (no pruning-threshold ties), random signs."""
    count = math.prod(shape)
    lo, hi = 0x3800, 0x3F80  # bf16 bit patterns of 2**-15 .. 1.0: 1920 distinct magnitudes
    assert count <= hi - lo, shape
    bits = (torch.randperm(hi - lo, generator=gen)[:count] + lo).to(torch.int16)
    mags = bits.view(torch.bfloat16).reshape(shape)
    signs = torch.randint(0, 2, shape, generator=gen).to(torch.bfloat16) * 2 - 1
    return mags * signs


def set_weights(layer, dtype, gen):
    with torch.no_grad():
        for p in layer.parameters():
            if dtype == torch.bfloat16:
                p.copy_(distinct_bf16(p.shape, gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64))
    layer.refresh_mask()  # a stored mask follows the new weights


def sqnr_db(ref, test):
    ref, test = ref.double(), test.double()
    noise = (ref - test).norm()
    if noise == 0:
        return math.inf
    return float(20 * torch.log10(ref.norm() / noise))


def compare(layer, x, dtype, backend, gen):
    """Output and every gradient of the fused layer vs ReferenceVCON on the same parameters.

    Every random tensor comes from ``gen``: drawing ``grad_out`` from the global RNG made an example
    depend on the tests that ran before it in the worker, and hypothesis replays flaky.
    """
    grad_out = torch.randn(*layer_out_shape(layer, x), generator=gen, dtype=torch.float64).to(dtype)
    results = []
    for module, ctx in ((layer, vk.backends.use(backend)), (ReferenceVCON(layer), vk.backends.use("torch"))):
        layer.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        with ctx:
            y = module(xi)
            y.backward(grad_out)
        grads = {"x": xi.grad, **{n: p.grad for n, p in layer.named_parameters()}}
        results.append((y.detach(), grads))
    (y, grads), (y_ref, grads_ref) = results
    assert y.dtype == dtype and y.shape == y_ref.shape
    check(y, y_ref, dtype, "output")
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        assert (grads[name] is None) == (grads_ref[name] is None), name
        if grads[name] is not None:
            check(grads[name], grads_ref[name], dtype, f"grad {name}")


def layer_out_shape(layer, x):
    with torch.no_grad(), vk.backends.use("torch"):
        return layer(x).shape


def check(got, want, dtype, what):
    if dtype == torch.bfloat16:
        # SQNR is relative to the result: a gradient that cancels to ~1e-7 from O(1) terms (low rank,
        # beta ~0.2) has a bf16 rounding error far above itself yet tiny against its terms. Such a
        # result passes on an absolute error below BF16_CANCEL_ATOL (terms here are at most O(1)).
        if want.numel() and want.abs().max() > 0 and (got.double() - want.double()).abs().max() > BF16_CANCEL_ATOL:
            assert sqnr_db(want, got) >= BF16_SQNR_DB, f"{what}: SQNR {sqnr_db(want, got):.1f} dB"
        assert torch.isfinite(got).all(), what
    else:
        torch.testing.assert_close(got, want, **TOL[dtype], msg=lambda m: f"{what}: {m}")


# -- properties ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(60), **SETTINGS)
@given(setup=layer_setups(), batch=st.lists(st.integers(0, 5), min_size=1, max_size=2), seed=st.integers(0, 2**16))
def test_linear_matches_reference(backend, setup, batch, seed):
    config, n, k, betas, dtype = setup
    gen = torch.Generator().manual_seed(seed)
    layer = vk.VCONLinear(k, n, bias=bool(seed % 2), config=config, dtype=dtype)
    set_weights(layer, dtype, gen)
    for stage, beta in zip(layer.stage_names, betas):
        layer.set_beta(beta, stage)
    x = torch.randn(*batch, k, generator=gen, dtype=torch.float64).to(dtype)
    compare(layer, x, dtype, backend, gen)


@st.composite
def conv_setups(draw):
    """(config, conv kwargs, input shape, betas, dtype); K = in_channels / groups * kh * kw fits the config."""
    grad = draw(st.sampled_from(["ste", "exact"]))
    kind = draw(st.sampled_from(["prune", "quantize", "compose", "lowrank"]))
    dtype = draw(st.sampled_from([torch.float64, torch.float32]))
    groups = 1 if kind == "lowrank" else draw(st.sampled_from([1, 2]))
    kh, kw = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    config, unit = draw_weight_config(draw, kind, grad)
    # in_channels / groups * kh * kw must be a multiple of unit: scale the per-group channels.
    per_group = draw(st.integers(1, 3)) * (unit // math.gcd(unit, kh * kw))
    in_ch = per_group * groups
    out_ch = groups * draw(st.integers(1, 4))
    if kind == "lowrank":
        config = vk.LowRank(rank=draw(st.integers(1, min(out_ch, per_group * kh * kw))), grad=grad)
    conv = dict(stride=draw(st.integers(1, 2)), padding=draw(st.integers(0, 2)), dilation=draw(st.integers(1, 2)),
                groups=groups, padding_mode=draw(st.sampled_from(["zeros", "zeros", "reflect"])))
    if conv["padding_mode"] == "reflect" and conv["padding"] == 0:
        conv["padding_mode"] = "zeros"
    h = draw(st.integers(max(kh, conv["padding"] + 1) + (kh - 1) * (conv["dilation"] - 1), 7))
    w = draw(st.integers(max(kw, conv["padding"] + 1) + (kw - 1) * (conv["dilation"] - 1), 7))
    x_shape = (draw(st.integers(0, 3)), in_ch, h, w)
    beta = st.floats(0.0, 1.0)
    if kind == "compose":
        betas = (draw(beta if dtype == torch.float64 else st.sampled_from([0.0, 0.5, 1.0])), draw(beta))
    else:
        betas = (draw(beta),)
    return config, (in_ch, out_ch, (kh, kw)), conv, x_shape, betas, dtype


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=examples(30), **SETTINGS)
@given(setup=conv_setups(), seed=st.integers(0, 2**16))
def test_conv_matches_reference(backend, setup, seed):
    config, (in_ch, out_ch, kernel), conv, x_shape, betas, dtype = setup
    gen = torch.Generator().manual_seed(seed)
    dense = nn.Conv2d(in_ch, out_ch, kernel, bias=bool(seed % 2), dtype=dtype, **conv)
    layer = vk.VCONConv2d.from_conv2d(dense, config)
    set_weights(layer, dtype, gen)
    for stage, beta in zip(layer.stage_names, betas):
        layer.set_beta(beta, stage)
    x = torch.randn(*x_shape, generator=gen, dtype=torch.float64).to(dtype)
    compare(layer, x, dtype, backend, gen)


@settings(max_examples=examples(40), **SETTINGS)
@given(setup=layer_setups(max_k=32), seed=st.integers(0, 2**16))
def test_beta_endpoints(setup, seed):
    """beta = 1 is the dense layer bit for bit; beta = 0 equals the finalized module (bit for bit in fp64)."""
    config, n, k, _, dtype = setup
    gen = torch.Generator().manual_seed(seed)
    layer = vk.VCONLinear(k, n, config=config, dtype=dtype)
    set_weights(layer, dtype, gen)
    x = torch.randn(3, k, generator=gen, dtype=torch.float64).to(dtype)
    with torch.no_grad():
        layer.set_beta(1.0)
        assert torch.equal(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
        layer.set_beta(0.0)
        y0 = layer(x)
        final = vk.finalize(nn.Sequential(layer))[0]
        y_final = final(x)
    if dtype == torch.float64:
        assert torch.equal(y_final, y0)
    else:
        check(y_final, y0, dtype if dtype == torch.bfloat16 else torch.float32, "finalized")


@pytest.mark.parametrize("backend", BACKENDS)
def test_lowrank_bf16_cancellation_case_is_stable(backend):
    """The example that failed only after other tests (issue: order-dependent property test).

    LowRank(rank=1), bf16, N = K = 1, one row, beta 0.21: dx = b dY W + (1 - b) dY U V cancels to
    ~1e-7, so any difference in beta (the C++ path rounded it to bf16) or in grad_out (drawn from
    the global RNG) shows. Both fixed: the result must not depend on the global RNG state.
    """
    grads_x = []
    for global_seed in (0, 1, 12345):
        torch.manual_seed(global_seed)
        gen = torch.Generator().manual_seed(0)
        layer = vk.VCONLinear(1, 1, bias=False, config=vk.LowRank(rank=1), dtype=torch.bfloat16)
        set_weights(layer, torch.bfloat16, gen)
        layer.set_beta(0.2103633161979222)
        x = torch.randn(1, 1, generator=gen, dtype=torch.float64).to(torch.bfloat16)
        compare(layer, x, torch.bfloat16, backend, gen)
        xi = x.clone().requires_grad_(True)
        with vk.backends.use(backend):
            layer(xi).backward(torch.ones(1, 1, dtype=torch.bfloat16))
        grads_x.append(xi.grad)
    assert all(torch.equal(g, grads_x[0]) for g in grads_x), grads_x
