"""VCON layers under torch.autocast (CPU bf16): every mode, STE and exact, torch and C++ backends.

What must hold (as for nn.Linear under autocast, and better):
* the output has the autocast dtype, parameters stay fp32 and get fp32 gradients;
* forward and every gradient are close to the fp32 computation (SQNR, torchao style);
* at beta = 1 the layer is nn.Linear under the same autocast, bit for bit;
* nothing weight-sized is saved for backward (no bf16 copy of W kept alive);
* torch.compile(fullgraph=True) under autocast: same results, no recompile when beta changes;
* opcheck of the layer ops on bf16 activations with fp32 weights (fake == real).
"""

import pytest
import torch
from cases import LINEAR_CASES
from cases import make_linear
from cases import set_betas
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import vcon_kernels as vk

CASES = sorted(LINEAR_CASES)
BACKENDS = ["torch", "cpp"]
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


def sqnr_db(ref, test):
    ref, test = ref.detach().double(), test.detach().double()
    return float(20 * torch.log10(ref.norm() / (ref - test).norm().clamp_min(1e-30)))


def _params(layer):
    return {n: p for n, p in layer.named_parameters()}


def _step(layer, x, grad_out, autocast: bool, owner=None):
    """Output and gradients of ``layer(x)``; ``owner``: the module whose parameters to read (compiled)."""
    owner = layer if owner is None else owner
    owner.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    with torch.autocast(**BF16, enabled=autocast):
        y = layer(x)
    y.backward(grad_out.to(y.dtype))
    grads = {"x": x.grad, **{n: p.grad for n, p in _params(owner).items()}}
    return y.detach(), grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("grad", ["ste", "exact"])
@pytest.mark.parametrize("case", CASES)
def test_close_to_fp32_reference(case, grad, backend):
    layer = make_linear(case, grad, out_features=48)
    set_betas(layer, 0.4, 0.7)
    torch.manual_seed(1)
    x = torch.randn(24, layer.in_features)
    grad_out = torch.randn(24, layer.out_features)
    with vk.backends.use(backend):
        y_ref, g_ref = _step(layer, x, grad_out, autocast=False)
        y, g = _step(layer, x, grad_out, autocast=True)
    assert y.dtype == torch.bfloat16
    assert sqnr_db(y_ref, y) >= 25, sqnr_db(y_ref, y)
    for name, p in _params(layer).items():
        assert p.dtype == torch.float32 and g[name].dtype == torch.float32, name
    assert g["x"].dtype == torch.float32  # x was fp32: its gradient comes back through the cast
    for name, ref in g_ref.items():
        if ref is None or not ref.abs().sum():  # e.g. dU = 0 at beta = 1
            continue
        assert sqnr_db(ref, g[name]) >= 20, (name, sqnr_db(ref, g[name]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_beta_one_is_nn_linear_under_autocast(case, backend):
    layer = make_linear(case, out_features=40)
    dense = nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        dense.weight.copy_(layer.weight)
        dense.bias.copy_(layer.bias)
    x = torch.randn(16, layer.in_features)
    grad_out = torch.randn(16, layer.out_features)
    with vk.backends.use(backend):
        y, g = _step(layer, x, grad_out, autocast=True)
    y_d, g_d = _step(dense, x, grad_out, autocast=True)
    assert y.dtype == y_d.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_d, rtol=0, atol=0)
    for name in ("x", "weight", "bias"):
        torch.testing.assert_close(g[name], g_d[name], rtol=0, atol=0, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_input_accepted_under_autocast_only(backend):
    layer = vk.VCONLinear.from_linear(nn.Linear(16, 8), vk.Quantize(bits=8))
    x = torch.randn(4, 16, dtype=torch.bfloat16)
    with vk.backends.use(backend):
        with torch.autocast(**BF16):
            assert layer(x).dtype == torch.bfloat16
        with pytest.raises(TypeError, match="does not match the weight dtype.*torch.autocast"):
            layer(x)


def test_issue_example_mlp_trains_under_autocast():
    mlp = vk.convert(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)), vk.Quantize(bits=8))
    with torch.autocast(**BF16):
        out = mlp(torch.randn(2, 16))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in mlp.parameters())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES)
