"""torch.compile(fullgraph=True) of VCON models: same outputs and gradients as eager, no recompiles.

Every mode of ``cases.LINEAR_CASES`` (both gradient modes) as a linear layer, and as the convs
of a small conv model, is compiled with ``backend="aot_eager"``: Dynamo tracing, fake-tensor
propagation through the ``vcon::*`` ops and AOT autograd's joint graph, which is where
compile support breaks, at a fraction of inductor's compile time (~10-30 s per graph on the
CI CPU). A representative few run through inductor (marked slow). The scheduler writes beta
into a buffer, so stepping it, and refreshing an every-k-steps mask, must not recompile:
``CompileCounter.frame_count`` stays 1 and ``error_on_recompile`` is on.
"""

import copy
import shutil

import pytest
import torch
from cases import LINEAR_CASES
from cases import make_linear
from cases import set_betas
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

import vcon_kernels as vk

CASES = sorted(LINEAR_CASES)
# Beta sequences a compiled layer sees (second entry: the quantize stage of Compose layers).
BETAS = [(1.0, 1.0), (0.55, 0.9), (0.2, 0.4), (0.0, 0.0)]
HAS_CXX = shutil.which("g++") is not None or shutil.which("c++") is not None
needs_cxx = pytest.mark.skipif(not HAS_CXX, reason="inductor on CPU needs a C++ compiler")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        yield
    torch._dynamo.reset()


@pytest.fixture
def no_inductor_cache():
    """Compile for real: a cached artifact would hide a changed fake implementation of a vcon op."""
    with torch._inductor.config.patch(fx_graph_cache=False), \
            torch._functorch.config.patch(enable_autograd_cache=False):
        yield


def compiled(module, backend="aot_eager"):
    counter = CompileCounterWithBackend(backend)
    return torch.compile(module, backend=counter, fullgraph=True), counter


def grads(module, x):
    return {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}}


def step_both(eager, comp, eager_mod, comp_mod, x, grad_out):
    """Forward + backward through both; returns (eager y, compiled y, eager grads, compiled grads)."""
    out = []
    for fn, mod in ((eager, eager_mod), (comp, comp_mod)):
        mod.zero_grad(set_to_none=True)
        xi = x.detach().clone().requires_grad_(True)
        y = fn(xi)
        y.backward(grad_out)
        out.append((y.detach(), grads(mod, xi)))
    return out[0][0], out[1][0], out[0][1], out[1][1]


def assert_same(a, b, exact=True, what=""):
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


def assert_step_matches(eager, comp, twin, x, grad_out, exact=True, where=""):
    """One forward + backward through ``eager`` and the compiled ``twin``: same output, same gradients."""
    y, y_c, gr, gr_c = step_both(eager, comp, eager, twin, x, grad_out)
    assert_same(y_c, y, exact=exact, what=f"output{where}")
    # Low rank at beta 0: eager gives the stopped W no gradient (None), a compiled graph (no
    # beta-dependent branch) a zero one; an optimizer with weight decay treats them differently.
    for name in gr_c.keys() - gr.keys():
        assert name.endswith("weight") and not gr_c[name].any(), f"grad {name}{where} only in the compiled run"
    assert gr.keys() <= gr_c.keys()
    for name in gr:
        assert_same(gr_c[name], gr[name], exact=exact, what=f"grad {name}{where}")


@pytest.mark.parametrize("grad", ["ste", "exact"])
@pytest.mark.parametrize("case", CASES)
def test_linear_matches_eager_across_betas(case, grad):
    layer = make_linear(case, grad)
    twin = copy.deepcopy(layer)
    comp, counter = compiled(twin)
    torch.manual_seed(0)
    x = torch.randn(2, 3, layer.in_features)
    g = torch.randn(2, 3, layer.out_features)
    for beta, second in BETAS:
        set_betas(layer, beta, second)
        set_betas(twin, beta, second)
        assert_step_matches(layer, comp, twin, x, g, where=f" at beta={beta}")
    assert counter.frame_count == 1


