"""VCONLinear (plain-torch backend) against the naive two-pass reference, every mode."""

import pytest
import torch
from cases import LINEAR_CASES
from cases import make_linear
from cases import run_fwd_bwd
from cases import set_betas

import vcon_kernels as vk
from vcon_kernels.reference import ReferenceVCON

CASES = sorted(LINEAR_CASES)
TOL = {torch.float32: dict(atol=2e-5, rtol=1e-5), torch.float64: dict(atol=1e-11, rtol=1e-11)}


def sqnr_db(ref, test):
    return float(20 * torch.log10(ref.norm() / (ref - test).norm().clamp_min(1e-30)))


@pytest.fixture(autouse=True)
def torch_backend():
    with vk.backends.use("torch"):
        yield


def _compare(layer, x, atol, rtol):
    grad_out = torch.randn(*x.shape[:-1], layer.out_features, dtype=x.dtype)
    y, grads = run_fwd_bwd(layer, layer, x, grad_out)
    y_ref, grads_ref = run_fwd_bwd(ReferenceVCON(layer), layer, x, grad_out)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    for name, g in grads.items():
        if g is None:
            assert grads_ref[name] is None, name
            continue
        torch.testing.assert_close(g, grads_ref[name], atol=atol, rtol=rtol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("grad", ["ste", "exact"])
@pytest.mark.parametrize("case", CASES)
def test_matches_reference(case, grad, beta, dtype):
    layer = make_linear(case, grad, dtype)
    set_betas(layer, beta)
    torch.manual_seed(1)
    x = torch.randn(2, 3, layer.in_features, dtype=dtype)
    _compare(layer, x, **TOL[dtype])


@pytest.mark.parametrize("grad", ["ste", "exact"])
@pytest.mark.parametrize("case", ["prune_int4", "nm_int8_group", "prune_binary"])
def test_compose_stages_have_their_own_beta(case, grad):
    layer = make_linear(case, grad, torch.float64)
    set_betas(layer, 0.3, 0.8)
    assert layer.beta.tolist() == pytest.approx([0.3, 0.8])
    x = torch.randn(5, layer.in_features, dtype=torch.float64)
    _compare(layer, x, **TOL[torch.float64])


@pytest.mark.parametrize("case", CASES)
def test_beta_one_is_nn_linear_bit_exact(case):
    layer = make_linear(case)
    dense = torch.nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        dense.weight.copy_(layer.weight)
        dense.bias.copy_(layer.bias)
    x = torch.randn(4, 7, layer.in_features)
    assert torch.equal(layer(x), dense(x))


def test_ste_and_exact_agree_only_at_beta_one():
    ste, exact = make_linear("prune_layer", "ste"), make_linear("prune_layer", "exact")
    x, g = torch.randn(6, 53), torch.randn(6, 37)
    for beta, same in [(1.0, True), (0.5, False)]:
        set_betas(ste, beta)
        set_betas(exact, beta)
        _, g_ste = run_fwd_bwd(ste, ste, x, g)
        _, g_exact = run_fwd_bwd(exact, exact, x, g)
        assert torch.allclose(g_ste["weight"], g_exact["weight"]) == same
        torch.testing.assert_close(g_ste["x"], g_exact["x"])


def test_exact_prune_gradient_formula():
    """dW = (beta + (1 - beta) M) * dY^T X, written out."""
    layer = make_linear("prune_row", "exact", torch.float64)
    set_betas(layer, 0.25)
    x, g = torch.randn(9, 53, dtype=torch.float64), torch.randn(9, 37, dtype=torch.float64)
    _, grads = run_fwd_bwd(layer, layer, x, g)
    a = layer.weight.detach().abs()
    k = round(53 * 0.7)
    keep = a >= a.topk(k, dim=1).values[:, -1:]
    expected = (0.25 + 0.75 * keep.double()) * (g.t() @ x)
    torch.testing.assert_close(grads["weight"], expected)


@pytest.mark.parametrize("case", ["prune_layer", "prune_row", "prune_nm", "prune_once", "lowrank"])
def test_gradcheck_exact_mode(case):
    layer = make_linear(case, "exact", torch.float64, out_features=6)
    set_betas(layer, 0.4)
    x = torch.randn(3, layer.in_features, dtype=torch.float64, requires_grad=True)
    params = [p for p in (layer.weight, layer.bias, getattr(layer, "lowrank_u", None),
                          getattr(layer, "lowrank_v", None)) if p is not None]

    # Mask and threshold are piecewise constant in W: the finite differences stay inside one piece.
    def fn(x, weight, bias, *factors):
        state = vk.VCONState(layer.mask, *(factors or (None, None)))
        return vk.functional.vcon_linear(x, weight, bias, layer.beta, layer.config, state)

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-7)