def test_no_weight_sized_copy_saved_under_autocast(case, backend):
    layer = make_linear(case, out_features=64)
    set_betas(layer, 0.5)
    x = torch.randn(8, layer.in_features, requires_grad=True)
    saved = []
    with vk.backends.use(backend), torch.autocast(**BF16):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = layer(x)
    params = {id(t) for t in (layer.weight, layer.bias, getattr(layer, "lowrank_u", None),
                              getattr(layer, "lowrank_v", None), layer.mask)}
    # The only activation-sized tensor is the bf16 cast of x (what nn.Linear saves too).
    big = [t for t in saved if id(t) not in params and t.numel() >= layer.weight.numel() // 4
           and not (t.shape == x.shape and t.dtype == torch.bfloat16)]
    assert not big, [(tuple(t.shape), t.dtype) for t in big]
    with vk.backends.use(backend):
        y.float().sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["prune_layer", "int8_channel", "binary_channel", "nm_int8_group"])
def test_conv_under_autocast(case, backend):
    factory, _ = LINEAR_CASES[case]
    torch.manual_seed(0)
    conv = vk.VCONConv2d.from_conv2d(nn.Conv2d(4, 8, 3, padding=1), factory("exact")) if case != "nm_int8_group" \
        else vk.VCONConv2d.from_conv2d(nn.Conv2d(4, 8, (13, 1), padding=(6, 0)), factory("exact"))
    set_betas(conv, 0.3, 0.6)
    x = torch.randn(2, 4, 9, 9)
    with vk.backends.use(backend):
        y_ref = conv(x)
        grad_out = torch.randn_like(y_ref)
        conv.zero_grad()
        xr = x.clone().requires_grad_(True)
        conv(xr).backward(grad_out)
        ref = {"x": xr.grad, "weight": conv.weight.grad.clone()}
        conv.zero_grad()
        xa = x.clone().requires_grad_(True)
        with torch.autocast(**BF16):
            y = conv(xa)
        y.backward(grad_out.bfloat16())
    assert y.dtype == torch.bfloat16 and conv.weight.grad.dtype == torch.float32
    assert sqnr_db(y_ref, y) >= 25
    assert sqnr_db(ref["x"], xa.grad) >= 20 and sqnr_db(ref["weight"], conv.weight.grad) >= 20


@pytest.mark.parametrize("case", ["prune_layer", "int4_group", "lowrank", "prune_int4"])
def test_compile_under_autocast_no_recompile(case):
    torch._dynamo.reset()
    layer = make_linear(case, "exact", out_features=32)
    counter = CompileCounterWithBackend("aot_eager")
    comp = torch.compile(layer, backend=counter, fullgraph=True)
    x = torch.randn(6, layer.in_features)
    grad_out = torch.randn(6, layer.out_features)
    try:
        with torch._dynamo.config.patch(error_on_recompile=True):
            for beta in (1.0, 0.6, 0.0):
                set_betas(layer, beta)
                y_e, g_e = _step(layer, x, grad_out, autocast=True)
                y_c, g_c = _step(comp, x, grad_out, autocast=True, owner=layer)
                assert y_c.dtype == torch.bfloat16
                torch.testing.assert_close(y_c, y_e, rtol=0, atol=0)
                for name, g in g_e.items():
                    if g is not None:
                        torch.testing.assert_close(g_c[name], g, rtol=0, atol=0)
        assert counter.frame_count == 1
    finally:
        torch._dynamo.reset()


@pytest.mark.parametrize("case", ["prune_layer", "int8_channel", "lowrank", "nm_int8_group"])
def test_opcheck_mixed_precision(case):
    from test_opcheck import linear_args
    from test_opcheck import needs_for

    layer = make_linear(case, "exact")
    set_betas(layer, 0.4, 0.7)
    x = torch.randn(5, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    args, spec = linear_args(layer, x, layer.weight.detach().requires_grad_(True))
    torch.library.opcheck(torch.ops.vcon.linear.default, (*args, *spec.as_args(), True))
    grad_out = torch.randn(5, layer.out_features, dtype=torch.bfloat16)
    detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    t = torch.ops.vcon.linear(*detached, *spec.as_args(), True)[1]
    torch.library.opcheck(torch.ops.vcon.linear_backward.default,
                          (grad_out, *detached, *spec.as_args(), needs_for(spec), t if spec.lowrank else None),
                          test_utils=("test_schema", "test_faketensor"))
    with torch.autocast(**BF16):  # the autocast kernel casts only x
        xf = torch.randn(5, layer.in_features)
        y, t = torch.ops.vcon.linear(xf, *args[1:], *spec.as_args(), True)
    assert y.dtype == torch.bfloat16
    assert t.dtype == torch.bfloat16 and t.shape == ((5, layer.lowrank_u.shape[1]) if spec.lowrank else (0,))
