"""Low rank at beta = 0: the dense path is stopped (no FLOPs and no gradient for W).

At beta = 0 the output no longer depends on W; the authors' reference stops updating it. In
eager training W is detached for the call (``VCONLayerBase.call_weight``): its gradient stays
None, so optimizers skip it, and it trains again once beta is raised. Where a gradient must exist
(a distributed job: DDP waits for every parameter's; a compiled graph, which has no
beta-dependent branch) it is zero. The C++ node keeps t = x V^T from the forward for dU instead
of recomputing it (as every path now does when U trains); its gradients are bit-identical to the
op path's.
"""

import pytest
import torch

import vcon_kernels as vk
from vcon_kernels.modules import base as module_base


def _layer(kind, grad="ste"):
    torch.manual_seed(0)
    if kind == "linear":
        return vk.VCONLinear(12, 9, config=vk.LowRank(rank=3, grad=grad)), torch.randn(5, 12)
    conv = vk.VCONConv2d.from_conv2d(torch.nn.Conv2d(4, 6, 3), vk.LowRank(rank=2, grad=grad))
    return conv, torch.randn(2, 4, 7, 7)


def _grads(layer, x, backend):
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    with vk.backends.use(backend):
        layer(x).square().sum().backward()
    return x.grad, layer.weight.grad, layer.bias.grad, layer.lowrank_u.grad, layer.lowrank_v.grad


@pytest.mark.parametrize("backend", ["torch", "cpp"])
@pytest.mark.parametrize("grad", ["ste", "exact"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_dense_path_stops_at_beta_zero(kind, grad, backend):
    layer, x = _layer(kind, grad)
    layer.set_beta(0.0)
    _, dw, db, du, dv = _grads(layer, x, backend)
    assert dw is None  # no gradient at all: an optimizer skips W
    assert db.abs().sum() > 0 and du.abs().sum() > 0 and dv.abs().sum() > 0
    layer.set_beta(0.25)  # raised again: W trains again
    _, dw, _, _, _ = _grads(layer, x, backend)
    assert dw is not None and dw.abs().sum() > 0


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_optimizer_leaves_the_stopped_weight_alone(kind):
    layer, x = _layer(kind)
    layer.set_beta(0.0)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)
    before_w, before_u = layer.weight.detach().clone(), layer.lowrank_u.detach().clone()
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        layer(x).square().sum().backward()
        opt.step()
    assert torch.equal(layer.weight, before_w)  # no decay, no moment update: W is where beta reached 0
    assert not torch.equal(layer.lowrank_u, before_u)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_distributed_jobs_get_a_zero_gradient(kind, monkeypatch):
    monkeypatch.setattr(module_base, "_distributed", lambda: True)  # as under DDP
    layer, x = _layer(kind)
    layer.set_beta(0.0)
    _, dw, _, _, _ = _grads(layer, x, "cpp")
    assert dw is not None and torch.equal(dw, torch.zeros_like(layer.weight))


def test_beta_written_in_place_is_seen():
    """beta changed without set_beta (load_state_dict, fill_): the host-side record follows its version."""
    layer, x = _layer("linear")
    layer.set_beta(0.5)
    assert _grads(layer, x, "cpp")[1] is not None
    with torch.no_grad():
        layer.beta.zero_()
    assert _grads(layer, x, "cpp")[1] is None
    layer.load_state_dict({**layer.state_dict(), "beta": torch.full((1,), 0.75)})
    assert _grads(layer, x, "cpp")[1] is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_saved_activation_path_matches_the_recomputing_one(dtype):
    """The C++ node's t-reusing backward against the same node with W attached (which recomputes t)."""
    layer, x = _layer("linear")
    layer = layer.to(dtype)
    x = x.to(dtype)
    layer.set_beta(0.0)
    stopped = _grads(layer, x, "cpp")
    with torch.no_grad():
        reference_layer = vk.VCONLinear(12, 9, config=vk.LowRank(rank=3)).to(dtype)
        reference_layer.load_state_dict(layer.state_dict())
    ref = _reference_grads(reference_layer, x)
    for got, want in zip(stopped, ref):
        if want is None:
            assert got is None
        else:
            assert torch.equal(got, want)


def _reference_grads(layer, x):
    """beta = 0 through the op path (torch.ops.vcon.linear: the op's own saved t, C++ backward op)."""
    x = x.clone().requires_grad_(True)
    spec = layer.spec()
    threshold, scales = vk.functional.layer_state(layer.weight_2d(), layer.beta, spec, None)
    with vk.backends.use("cpp"):
        y = torch.ops.vcon.linear(x, layer.weight.detach(), layer.bias, layer.beta, threshold, scales, None,
                                  layer.lowrank_u, layer.lowrank_v, *spec.as_args(), True)[0]
    y.square().sum().backward()
    return x.grad, None, layer.bias.grad, layer.lowrank_u.grad, layer.lowrank_v.grad


def test_compiled_layer_gives_a_zero_gradient():
    layer, x = _layer("linear")
    layer.set_beta(0.0)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    compiled(x).square().sum().backward()
    assert layer.weight.grad is not None and torch.equal(layer.weight.grad, torch.zeros_like(layer.weight))
