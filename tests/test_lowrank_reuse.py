"""Low rank keeps the forward's t' = (1 - beta) x V^T for dU = dY^T t' (issue 12).

The forward computes t' anyway (Triton: the thin GEMM feeding the fused one; torch and the C++
activation-space form: x V^T), so the backward takes it instead of running x V^T again. What
must hold, on every backend (torch, cpp, triton interpreted):

* the kept t' is bit for bit the backward's own recompute, so gradients with and without it
  are identical; the forward's y does not change when t' is kept;
* every backend keeps the same quantity (torch and cpp: identical bits), so a backward on
  another backend than its forward still computes dU correctly;
* gradients match the float64 two-pass reference (fp32 / bf16 / fp16, autocast, odd shapes,
  frozen x / W / U / V);
* the backward really skips x V^T when t' was kept, and t' is saved only when U trains;
* the ops pass opcheck (tests/test_opcheck.py) and compile (eager == compiled, bit for bit).
"""

import pytest
import torch
from torch.profiler import ProfilerActivity
from torch.profiler import profile

import vcon_kernels as vk
from vcon_kernels import library
from vcon_kernels.backends.torch_backend import TorchBackend
from vcon_kernels.functional import _prepare
from vcon_kernels.reference import ReferenceVCON

BACKENDS = ["torch", "cpp", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
K, N, R = 53, 37, 5  # odd sizes; R appears in no other dimension (the saved-tensor checks rely on it)
SMALL_M, LARGE_M = 7, 45  # the C++ backend's activation-space and weight-space regimes (N K vs M (N + K))
NEEDS = {  # (x, W, b, U/V): full training, frozen W, frozen input, factors only
    "all": (True, True, True, True),
    "frozen_w": (True, False, True, True),
    "frozen_x": (False, True, True, True),
    "factors_only": (False, False, False, True),
}
TOL = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}


def _layer(beta, dtype=torch.float32, grad="ste", k=K, n=N, rank=R):
    torch.manual_seed(0)
    layer = vk.VCONLinear(k, n, config=vk.LowRank(rank=rank, grad=grad)).to(dtype)
    layer.set_beta(beta)
    return layer


def _op_args(layer):
    shape2d = (layer.weight.shape[0], layer.weight[0].numel())
    spec, beta, threshold, scales, state = _prepare(shape2d, layer.weight, layer.beta, layer.config, layer.state)
    w, b, u, v = (t.detach() for t in (layer.weight, layer.bias, state.lowrank_u, state.lowrank_v))
    return w, b, beta, threshold, scales, u, v, spec


# -- the kept t' against the backward's recompute, per backend --------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("m", [SMALL_M, LARGE_M])
def test_kept_t_gives_the_recomputing_gradients_bit_for_bit(backend, dtype, beta, m):
    be = vk.backends.get(backend)
    w, b, beta_t, thr, scales, u, v, spec = _op_args(_layer(beta, dtype))
    torch.manual_seed(1)
    x, g = torch.randn(m, K, dtype=dtype), torch.randn(m, N, dtype=dtype)
    y, t = be.linear_forward(x, w, b, beta_t, thr, scales, None, u, v, spec, keep_t=True)
    assert torch.equal(y, be.linear_forward(x, w, b, beta_t, thr, scales, None, u, v, spec))  # y unchanged
    assert t.shape == (m, R) and t.dtype == dtype
    want = (1 - beta) * (x.double() @ v.double().t())
    torch.testing.assert_close(t.double(), want, rtol=TOL[dtype], atol=TOL[dtype] * 4)
    for name, needs in NEEDS.items():
        kept = be.linear_backward(g, x, w, b, beta_t, thr, scales, None, u, v, spec, needs, t)
        recomputed = be.linear_backward(g, x, w, b, beta_t, thr, scales, None, u, v, spec, needs)
        for i, (got, ref) in enumerate(zip(kept, recomputed)):
            assert (got is None) == (ref is None), (name, i)
            assert got is None or torch.equal(got, ref), (name, i)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