@pytest.mark.parametrize("case", ["int8_channel", "int4_group", "binary_tensor", "prune_int4"])
def test_gradcheck_input_and_bias_quant(case):
    """Q(W) is piecewise constant in W, so only x and b are finite-difference checked."""
    layer = make_linear(case, "exact", torch.float64, out_features=5)
    set_betas(layer, 0.4)
    x = torch.randn(3, layer.in_features, dtype=torch.float64, requires_grad=True)
    b = layer.bias.detach().clone().requires_grad_(True)
    w = layer.weight.detach()
    assert torch.autograd.gradcheck(
        lambda x, b: vk.functional.vcon_linear(x, w, b, layer.beta, layer.config, layer.state), (x, b))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES)
def test_half_precision_close_to_fp32(case, dtype):
    layer = make_linear(case, "ste", dtype)
    set_betas(layer, 0.37)
    ref = make_linear(case, "ste", torch.float32)
    with torch.no_grad():
        for p_ref, p in zip(ref.parameters(), layer.parameters()):
            p_ref.copy_(p.float())
    if layer.mask is not None:
        ref.mask.copy_(layer.mask)
    set_betas(ref, 0.37)
    x = torch.randn(4, layer.in_features)
    y = layer(x.to(dtype))
    # Against the fp32 layer on the same (exactly representable) values, not the topk-based
    # reference: half-precision weights have ties at the threshold, which the layer keeps.
    y_ref = ref(x.to(dtype).float()).detach()
    # Half-precision operands and outputs: judged by SQNR (as torchao does), since single
    # elements can lose several ulps in CPU half GEMMs. bf16 has 8 mantissa bits, fp16 11.
    assert sqnr_db(y_ref, y.detach().float()) >= (35 if dtype == torch.bfloat16 else 50)
    y.float().sum().backward()
    assert layer.weight.grad.dtype == dtype and torch.isfinite(layer.weight.grad.float()).all()


@pytest.mark.parametrize("case", CASES)
def test_no_weight_sized_copy_saved_for_backward(case):
    """Only x, the parameters and the tiny state survive between forward and backward."""
    layer = make_linear(case, out_features=64)
    set_betas(layer, 0.5)
    x = torch.randn(8, layer.in_features, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    allowed = {id(t) for t in (x, layer.weight, layer.bias, getattr(layer, "lowrank_u", None),
                               getattr(layer, "lowrank_v", None), layer.mask)}
    big = [t for t in saved if id(t) not in allowed and t.numel() >= layer.weight.numel() // 4]
    assert not big, [tuple(t.shape) for t in big]
    y.sum().backward()


@pytest.mark.parametrize("case", ["prune_layer", "int4_group", "lowrank"])
def test_partial_requires_grad(case):
    layer = make_linear(case)
    set_betas(layer, 0.5)
    layer.weight.requires_grad_(False)
    x = torch.randn(3, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is None and layer.bias.grad is not None
    x2 = torch.randn(3, layer.in_features)
    layer.weight.requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    layer(x2).sum().backward()
    assert layer.weight.grad is not None


@pytest.mark.parametrize("case", ["prune_layer", "int8_channel", "lowrank"])
def test_empty_batch(case):
    layer = make_linear(case)
    set_betas(layer, 0.5)
    x = torch.randn(0, layer.in_features, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, layer.out_features)
    y.sum().backward()
    assert torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))


def test_functional_beta_float_and_errors():
    layer = make_linear("prune_layer")
    x = torch.randn(2, 53)
    y = vk.functional.vcon_linear(x, layer.weight, layer.bias, 0.5, layer.config)
    set_betas(layer, 0.5)
    assert torch.equal(y, layer(x))
    with pytest.raises(ValueError, match="beta must be in"):
        vk.functional.vcon_linear(x, layer.weight, layer.bias, 1.5, layer.config)
    with pytest.raises(TypeError, match="input dtype"):
        layer(x.double())
    with pytest.raises(TypeError, match="input dtype must be"):
        layer(torch.ones(2, 53, dtype=torch.int64))
    with pytest.raises(ValueError, match="last dimension must be 53"):
        layer(torch.randn(2, 52))
    with pytest.raises(ValueError, match="LowRank config needs"):
        vk.functional.vcon_linear(x, layer.weight, layer.bias, 0.5, vk.LowRank(rank=2))
