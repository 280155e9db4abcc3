"""The full op path on the Triton backend: VCON layers, autograd, torch.compile, explain, errors."""

import logging
import os
import subprocess
import sys

import pytest
import torch
import triton  # noqa: F401  (a missing Triton fails this module, it does not skip it)
from cases import LINEAR_CASES
from cases import make_linear
from cases import run_fwd_bwd
from cases import set_betas
from triton_helpers import DEVICE
from triton_helpers import TRITON
from triton_helpers import no_tf32
from triton_helpers import on_device

import vcon_kernels as vk
from vcon_kernels.ops import dispatch
from vcon_kernels.reference import ReferenceVCON

TOL = dict(atol=3e-5, rtol=2e-5)


@pytest.fixture(autouse=True)
def full_fp32():
    with no_tf32():
        yield


def _check_against_reference(layer, x, grad_out, tol=TOL):
    with vk.backends.use("triton"):
        y, grads = run_fwd_bwd(layer, layer, x, grad_out)
    y_ref, grads_ref = run_fwd_bwd(ReferenceVCON(layer), layer, x, grad_out)
    torch.testing.assert_close(y, y_ref, **tol)
    for name, g in grads.items():
        if g is None:
            assert grads_ref[name] is None, name
            continue
        torch.testing.assert_close(g, grads_ref[name], **tol, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("grad,beta", [("ste", 0.0), ("ste", 0.37), ("exact", 0.37), ("ste", 1.0)])
@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_vcon_linear_matches_reference(case, grad, beta):
    """compute_state + fused forward + fused backward through torch.ops.vcon, against reference.py."""
    layer = on_device(make_linear(case, grad))
    set_betas(layer, beta)
    torch.manual_seed(2)
    x = torch.randn(2, 5, layer.in_features, device=DEVICE)
    _check_against_reference(layer, x, torch.randn(2, 5, layer.out_features, device=DEVICE))


CONV_CASES = {
    "prune_layer": lambda g: vk.Prune(sparsity=0.6, grad=g),
    "prune_nm": lambda g: vk.Prune(granularity="nm", n=2, m=4, grad=g),
    "int4_group": lambda g: vk.Quantize(bits=4, granularity="group", group_size=12, grad=g),
    "prune_int8": lambda g: vk.Compose(vk.Prune(sparsity=0.5, granularity="row", grad=g), vk.Quantize(bits=8, grad=g)),
    "binary": lambda g: vk.Quantize(bits=1, granularity="tensor", grad=g),
    "lowrank": lambda g: vk.LowRank(rank=3, grad=g),
}


@pytest.mark.parametrize("grad", ["ste", "exact"])
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_vcon_conv2d_matches_reference(case, grad):
    """Convolutions use the Triton blend_weight / weight_grad kernels, then the ordinary convolution."""
    torch.manual_seed(0)
    layer = on_device(vk.VCONConv2d.from_conv2d(torch.nn.Conv2d(4, 6, 3, padding=1), CONV_CASES[case](grad)))
    layer.set_beta(0.37)
    x = torch.randn(2, 4, 7, 7, device=DEVICE)
    _check_against_reference(layer, x, torch.randn(2, 6, 7, 7, device=DEVICE), dict(atol=1e-4, rtol=1e-4))


def test_bf16_layer_close_to_fp32():
    layer = on_device(make_linear("nm_int8_group", "exact", torch.bfloat16))
    ref = on_device(make_linear("nm_int8_group", "exact", torch.float32))
    with torch.no_grad():
        for p_ref, p in zip(ref.parameters(), layer.parameters()):
            p_ref.copy_(p.float())
    set_betas(layer, 0.37)
    set_betas(ref, 0.37)
    x = torch.randn(6, layer.in_features, device=DEVICE).to(torch.bfloat16)
    with vk.backends.use("triton"):
        y = layer(x)
        y.float().sum().backward()
    y_ref = ref(x.float())
    err = (y.float() - y_ref).norm() / y_ref.norm()
    assert err < 1e-2 and layer.weight.grad.dtype == torch.bfloat16


def test_fp64_and_empty_batch_use_the_plain_torch_path():
    layer = on_device(make_linear("prune_int4", "exact", torch.float64))
    set_betas(layer, 0.4)
    x = torch.randn(3, layer.in_features, dtype=torch.float64, device=DEVICE)
    with vk.backends.use("triton"):
        y = layer(x)
    with vk.backends.use("torch"):
        assert torch.equal(y, layer(x))
    layer32 = on_device(make_linear("lowrank"))
    with vk.backends.use("triton"):
        y0 = layer32(torch.randn(0, layer32.in_features, device=DEVICE, requires_grad=True))
        y0.sum().backward()
    assert y0.shape == (0, layer32.out_features)


def test_explain_reports_the_strategy():
    layer = make_linear("prune_nm")
    with vk.backends.use("triton"):
        small = vk.explain(layer, torch.randn(8, layer.in_features))
        large = vk.explain(layer, (16, 1024, layer.in_features))
        with dispatch.force("fused"):
            forced = vk.explain(layer, (16, 1024, layer.in_features))
    assert small.startswith("triton[fused] M=8") and "2:4 mask computed in the tile" in small
    assert large.startswith("triton[weff] M=16384") and "cuBLAS" in large
    assert forced.startswith("triton[fused] M=16384")
    lowrank = make_linear("lowrank")
    with vk.backends.use("triton"):
        assert "[x | t'] . [beta W | U]^T" in vk.explain(lowrank, torch.randn(4, lowrank.in_features))
        conv = vk.VCONConv2d.from_conv2d(torch.nn.Conv2d(3, 4, 3), vk.Prune(sparsity=0.5))
        assert "conv2d" in vk.explain(conv, torch.randn(1, 3, 8, 8))


def test_debug_log_names_the_strategy(caplog):
    layer = on_device(make_linear("int8_channel"))
    with caplog.at_level(logging.DEBUG, logger="vcon_kernels.triton"), vk.backends.use("triton"):
        layer(torch.randn(4, layer.in_features, device=DEVICE, requires_grad=True)).sum().backward()
    messages = [r.getMessage() for r in caplog.records]
    assert any("forward: M=4" in m and "strategy=fused" in m for m in messages)
    assert any("backward: M=4" in m for m in messages)


def test_strategy_env_and_errors(monkeypatch):
    monkeypatch.setenv("VCON_TRITON_STRATEGY", "weff")
    assert dispatch.choose(4, make_linear("prune_layer").spec(), torch.bfloat16) == "weff"
    monkeypatch.setenv("VCON_TRITON_STRATEGY", "fastest")
    with pytest.raises(ValueError, match="strategy must be one of"):
        dispatch.choose(4, make_linear("prune_layer").spec(), torch.bfloat16)
    with pytest.raises(RuntimeError, match="runs CUDA tensors"):
        TRITON.blend_weight(torch.empty(4, 4, device="meta"), torch.ones(1), None, None, None,
                            make_linear("prune_layer").spec())


def test_compile_fullgraph_no_recompile_when_beta_changes():
    layer = on_device(make_linear("prune_int4"))
    compiles = []

    def backend(gm, example_inputs):
        compiles.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with vk.backends.use("triton"):
        fn = torch.compile(layer, fullgraph=True, backend=backend)
        x = torch.randn(5, layer.in_features, device=DEVICE)
        outs = []
        for beta in (0.9, 0.5, 0.1):
            set_betas(layer, beta)
            outs.append(fn(x))
            with vk.backends.use("torch"):
                torch.testing.assert_close(outs[-1], layer(x), **TOL)
    assert len(compiles) == 1
    assert not torch.equal(outs[0], outs[2])


def test_unavailable_without_interpreter_or_gpu():
    """On a CPU-only machine without TRITON_INTERPRET the backend says why it cannot run."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the Triton backend is available natively")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = ("import vcon_kernels as vk; r = vk.backends.available()['triton']; print(r);"
            "import sys; sys.exit(0 if r is not True and 'TRITON_INTERPRET' in r else 1)")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