@pytest.mark.parametrize("m", [SMALL_M, LARGE_M])
def test_torch_and_cpp_keep_the_same_t(dtype, beta, m):
    """One meaning of t' on every backend: a backward may run on another backend than its forward."""
    w, b, beta_t, thr, scales, u, v, spec = _op_args(_layer(beta, dtype))
    x = torch.randn(m, K, dtype=dtype)
    kept = {name: vk.backends.get(name).linear_forward(x, w, b, beta_t, thr, scales, None, u, v, spec, keep_t=True)[1]
            for name in BACKENDS}
    assert torch.equal(kept["torch"], kept["cpp"])
    # Triton scales in fp32 before its one rounding (the fused GEMM's operand): within one rounding.
    torch.testing.assert_close(kept["triton"].double(), kept["torch"].double(), rtol=TOL[dtype], atol=TOL[dtype])


# -- gradients against the float64 two-pass reference ---------------------------------------------
def _freeze(layer, frozen):
    for name in frozen:
        if name != "x":  # the input's requires_grad is set where it is made
            getattr(layer, name).requires_grad_(False)


def _grads(layer, x, frozen=()):
    _freeze(layer, frozen)
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_("x" not in frozen)
    y = layer(x)
    torch.manual_seed(2)
    g = torch.randn(y.shape, dtype=torch.float64).to(y.dtype)
    y.backward(g)
    grads = [x.grad] + [getattr(layer, p).grad for p in ("weight", "bias", "lowrank_u", "lowrank_v")]
    return [None if t is None else t.clone() for t in grads], g  # copies: a later backward accumulates


def _reference_grads(layer, x, g, frozen, beta):
    ref = _layer(beta, torch.float64, grad=layer.config.grad)
    ref.load_state_dict({k: t.double() for k, t in layer.state_dict().items()})
    _freeze(ref, frozen)
    x = x.detach().double().requires_grad_("x" not in frozen)
    ReferenceVCON(ref)(x).backward(g.double())
    return [x.grad] + [getattr(ref, p).grad for p in ("weight", "bias", "lowrank_u", "lowrank_v")]


FROZEN = {"none": (), "u": ("lowrank_u",), "v": ("lowrank_v",), "w": ("weight",), "x": ("x",),
          "uv": ("lowrank_u", "lowrank_v")}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("frozen", sorted(FROZEN))
@pytest.mark.parametrize("grad", ["ste", "exact"])
def test_gradients_match_the_reference(backend, dtype, frozen, grad):
    beta = 0.35
    layer = _layer(beta, dtype, grad)
    x = torch.randn(3, 4, K, dtype=dtype)  # 3-D input: 12 tokens
    with vk.backends.use(backend):
        got, g = _grads(layer, x, FROZEN[frozen])
    want = _reference_grads(layer, x, g, FROZEN[frozen], beta)
    for name, a, b in zip(("x", "weight", "bias", "u", "v"), got, want):
        assert (a is None) == (b is None), name
        if a is not None:
            scale = b.abs().max().item() + 1
            torch.testing.assert_close(a.double(), b, rtol=TOL[dtype], atol=TOL[dtype] * scale, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_autocast_gradients_match_the_reference(backend, dtype):
    """fp32 master weights, low-precision activations: t' is kept in the activation dtype."""
    beta = 0.6
    layer = _layer(beta)
    x = torch.randn(9, K)
    saved = []
    with vk.backends.use(backend), torch.autocast("cpu", dtype=dtype):
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            got, g = _grads(layer, x)
    kept = [t for t in saved if t.shape == (9, R)]
    assert len(kept) == 1 and kept[0].dtype == dtype
    want = _reference_grads(layer, x.to(dtype).float(), g, (), beta)
    for name, a, b in zip(("x", "weight", "bias", "u", "v"), got, want):
        assert a.dtype == torch.float32, name  # fp32 leaves (x is cast by autocast inside the graph)
        torch.testing.assert_close(a.double(), b, rtol=TOL[dtype], atol=TOL[dtype] * (b.abs().max().item() + 1),
                                   msg=name)


# -- what is saved: t' only when U trains ------------------------------------------------------------
def _saved_shapes(layer, x, frozen, backend, op_path):
    saved = []
    _freeze(layer, frozen)
    x = x.detach().clone().requires_grad_("x" not in frozen)
    with vk.backends.use(backend), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t,
                                                                          lambda t: t):
        if op_path:  # the op (what torch.compile and tensor subclasses run)
            w, b, beta, thr, scales, _, _, spec = _op_args(layer)
            y = torch.ops.vcon.linear(x, layer.weight, layer.bias, beta, thr, scales, None, layer.lowrank_u,
                                      layer.lowrank_v, *spec.as_args(), library.keeps_t(spec, layer.lowrank_u))[0]
        else:
            y = layer(x)
    y.sum().backward()
    return [tuple(t.shape) for t in saved if t.data_ptr() != 0 and t.stride() != (0,) * t.dim()]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op_path", [False, True], ids=["eager", "op"])