def conv_model(case: str) -> nn.Module:
    """Two VCON convs (weights viewed as (out, 52): 13 channels x 2 x 2) and a dense head."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(13, 13, 2, padding=1), nn.ReLU(inplace=True),
        nn.Conv2d(13, 8, 2, padding=1, padding_mode="reflect"), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 5),
    )
    factory, _ = LINEAR_CASES[case]
    return vk.convert(model, factory("ste"), filter_fn=lambda module, name: isinstance(module, nn.Conv2d))


@pytest.mark.parametrize("case", CASES)
def test_conv_model_trains_like_eager(case):
    """Three SGD steps across the transition, scheduler stepped in between: identical losses and weights."""
    eager = conv_model(case)
    twin = copy.deepcopy(eager)
    comp, counter = compiled(twin)
    runs = []
    for fn, model in ((eager, eager), (comp, twin)):
        sched = vk.VCONScheduler(model, steps=2)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(1)
        losses = []
        for _ in range(3):
            x = torch.randn(3, 13, 5, 5, generator=gen)
            loss = fn(x).square().mean()
            loss.backward()
            opt.step()
            opt.zero_grad()
            sched.step()
            losses.append(loss.detach())
        runs.append((torch.stack(losses), model.state_dict()))
    (losses, state), (losses_c, state_c) = runs
    assert_same(losses_c, losses, what="losses")
    for key in state:
        assert_same(state_c[key], state[key], what=key)
    assert counter.frame_count == 1


def test_scheduler_steps_and_mask_refresh_do_not_recompile():
    """Beta through a whole schedule (past its end) and a mask refreshed every 2 steps: one frame."""
    model = nn.Sequential(nn.Linear(52, 16), nn.ReLU(), nn.Linear(16, 8))
    model = vk.convert(model, vk.Compose(vk.Prune(granularity="nm", update=2), vk.Quantize(bits=4)))
    sched = vk.VCONScheduler(model, steps={"prune": 3, "quantize": (2, 5)}, schedule="cosine")
    comp, counter = compiled(model)
    x = torch.randn(4, 52)
    masks = set()
    for _ in range(8):
        comp(x).sum().backward()
        with torch.no_grad():
            model[0].weight.add_(torch.randn_like(model[0].weight) * 0.1)  # moves the refreshed mask
        sched.step()
        masks.add(bytes(model[0].mask.flatten().tolist()))
    assert sched.finished and len(masks) > 1
    assert counter.frame_count == 1


def test_functional_with_tensor_beta_does_not_recompile():
    """The functional API: pass beta as a tensor (a Python float is specialized by Dynamo)."""
    w = torch.randn(8, 16, requires_grad=True)
    cfg = vk.Prune(sparsity=0.5)
    comp, counter = compiled(lambda x, beta: vk.functional.vcon_linear(x, w, None, beta, cfg))
    x = torch.randn(4, 16)
    for beta in (0.9, 0.5, 0.0):
        y = comp(x, torch.tensor(beta))
        assert torch.equal(y, vk.functional.vcon_linear(x, w, None, beta, cfg))
    assert counter.frame_count == 1


@pytest.mark.parametrize("case", CASES)
def test_finalized_model_compiles(case):
    """A finalized model (compressed storage, dequantized on the fly) compiles, also with input grads."""
    layer = make_linear(case)
    set_betas(layer, 0.0)
    model = vk.finalize(nn.Sequential(nn.Linear(6, layer.in_features), nn.ReLU(), layer))
    torch._dynamo.config.error_on_recompile = False  # no_grad and grad-enabled calls are two graphs
    comp, counter = compiled(model)
    x = torch.randn(5, 6)
    with torch.no_grad():  # eager no-grad runs the C++ compressed matmul (own summation order): 1e-5
        assert_same(comp(x), model(x), exact=False, what="no-grad output")
    y_c = comp(x)
    y_c.sum().backward()
    grad_c = model[0].weight.grad.clone()
    model.zero_grad()
    y = model(x)
    y.sum().backward()
    # With grads both sides take materialize + F.linear.
    assert_same(y_c, y, what="output")
    assert_same(grad_c, model[0].weight.grad, what="grad of the layer before")
    assert counter.frame_count == 2


# -- inductor (real code generation): a representative few --------------------------------------
@pytest.mark.slow
@needs_cxx
def test_inductor_mlp_matches_eager(no_inductor_cache):
    """Prune+int4 and low rank in one MLP, non-contiguous input, two betas: one graph, eager numerics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(53, 32), nn.ReLU(inplace=True), nn.Linear(32, 16))
    configs = {"0": vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize(bits=4)), "2": vk.LowRank(rank=4)}
    model = vk.convert(model, lambda module, name: configs.get(name))
    twin = copy.deepcopy(model)
    comp, counter = compiled(twin, "inductor")
    x = torch.randn(53, 6).t()  # non-contiguous
    g = torch.randn(6, 16)
    for beta in (0.7, 0.0):
        for m in (model, twin):
            for _, layer in vk.vcon_layers(m):
                layer.set_beta(beta)
        assert_step_matches(model, comp, twin, x, g, exact=False, where=f" at beta={beta}")
    assert counter.frame_count == 1


@pytest.mark.slow
@needs_cxx
def test_inductor_channels_last_conv_matches_eager(no_inductor_cache):
    """Channels-last activations and weights through a low-rank VCON conv (the stride contract of the ops)."""
    torch.manual_seed(0)
    model = vk.convert(nn.Sequential(nn.Conv2d(13, 8, 2, padding=1)), vk.LowRank(rank=3))
    model[0].set_beta(0.5)
    model = model.to(memory_format=torch.channels_last)
    twin = copy.deepcopy(model)
    comp, counter = compiled(twin, "inductor")
    x = torch.randn(2, 13, 6, 6).to(memory_format=torch.channels_last)
    g = torch.randn(2, 8, 7, 7)
    assert_step_matches(model, comp, twin, x, g, exact=False)
    assert counter.frame_count == 1


@pytest.mark.slow
@needs_cxx
def test_inductor_finalized_model(no_inductor_cache):
    """Finalized int4 (packed codes unpacked in the graph), 2:4 and low-rank layers through inductor."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 24), nn.ReLU(), nn.Linear(24, 8))
    configs = {"0": vk.Quantize(bits=4, granularity="group", group_size=8), "2": vk.Prune(granularity="nm"),
               "4": vk.LowRank(rank=3)}
    model = vk.convert(model, lambda module, name: configs.get(name))
    for _, layer in vk.vcon_layers(model):
        layer.set_beta(0.0)
    model = vk.finalize(model)
    comp, counter = compiled(model, "inductor")
    x = torch.randn(5, 16)
    with torch.no_grad():
        assert_same(comp(x), model(x), exact=False, what="output")
    assert counter.frame_count == 1
