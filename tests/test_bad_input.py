"""Bad and unusual inputs: the table of what was tried and the error each gets, and what must just work.

``ERRORS`` below is the table: one row per bad input, with the exception type and the message
it must carry (the message names the argument and what is accepted). The tests after it cover
inputs that are unusual but valid and must work, for every mode of ``cases.LINEAR_CASES``:
non-contiguous and channels-last inputs, an empty batch (forward and backward), NaN/Inf
(propagated, no crash), in-place ops on a layer's output, and a scheduler stepped past its end
(beta stays exactly 0).

Accepted by design and not in the table: a *tensor* beta is not range-checked in the functional
API (``vcon_linear(x, w, b, torch.tensor(2.0), cfg)`` computes with 2.0), because the check would
need a host sync per call; ``set_beta``, the scheduler and float betas are checked.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from cases import LINEAR_CASES
from cases import make_linear
from cases import run_fwd_bwd
from cases import set_betas
from torch import nn

import vcon_kernels as vk

CASES = sorted(LINEAR_CASES)


def lin(case="prune_layer"):
    layer = make_linear(case)
    set_betas(layer, 0.5)
    return layer


def conv(config=None, groups=1):
    return vk.VCONConv2d(4, 6, 3, padding=1, groups=groups, config=config or vk.Prune(sparsity=0.5))


def model():
    return vk.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)), vk.Prune(sparsity=0.5))


def finalized():
    m = model()
    vk.VCONScheduler(m, steps=1).step()
    return vk.finalize(m)


def scheduler(**kwargs):
    m = vk.convert(nn.Sequential(nn.Linear(8, 8)), vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize(bits=8)))
    return vk.VCONScheduler(m, **kwargs)


def stepped(sched, n):
    for _ in range(n):
        sched.step()


def meta_model():
    with torch.device("meta"):
        return nn.Sequential(nn.Linear(8, 8))


def nan_linear():
    dense = nn.Linear(8, 4)
    with torch.no_grad():
        dense.weight[1, 2] = float("nan")
    return dense


def functional(beta=0.5, weight=None, bias=None, config=None, x=None):
    x = torch.randn(2, 8) if x is None else x
    weight = torch.randn(4, 8) if weight is None else weight
    return vk.functional.vcon_linear(x, weight, bias, beta, config or vk.Prune(sparsity=0.5))


K = LINEAR_CASES["prune_layer"][1]  # 53
# The table: (what is wrong, the call, the exception it raises, a regex its message matches).
ERRORS = [
    # -- inputs: dtype, shape, device ---------------------------------------------------------------
    ("int64 input", lambda: lin()(torch.ones(2, K, dtype=torch.int64)), TypeError,
     r"input dtype must be float32, bfloat16, float16 or float64, got torch.int64"),
    ("int32 input", lambda: lin()(torch.ones(2, K, dtype=torch.int32)), TypeError, r"input dtype must be .*int32"),
    ("bool input", lambda: lin()(torch.ones(2, K, dtype=torch.bool)), TypeError, r"input dtype must be .*bool"),
    ("complex64 input", lambda: lin()(torch.ones(2, K, dtype=torch.complex64)), TypeError,
     r"input dtype must be .*complex64"),
    ("fp64 input, fp32 weights", lambda: lin()(torch.ones(2, K, dtype=torch.float64)), TypeError,
     r"input dtype torch.float64 does not match the weight dtype torch.float32"),
    ("bf16 input, fp32 weights", lambda: lin()(torch.ones(2, K, dtype=torch.bfloat16)), TypeError,
     r"does not match the weight dtype"),
    ("not a tensor", lambda: lin()([[1.0] * K]), TypeError, r"input must be a torch.Tensor, got list"),
    ("last dim too small", lambda: lin()(torch.randn(2, K - 1)), ValueError,
     rf"last dimension must be {K} \(the layer's input features\), got shape \(2, {K - 1}\)"),
    ("last dim too large, 3-D", lambda: lin()(torch.randn(2, 3, K + 1)), ValueError, r"last dimension must be"),
    ("0-dim input", lambda: lin()(torch.tensor(1.0)), ValueError, r"last dimension must be"),
    ("conv: 3-D input", lambda: conv()(torch.randn(4, 5, 5)), ValueError, r"input must be 4-D \(N, C, H, W\)"),
    ("conv: wrong channels", lambda: conv()(torch.randn(1, 5, 5, 5)), ValueError,
     r"channel dimension must be 4"),
    ("conv: int input", lambda: conv()(torch.ones(1, 4, 5, 5, dtype=torch.int64)), TypeError,
     r"vcon_conv2d: input dtype must be"),
    ("weights on meta, input on cpu", lambda: lin().to("meta")(torch.randn(2, K)), ValueError,
     r"input is on cpu but the weights are on meta; move one of them"),
    ("input on meta, weights on cpu", lambda: lin()(torch.randn(2, K, device="meta")), ValueError,
     r"input is on meta but the weights are on cpu"),
    ("conv: weights on meta", lambda: conv().to("meta")(torch.randn(1, 4, 5, 5)), ValueError,
     r"input is on cpu but the weights are on meta"),
    # -- functional API arguments -------------------------------------------------------------------
    ("functional: 1-D weight", lambda: functional(weight=torch.randn(8)), ValueError,
     r"weight must be a 2-D floating-point tensor, got \(8,\)"),
    ("functional: int weight", lambda: functional(weight=torch.ones(4, 8, dtype=torch.int32)), ValueError,
     r"weight must be a 2-D floating-point tensor"),
    ("functional: bias of wrong shape", lambda: functional(bias=torch.randn(3)), ValueError,
     r"bias must have shape \(4,\)"),
    ("functional: bias of other dtype", lambda: functional(bias=torch.randn(4, dtype=torch.float64)), ValueError,
     r"bias must have shape \(4,\) and the weight dtype torch.float32"),
    ("functional: beta 1.5", lambda: functional(beta=1.5), ValueError, r"beta must be in \[0, 1\], got 1.5"),
    ("functional: beta -0.1", lambda: functional(beta=-0.1), ValueError, r"beta must be in \[0, 1\]"),
    ("functional: beta NaN", lambda: functional(beta=float("nan")), ValueError, r"beta must be in \[0, 1\]"),
    ("functional: beta str", lambda: functional(beta="0.5"), TypeError, r"beta must be a float in \[0, 1\], got str"),
    ("functional: beta tensor of 3", lambda: functional(beta=torch.tensor([0.1, 0.2, 0.3])), ValueError,
     r"beta must have 1 entry, got shape \(3,\)"),
    ("functional: Compose beta of 3",
     lambda: functional(beta=torch.ones(3), config=vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize())), ValueError,
     r"beta must have 1 or 2 entries \(one per stage\)"),
    ("functional: LowRank without U, V", lambda: functional(config=vk.LowRank(rank=2)), ValueError,
     r"a LowRank config needs state.lowrank_u and state.lowrank_v"),
    # -- configs outside their ranges ---------------------------------------------------------------
    ("sparsity 1.0", lambda: vk.Prune(sparsity=1.0), ValueError, r"sparsity must be in \[0, 1\), got 1.0"),
    ("sparsity -0.1", lambda: vk.Prune(sparsity=-0.1), ValueError, r"sparsity must be in \[0, 1\)"),
    ("sparsity NaN", lambda: vk.Prune(sparsity=math.nan), ValueError, r"sparsity must be in \[0, 1\)"),
    ("sparsity str", lambda: vk.Prune(sparsity="0.5"), TypeError, r"sparsity must be a float in \[0, 1\), got str"),
    ("sparsity bool", lambda: vk.Prune(sparsity=True), TypeError, r"sparsity must be a float"),
    ("sparsity missing", lambda: vk.Prune(), ValueError, r"sparsity is required for granularity='layer'"),
    ("prune granularity 'col'", lambda: vk.Prune(sparsity=0.5, granularity="col"), ValueError,
     r"granularity must be one of \('layer', 'row', 'nm'\), got 'col'"),
    ("N:M with n >= m", lambda: vk.Prune(granularity="nm", n=4, m=4), ValueError,
     r"N:M pruning needs integers 1 <= n < m, got n=4, m=4"),
    ("N:M with n = 0", lambda: vk.Prune(granularity="nm", n=0, m=4), ValueError, r"1 <= n < m"),
    ("N:M with m = 512", lambda: vk.Prune(granularity="nm", n=2, m=512), ValueError, r"m must be at most 256"),
    ("N:M with contradicting sparsity", lambda: vk.Prune(sparsity=0.9, granularity="nm"), ValueError,
     r"sparsity=0.9 contradicts n=2, m=4"),
    ("update 0", lambda: vk.Prune(sparsity=0.5, update=0), ValueError,
     r"update must be 'step', 'once' or a positive int k"),
    ("update 'never'", lambda: vk.Prune(sparsity=0.5, update="never"), ValueError, r"update must be"),
    ("update True", lambda: vk.Prune(sparsity=0.5, update=True), ValueError, r"update must be"),
    ("grad 'straight'", lambda: vk.Prune(sparsity=0.5, grad="straight"), ValueError,
     r"grad must be one of \('ste', 'exact'\), got 'straight'"),
    ("bits 3", lambda: vk.Quantize(bits=3), ValueError, r"bits must be one of \(1, 2, 4, 8\), got 3"),
    ("bits 16", lambda: vk.Quantize(bits=16), ValueError, r"bits must be one of"),
    ("bits 8.0", lambda: vk.Quantize(bits=8.0), ValueError, r"bits must be one of"),
    ("bits True", lambda: vk.Quantize(bits=True), ValueError, r"bits must be one of"),
    ("quant granularity 'row'", lambda: vk.Quantize(granularity="row"), ValueError,
     r"granularity must be one of \('channel', 'group', 'tensor'\), got 'row'"),
    ("group_size 0", lambda: vk.Quantize(granularity="group", group_size=0), ValueError,
     r"group_size must be a positive int, got 0"),
    ("group_size 2.5", lambda: vk.Quantize(granularity="group", group_size=2.5), ValueError, r"group_size must be"),
    ("rank 0", lambda: vk.LowRank(rank=0), ValueError, r"rank must be an int >= 1, got 0"),
    ("rank 2.5", lambda: vk.LowRank(rank=2.5), ValueError, r"rank must be an int >= 1"),
    ("rank_ratio 0", lambda: vk.LowRank(rank_ratio=0.0), ValueError, r"rank_ratio must be a float in \(0, 1\]"),
    ("rank_ratio 1.5", lambda: vk.LowRank(rank_ratio=1.5), ValueError, r"rank_ratio must be a float in \(0, 1\]"),
    ("rank and rank_ratio", lambda: vk.LowRank(rank=2, rank_ratio=0.5), ValueError, r"give exactly one of rank"),
    ("neither rank nor ratio", lambda: vk.LowRank(), ValueError, r"give exactly one of rank"),
    ("Compose in the wrong order", lambda: vk.Compose(vk.Quantize(), vk.Prune(sparsity=0.5)), ValueError,
     r"Compose supports exactly \(Prune, Quantize\), in that order; got \(Quantize, Prune\)"),
    ("Compose with LowRank", lambda: vk.Compose(vk.Prune(sparsity=0.5), vk.LowRank(rank=2)), ValueError,
     r"Low rank cannot be composed yet"),
    ("Compose of one", lambda: vk.Compose(vk.Prune(sparsity=0.5)), ValueError, r"got \(Prune\)"),
    ("Compose with mixed grad",
     lambda: vk.Compose(vk.Prune(sparsity=0.5, grad="exact"), vk.Quantize()), ValueError,
     r"Compose stages must share a grad mode"),
    # -- configs that do not fit the layer (checked when the layer is built) -------------------------
    ("N:M, m does not divide K", lambda: vk.VCONLinear(10, 4, config=vk.Prune(granularity="nm")), ValueError,
     r"N:M pruning needs m=4 to divide the input dim 10"),
    ("group_size does not divide K",
     lambda: vk.VCONLinear(10, 4, config=vk.Quantize(granularity="group", group_size=4)), ValueError,
     r"group_size=4 must divide the input dim 10"),
    ("rank > min(N, K)", lambda: vk.VCONLinear(10, 4, config=vk.LowRank(rank=5)), ValueError,
     r"rank=5 must be at most min\(N, K\) = min\(4, 10\)"),
    ("LowRank on a grouped conv", lambda: conv(vk.LowRank(rank=2), groups=2), ValueError,
     r"LowRank needs groups=1 convolutions \(got groups=2\)"),
    ("layer without config", lambda: vk.VCONLinear(8, 4), TypeError,
     r"config must be a vcon_kernels config \(vk.Prune, vk.Quantize, vk.LowRank or vk.Compose\), got NoneType"),
    ("from_linear of a conv", lambda: vk.VCONLinear.from_linear(nn.Conv2d(2, 2, 1), vk.Prune(sparsity=0.5)),
     TypeError, r"from_linear expects an nn.Linear, got Conv2d"),
    # -- model-level calls ---------------------------------------------------------------------------
    ("convert with a str config", lambda: vk.convert(model(), "prune"), TypeError, r"config must be a vcon_kernels"),
    ("convert twice", lambda: vk.convert(model(), vk.Prune(sparsity=0.5)), ValueError,
     r"model already contains VCON layers \(0, 2\); convert\(\) runs once per model"),
    ("config function returns a float",
     lambda: vk.convert(nn.Sequential(nn.Linear(3, 4)), lambda module, name: 0.5), TypeError,
     r"0: the config function returned float, expected a config or None"),
    ("convert a weight with NaN", lambda: vk.convert(nn.Sequential(nan_linear()), vk.Prune(sparsity=0.5)),
     ValueError, r"0: weight has NaN or Inf entries"),
    ("convert a meta-device model", lambda: vk.convert(meta_model(), vk.Prune(sparsity=0.5)), ValueError,
     r"0: weight is on the meta device \(not materialized\)"),
    ("finalize while beta > 0", lambda: vk.finalize(model()), ValueError,
     r"2 of 2 VCON layers still have beta > 0 \(e.g. 0: prune=1\); no vk.VCONScheduler drives these layers"),
    ("finalize twice", lambda: vk.finalize(finalized()), ValueError,
     r"the model has no VCON layers \(already finalized, or never converted\)"),
    ("finalize a dense model", lambda: vk.finalize(nn.Sequential(nn.Linear(2, 2))), ValueError,
     r"the model has no VCON layers"),
    ("set_beta 1.5", lambda: lin().set_beta(1.5), ValueError, r"beta must be in \[0, 1\], got 1.5"),
    ("set_beta NaN", lambda: lin().set_beta(float("nan")), ValueError, r"beta must be in \[0, 1\], got nan"),
    ("set_beta of a missing stage", lambda: lin().set_beta(0.5, "quantize"), ValueError,
     r"stage must be one of \('prune',\) for this layer, got 'quantize'"),
    ("get_beta of a two-stage layer", lambda: lin("prune_int4").get_beta(), ValueError,
     r"this layer has stages \('prune', 'quantize'\); name one"),
    ("backend 'cuda'", lambda: vk.backends.use("cuda").__enter__(), ValueError,
     r"backend must be one of \('torch', 'cpp', 'triton'\), got 'cuda'"),
    # -- scheduler ------------------------------------------------------------------------------------
    ("scheduler on a finalized model", lambda: vk.VCONScheduler(finalized(), steps=3), ValueError,
     r"the model has no VCON layers; call vk.convert"),
    ("steps 0", lambda: scheduler(steps=0), ValueError, r"steps for stage 'prune' must be > 0, got 0"),
    ("steps 2.5", lambda: scheduler(steps=2.5), ValueError, r"must be an int > 0 or a \(begin, end\) pair, got 2.5"),
    ("steps window (5, 3)", lambda: scheduler(steps={"prune": (5, 3), "quantize": 2}), ValueError,
     r"must be \(begin, end\) with 0 <= begin < end, got \(5, 3\)"),
    ("steps dict missing a stage", lambda: scheduler(steps={"prune": 3}), ValueError,
     r"steps keys must be exactly the model's stages \['prune', 'quantize'\]; unknown: \[\], missing: \['quantize'\]"),
    ("steps dict with an unknown stage", lambda: scheduler(steps={"prune": 3, "quantize": 3, "lowrank": 3}),
     ValueError, r"unknown: \['lowrank'\]"),
    ("schedule 'quadratic'", lambda: scheduler(steps=3, schedule="quadratic"), ValueError,
     r"schedule for stage 'prune' must be one of \('linear', 'cosine', 'exp', 'step'\) or a callable"),
    ("schedule dict with an unknown stage", lambda: scheduler(steps=3, schedule={"lowrank": "linear"}), ValueError,
     r"schedule has stages \['lowrank'\] that the model does not have"),
    ("start -1", lambda: scheduler(steps=3, start=-1), ValueError, r"start must be an int >= 0, got -1"),
    ("callable schedule returning 1.5", lambda: stepped(scheduler(steps=3, schedule=lambda t: 1.5), 1), ValueError,
     r"schedule\('prune'\)\(1\) must be in \[0, 1\], got 1.5"),
    ("loading another scheduler's windows",
     lambda: scheduler(steps=3).load_state_dict(scheduler(steps=5).state_dict()), ValueError,
     r"scheduler state has windows .* this scheduler has"),
]


@pytest.mark.parametrize("what, action, exc, match", ERRORS, ids=[row[0] for row in ERRORS])
def test_bad_input_raises_a_clear_error(what, action, exc, match):
    with pytest.raises(exc, match=match):
        action()


def test_table_has_unique_rows():
    names = [row[0] for row in ERRORS]
    assert len(names) == len(set(names))


# -- unusual but valid: must work ------------------------------------------------------------------
def _fwd_bwd(layer, x, grad_out):
    return run_fwd_bwd(layer, layer, x, grad_out)


def _assert_same_results(a, b, tol):
    (y_a, g_a), (y_b, g_b) = a, b
    torch.testing.assert_close(y_a, y_b, **tol)
    for name in g_a:
        if g_a[name] is None:
            assert g_b[name] is None, name
        else:
            torch.testing.assert_close(g_a[name], g_b[name], **tol, msg=lambda m, n=name: f"grad {n}: {m}")


# A different memory layout may take another BLAS path: equal within fp32 rounding, not bit for bit.
LAYOUT_TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_non_contiguous_inputs_work(case):
    layer = lin(case)
    k, n = layer.in_features, layer.out_features
    torch.manual_seed(0)
    base = torch.randn(4, 6, k)
    grad_out = torch.randn(4, 6, n)
    reference = _fwd_bwd(layer, base.contiguous(), grad_out)
    variants = {
        "transposed": torch.randn(6, 4, k).copy_(base.transpose(0, 1)).transpose(0, 1),
        "strided slice": torch.zeros(4, 6, 2 * k)[..., ::2].copy_(base),
        "permuted storage": base.permute(2, 0, 1).contiguous().permute(1, 2, 0),
    }
    for name, x in variants.items():
        assert not x.is_contiguous() and torch.equal(x, base), name
        _assert_same_results(_fwd_bwd(layer, x, grad_out), reference, LAYOUT_TOL)
    # A broadcast (stride-0) batch: forward only (its gradient would be a reduction).
    row = torch.randn(1, k)
    with torch.no_grad():
        torch.testing.assert_close(layer(row.expand(5, k)), layer(row.repeat(5, 1)), **LAYOUT_TOL)


def conv_layer(case):
    factory, _ = LINEAR_CASES[case]
    torch.manual_seed(0)
    layer = vk.VCONConv2d.from_conv2d(nn.Conv2d(13, 8, 2, padding=1), factory("ste"))
    set_betas(layer, 0.5, 0.3)
    return layer


@pytest.mark.parametrize("case", CASES)
def test_channels_last_conv_works(case):
    layer = conv_layer(case)
    torch.manual_seed(1)
    x = torch.randn(2, 13, 6, 6)
    grad_out = torch.randn(2, 8, 7, 7)
    reference = _fwd_bwd(layer, x, grad_out)
    cl = torch.channels_last
    y, grads = _fwd_bwd(layer, x.to(memory_format=cl), grad_out.to(memory_format=cl))
    assert y.is_contiguous(memory_format=cl)
    _assert_same_results((y, grads), reference, LAYOUT_TOL)
    layer_cl = layer.to(memory_format=cl)  # channels-last weights too (model.to(memory_format=...))
    _assert_same_results(_fwd_bwd(layer_cl, x.to(memory_format=cl), grad_out), reference, LAYOUT_TOL)


@pytest.mark.parametrize("case", CASES)
def test_empty_batch_works(case):
    """M = 0 rows: forward gives an empty output, backward zero parameter gradients."""
    layer = lin(case)
    k, n = layer.in_features, layer.out_features
    for shape in [(0, k), (3, 0, k)]:
        x = torch.randn(shape, requires_grad=True)
        layer.zero_grad(set_to_none=True)
        y = layer(x)
        assert y.shape == (*shape[:-1], n)
        y.sum().backward()
        assert x.grad.shape == x.shape
        for name, p in layer.named_parameters():
            assert torch.equal(p.grad, torch.zeros_like(p)), name
    c = conv_layer(case)
    x = torch.randn(0, 13, 6, 6, requires_grad=True)
    y = c(x)
    assert y.shape == (0, 8, 7, 7)
    y.sum().backward()
    assert x.grad.shape == x.shape and torch.equal(c.weight.grad, torch.zeros_like(c.weight))


@pytest.mark.parametrize("case", CASES)
def test_nan_and_inf_inputs_propagate(case):
    """A NaN or Inf in an input row makes that output row non-finite and leaves the other rows alone."""
    layer = lin(case)
    torch.manual_seed(0)
    clean = torch.randn(4, layer.in_features)
    x = clean.clone()
    x[1, 3] = float("nan")
    x[2, 0] = float("inf")
    xg = x.clone().requires_grad_(True)
    y = layer(xg)
    assert torch.isnan(y[1]).all()
    assert not torch.isfinite(y[2]).any()
    torch.testing.assert_close(y[[0, 3]], layer(clean)[[0, 3]], rtol=1e-6, atol=1e-6)
    y.sum().backward()  # no crash; the weight gradient sums over the bad rows
    assert not torch.isfinite(layer.weight.grad).all()
    assert torch.isfinite(xg.grad[[0, 3]]).all()


@pytest.mark.parametrize("case", CASES)
def test_nan_weight_during_training_propagates(case):
    """A weight that turns NaN mid-training (a diverged step) gives NaN outputs, not a crash."""
    layer = lin(case)
    with torch.no_grad():
        layer.weight[0, 0] = float("nan")
        if layer.rank is not None:
            layer.lowrank_u[0, 0] = float("nan")
    y = layer(torch.randn(3, layer.in_features))
    assert torch.isnan(y).any()


@pytest.mark.parametrize("case", CASES)
def test_in_place_ops_on_the_output_work(case):
    """nn.ReLU(inplace=True) and ``y += residual`` after a VCON layer: same gradients as out of place."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, LINEAR_CASES[case][1])
    results = []
    for in_place in (False, True):
        layer = lin(case)
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        res = torch.ones_like(y)
        if in_place:
            y += res
            y.relu_()
        else:
            y = F.relu(y + res)
        y.square().sum().backward()
        results.append((y.detach(), xi.grad, layer.weight.grad))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("schedule", ["linear", "cosine", "exp", "step", lambda t: max(0.0, 1.0 - t / 4)])
def test_scheduler_past_its_end_keeps_beta_zero(schedule):
    m = vk.convert(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)),
                   vk.Compose(vk.Prune(sparsity=0.5, update=2), vk.Quantize(bits=4)))
    sched = vk.VCONScheduler(m, steps={"prune": 4, "quantize": (2, 6)}, schedule=schedule)
    for t in range(1, 31):
        sched.step()
        if t >= 6:
            assert sched.finished and sched.betas == {"prune": 0.0, "quantize": 0.0}
            assert all(layer.beta.tolist() == [0.0, 0.0] for _, layer in vk.vcon_layers(m))
    state = sched.state_dict()
    assert state["t"] == 30
    sched.load_state_dict(state)  # resuming past the end stays at 0
    assert sched.betas == {"prune": 0.0, "quantize": 0.0}
    final = vk.finalize(m)
    assert not vk.vcon_layers(final)