@pytest.mark.parametrize("frozen", sorted(FROZEN))
def test_t_is_saved_only_when_u_trains(backend, op_path, frozen):
    m = SMALL_M  # activation space on the C++ backend: its eager node keeps t' there
    shapes = _saved_shapes(_layer(0.4), torch.randn(m, K), FROZEN[frozen], backend, op_path)
    u_trains = "lowrank_u" not in FROZEN[frozen]
    assert shapes.count((m, R)) == (1 if u_trains else 0), shapes
    weight_side = any(p not in FROZEN[frozen] for p in ("weight", "lowrank_u", "lowrank_v"))
    assert shapes.count((m, K)) == (1 if weight_side else 0), shapes  # x, as before: dW, dV need it


# -- the backward does not run x V^T again -------------------------------------------------------------
def _thin_gemms(fn, m):
    """How many x V^T products ``fn`` runs: aten::mm of (m, K) by (K, R), where F.linear, at::linear
    (C++) and torch.mm all end."""
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    return sum(event.name == "aten::mm" and [tuple(s) for s in event.input_shapes[:2]] == [(m, K), (K, R)]
               for event in prof.events())


def _forward_backward(layer, x, backend, compiled=False):
    with vk.backends.use(backend):
        y = (torch.compile(layer, backend="aot_eager", fullgraph=True) if compiled else layer)(x)

    def backward():
        # A compiled graph's backward op picks its backend when it runs (the forward's forced one is
        # not recorded in the graph): run it in the same scope.
        with vk.backends.use(backend):
            y.sum().backward()

    return backward


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("m", [SMALL_M, LARGE_M])
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_backward_runs_no_thin_gemm_when_t_was_kept(backend, m, compiled):
    torch._dynamo.reset()
    layer = _layer(0.4)
    x = torch.randn(m, K)
    assert _thin_gemms(_forward_backward(layer, x, backend, compiled), m) == 0
    # The counter sees the product where the backward does need it: U frozen, V trains, so t' was not
    # kept and dU (computed with dV) recomputes it (on cpp in its activation-space form only).
    layer.lowrank_u.requires_grad_(False)
    layer.weight.requires_grad_(False)  # frozen W: the C++ backward takes the activation-space form
    expected = 1
    assert _thin_gemms(_forward_backward(layer, x, backend, compiled), m) == expected


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_backward_never_calls_the_recompute(backend, compiled, monkeypatch):
    """The Python backends' recompute functions raise if the backward reaches them."""
    torch._dynamo.reset()
    from vcon_kernels.ops import linear_backward as triton_backward

    def refuse(*args):
        raise AssertionError("the backward recomputed x V^T")

    monkeypatch.setattr(TorchBackend, "lowrank_t", staticmethod(refuse))
    monkeypatch.setattr(triton_backward, "lowrank_t", refuse)
    layer = _layer(0.4)
    x = torch.randn(SMALL_M, K)
    _forward_backward(layer, x, backend, compiled)()
    assert layer.lowrank_u.grad is not None
    layer.lowrank_u.requires_grad_(False)  # t' not kept: the recompute is reached, the patch fires
    with pytest.raises(AssertionError, match="recomputed"):
        _forward_backward(layer, x, backend, compiled)()


# -- compile, cross-backend backward, conv2d -----------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_gradients_equal_eager(backend):
    torch._dynamo.reset()
    x = torch.randn(2, 5, K)
    eager, compiled = _layer(0.3), _layer(0.3)
    with vk.backends.use(backend):
        g_eager, g = _grads(eager, x)
        layer = torch.compile(compiled, backend="aot_eager", fullgraph=True)
        layer.zero_grad(set_to_none=True)
        xc = x.clone().requires_grad_(True)
        layer(xc).backward(g)
    g_comp = [xc.grad] + [getattr(compiled, p).grad for p in ("weight", "bias", "lowrank_u", "lowrank_v")]
    for a, b in zip(g_eager, g_comp):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backward_backend", ["torch", "triton"])
def test_backward_on_another_backend_reads_the_kept_t(backward_backend):
    """Forward on the default CPU backend (cpp), backward forced to another one: dU still right."""
    beta = 0.45
    layer = _layer(beta)
    w, b, beta_t, thr, scales, _, _, spec = _op_args(layer)
    x = torch.randn(SMALL_M, K, requires_grad=True)
    y, t = torch.ops.vcon.linear(x, layer.weight, layer.bias, beta_t, thr, scales, None, layer.lowrank_u,
                                 layer.lowrank_v, *spec.as_args(), True)
    assert t.shape == (SMALL_M, R)
    g = torch.randn(SMALL_M, N)
    with vk.backends.use(backward_backend):
        y.backward(g)
    want = _reference_grads(layer, x, g, (), beta)
    got = [x.grad, layer.weight.grad, layer.bias.grad, layer.lowrank_u.grad, layer.lowrank_v.grad]
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("frozen", ["none", "u"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_conv_keeps_t_and_matches_the_recompute(frozen, dtype):
    """conv2d: t = conv(x, V) kept when U trains; gradients bit-identical to the recomputing backward."""
    torch.manual_seed(0)
    conv = vk.VCONConv2d.from_conv2d(torch.nn.Conv2d(6, 9, 3, padding=1), vk.LowRank(rank=R)).to(dtype)
    conv.set_beta(0.3)
    x = torch.randn(2, 6, 7, 5, dtype=dtype)
    with vk.backends.use("torch"):
        got, g = _grads(conv, x, FROZEN[frozen])
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = conv(x.clone().requires_grad_(True))
        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            y.sum().backward()
    assert sum(tuple(s.shape) == (2, R, 7, 5) for s in saved) == (1 if frozen == "none" else 0)
    v_convs = sum(e.name == "aten::conv2d" and [tuple(s) for s in e.input_shapes[:2]] == [(2, 6, 7, 5), (R, 6, 3, 3)]
                  for e in prof.events())
    assert v_convs == (0 if frozen == "none" else 1)  # conv(x, V) runs again only when it was not kept
    be = vk.backends.get("torch")
    w, b, beta_t, thr, scales, _, _, spec = _op_args(conv)
    u, v = conv.lowrank_u.detach(), conv.lowrank_v.detach()
    conv_args = ([1, 1], [1, 1], [1, 1], 1)
    _, t = be.conv2d_forward(x, w, b, beta_t, thr, scales, None, u, v, spec, conv_args, keep_t=True)
    needs = (True, True, True, True)
    kept = be.conv2d_backward(g, x, w, b, beta_t, thr, scales, None, u, v, spec, conv_args, needs, t)
    recomputed = be.conv2d_backward(g, x, w, b, beta_t, thr, scales, None, u, v, spec, conv_args, needs)
    for a, b_ in zip(kept, recomputed):
        assert torch.equal(a, b_)
    want = _reference_conv_grads(conv, x, g, FROZEN[frozen])
    for a, b_ in zip(got, want):
        assert (a is None) == (b_ is None)
        if a is not None:
            torch.testing.assert_close(a.double(), b_, rtol=TOL[dtype], atol=TOL[dtype] * (b_.abs().max().item() + 1))


def _reference_conv_grads(conv, x, g, frozen):
    ref = vk.VCONConv2d.from_conv2d(torch.nn.Conv2d(6, 9, 3, padding=1), vk.LowRank(rank=R)).double()
    ref.load_state_dict({k: t.double() for k, t in conv.state_dict().items()})
    _freeze(ref, frozen)
    x = x.detach().double().requires_grad_("x" not in frozen)
    ReferenceVCON(ref)(x).backward(g.double())
    return [x.grad] + [getattr(ref, p).grad for p in ("weight", "bias", "lowrank_u", "lowrank_v")]
