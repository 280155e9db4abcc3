"""The C++ CPU backend (csrc/, vcon_kernels._C) against the plain-torch backend, every mode.

Both backends implement spec.py; the plain-torch one is the oracle. Where the arithmetic
is the same the results must be bit-identical: every prune and integer fake-quant mode,
forward and every gradient, fp32 / fp64 / bf16, in both kernel ISAs. Two modes compute
differently on purpose and are compared with a tolerance of a few ulps:

* binary quantization: its scale is a sum (mean |W|), accumulated in another order;
* low rank: the C++ path builds ``beta W + (1 - beta) U V`` (weight space) or accumulates
  the thin GEMMs through ``addmm`` instead of blending two outputs.

Skipped when the extension is not built, unless ``VCON_REQUIRE_CPP=1`` (CI), where a
missing extension fails.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys

import pytest
import torch
from cases import LINEAR_CASES
from cases import make_linear
from cases import run_fwd_bwd
from cases import set_betas

import vcon_kernels as vk
from vcon_kernels import torch_transforms as transforms
from vcon_kernels.spec import PRUNE_THRESHOLD

_reason = vk.backends.available()["cpp"]
if _reason is not True:
    if os.environ.get("VCON_REQUIRE_CPP"):
        raise RuntimeError(f"VCON_REQUIRE_CPP is set but the cpp backend is unavailable: {_reason}")
    pytest.skip(f"cpp backend unavailable: {_reason}", allow_module_level=True)

from vcon_kernels import _C  # noqa: E402

CASES = sorted(LINEAR_CASES)
APPROX = {"binary_tensor", "binary_channel", "prune_binary", "lowrank"}
# Differences allowed where the arithmetic differs, relative to the largest magnitude of
# the tensor (sums of products cancel, so elementwise relative errors are meaningless):
# a few ulps of the dtype times the depth of the sums in these tests.
SCALED_TOL = {torch.float32: 1e-5, torch.float64: 1e-13, torch.bfloat16: 3e-2}
ISAS = [isa for isa in _C.compiled_isas() if isa == "default" or torch.backends.cpu.get_cpu_capability() != "DEFAULT"]


@pytest.fixture(params=ISAS)
def isa(request):
    _C.set_isa(request.param)
    yield request.param
    _C.set_isa("auto")


def both_backends(module, layer, x, grad_out):
    """(torch result, cpp result) of forward + backward, each (y, {name: grad})."""
    out = []
    for name in ("torch", "cpp"):
        with vk.backends.use(name):
            out.append(run_fwd_bwd(module, layer, x, grad_out))
    return out


def assert_same(ref, test, exact, dtype, what=""):
    (y_ref, g_ref), (y, g) = ref, test
    pairs = [("y", y_ref, y)] + [(k, g_ref[k], g[k]) for k in g_ref]
    for name, a, b in pairs:
        if a is None:
            assert b is None, f"{what} {name}"
            continue
        if exact:
            assert torch.equal(a, b), f"{what} {name}: max abs diff {(a.float() - b.float()).abs().max():.3g}"
        else:
            scale = a.float().abs().max().clamp_min(1e-30)
            err = (a.float() - b.float()).abs().max() / scale
            assert err <= SCALED_TOL[dtype], f"{what} {name}: max abs diff / max abs = {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("grad", ["ste", "exact"])
@pytest.mark.parametrize("case", CASES)
def test_linear_matches_torch_backend(case, grad, beta, dtype):
    _check_linear_case(case, grad, beta, dtype)


@pytest.mark.parametrize("grad", ["ste", "exact"])
@pytest.mark.parametrize("case", CASES)
def test_every_isa_matches_torch_backend(case, grad, isa):
    """The other kernel copy (baseline ISA where AVX2 is the default) on every mode."""
    for dtype in (torch.float32, torch.bfloat16):
        _check_linear_case(case, grad, 0.37, dtype)


def _check_linear_case(case, grad, beta, dtype):
    layer = make_linear(case, grad, dtype)
    set_betas(layer, beta)
    torch.manual_seed(1)
    x = torch.randn(2, 3, layer.in_features, dtype=dtype)
    g = torch.randn(2, 3, layer.out_features, dtype=dtype)
    ref, test = both_backends(layer, layer, x, g)
    assert_same(ref, test, exact=case not in APPROX or beta == 1.0, dtype=dtype, what=case)


@pytest.mark.parametrize("grad", ["ste", "exact"])
@pytest.mark.parametrize("case", ["prune_int4", "nm_int8_group", "prune_binary"])
def test_compose_stage_betas(case, grad):
    layer = make_linear(case, grad, torch.float32)
    set_betas(layer, 0.3, 0.8)
    x, g = torch.randn(5, layer.in_features), torch.randn(5, layer.out_features)
    ref, test = both_backends(layer, layer, x, g)
    assert_same(ref, test, exact=case != "prune_binary", dtype=torch.float32, what=case)


# Larger, odd shapes: the parallel threshold path (> 65536 weights), rows that are not a
# multiple of the vector width, many row tasks, and M large enough for low rank to take
# its weight-space form.
BIG = {
    "prune_layer": (vk.Prune(sparsity=0.7), 257),
    "prune_row": (vk.Prune(sparsity=0.45, granularity="row"), 257),
    "prune_nm_2_4": (vk.Prune(granularity="nm", n=2, m=4), 256),
    "int8_channel": (vk.Quantize(bits=8), 257),
    "int4_group": (vk.Quantize(bits=4, granularity="group", group_size=32), 256),
    "binary_tensor": (vk.Quantize(bits=1, granularity="tensor"), 257),
    "prune_int8": (vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize(bits=8)), 257),
    "lowrank": (vk.LowRank(rank=16), 257),
}


@pytest.mark.parametrize("grad", ["ste", "exact"])
@pytest.mark.parametrize("case", sorted(BIG))
def test_large_odd_shapes(case, grad):
    config, k = BIG[case]
    if isinstance(config, vk.Compose):
        config = vk.Compose(*(dataclasses.replace(c, grad=grad) for c in (config.prune, config.quantize)))
    else:
        config = dataclasses.replace(config, grad=grad)
    torch.manual_seed(3)
    layer = vk.VCONLinear.from_linear(torch.nn.Linear(k, 260), config)
    set_betas(layer, 0.6)
    x, g = torch.randn(160, k), torch.randn(160, 260)
    ref, test = both_backends(layer, layer, x, g)
    assert_same(ref, test, exact=case not in APPROX, dtype=torch.float32, what=case)


CONV_CASES = {
    "prune_layer": vk.Prune(sparsity=0.6),
    "prune_nm": vk.Prune(granularity="nm", n=2, m=4),
    "int4_group": vk.Quantize(bits=4, granularity="group", group_size=9),
    "binary_channel": vk.Quantize(bits=1),
    "prune_int8": vk.Compose(vk.Prune(sparsity=0.5, grad="exact"), vk.Quantize(bits=8, grad="exact")),
    "lowrank": vk.LowRank(rank=3),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", sorted(CONV_CASES))
def test_conv2d_matches_torch_backend(case, dtype):
    torch.manual_seed(4)
    conv = torch.nn.Conv2d(8, 6, 3, padding=1, dtype=dtype)
    layer = vk.VCONConv2d.from_conv2d(conv, CONV_CASES[case])
    set_betas(layer, 0.4)
    x = torch.randn(2, 8, 7, 5, dtype=dtype)
    g = torch.randn(2, 6, 7, 5, dtype=dtype)
    ref, test = both_backends(layer, layer, x, g)
    assert_same(ref, test, exact=case not in ("binary_channel", "lowrank"), dtype=dtype, what=case)


# -- compute_state ------------------------------------------------------------------------------
def _state_both(w, config, beta=0.5, mask=None):
    spec = config.spec(*w.shape, stored_mask=mask is not None)
    b = torch.full((spec.num_stages,), beta)
    with vk.backends.use("torch"):
        ref = torch.ops.vcon.compute_state(w, b, mask, *spec.as_args())
    with vk.backends.use("cpp"):
        test = torch.ops.vcon.compute_state(w, b, mask, *spec.as_args())
    return spec, ref, test


def _tied(shape, levels, dtype=torch.float32, seed=0):
    """Weights with many exact ties (and zeros, and -0.0): few distinct magnitudes."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-levels, levels + 1, shape, generator=g).to(dtype) / 4
    w[0, :3] = -0.0
    return w


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("granularity", ["layer", "row"])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.999, 0.9999999])
@pytest.mark.parametrize("kind", ["randn", "tied", "big"])
def test_thresholds_equal_kthvalue(kind, sparsity, granularity, dtype):
    torch.manual_seed(5)
    if kind == "randn":
        w = (torch.randn(37, 53) * torch.logspace(-3, 3, 53)).to(dtype)
    elif kind == "tied":
        w = _tied((37, 53), 5, dtype)
    else:  # above the parallel-path size, with a few huge and tiny magnitudes
        w = torch.randn(300, 301).to(dtype)
        w[0, 0], w[1, 1], w[2, 2] = 1e30 if dtype != torch.float16 else 6e4, 1e-30, 0.0
    spec, (t_ref, _), (t, _) = _state_both(w, vk.Prune(sparsity=sparsity, granularity=granularity))
    assert t.dtype == t_ref.dtype and t.shape == t_ref.shape
    assert torch.equal(t, t_ref)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_threshold_hints_stay_exact_as_weights_move(dtype):
    """From the second call on a weight, the per-layer threshold comes from a one-pass
    bracket around the last one (csrc/select.cpp): exact however far the weights move."""
    _C.clear_threshold_hints()
    torch.manual_seed(7)
    w = torch.randn(400, 300).to(dtype)
    config = vk.Prune(sparsity=0.7)
    moves = [0.0, 1e-7, 1e-4, 1e-2, 0.5, None, 0.0, "ties", 0.0, 1e-3]
    for move in moves:
        with torch.no_grad():
            if move is None:
                w.copy_(torch.randn_like(w, dtype=torch.float32) * 3)  # a different weight at the same address
            elif move == "ties":
                w.copy_((w.float() * 4).round() / 4)  # few distinct magnitudes: the answer is a huge tie
            else:
                w.mul_(1 + move * torch.randn_like(w, dtype=torch.float32).to(dtype))
        _, (t_ref, _), (t, _) = _state_both(w, config)
        assert torch.equal(t, t_ref), move
    hits, misses = _C.threshold_hint_stats()
    assert hits >= 3 and misses >= 2 and hits + misses == len(moves) - 1


@pytest.mark.parametrize("config", [
    vk.Quantize(bits=8),
    vk.Quantize(bits=4, granularity="group", group_size=13),
    vk.Quantize(bits=2, granularity="tensor"),
    vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize(bits=4)),
    vk.Compose(vk.Prune(granularity="nm"), vk.Quantize(bits=8, granularity="group", group_size=13)),
], ids=lambda c: repr(c)[:60])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
def test_int_scales_bit_exact(config, dtype):
    w = torch.randn(37, 52).to(dtype)
    w[3] = 0.0  # an all-zero row: scale 0, codes divided by 1
    _, (t_ref, s_ref), (t, s) = _state_both(w, config, beta=0.3)
    assert torch.equal(t, t_ref) and s.dtype == torch.float32 and torch.equal(s, s_ref)


@pytest.mark.parametrize("granularity", ["channel", "tensor", "group"])
def test_binary_scales_close(granularity):
    w = torch.randn(64, 1000)
    w[:, ::7] = 0.0  # non-zero counts differ from the row length
    config = vk.Quantize(bits=1, granularity=granularity, group_size=100 if granularity == "group" else None)
    _, (_, s_ref), (_, s) = _state_both(w.double(), config)
    torch.testing.assert_close(s, s_ref, atol=0, rtol=2e-7)  # fp64 sums, fp32 scale: last-bit rounding at most
    _, (_, s_ref), (_, s) = _state_both(w, config)
    torch.testing.assert_close(s, s_ref, atol=0, rtol=5e-6)


@pytest.mark.parametrize("m,n", [(2, 1), (3, 1), (4, 2), (4, 3), (5, 2), (8, 4), (16, 5), (32, 8), (64, 16)])
@pytest.mark.parametrize("tied", [False, True])
def test_nm_masks_with_ties(m, n, tied):
    k = m * 7
    w = _tied((9, k), 2, seed=m) if tied else torch.randn(9, k)
    layer = vk.VCONLinear.from_linear(torch.nn.Linear(k, 9), vk.Prune(granularity="nm", n=n, m=m, grad="exact"))
    with torch.no_grad():
        layer.weight.copy_(w)
    set_betas(layer, 0.25)
    x, g = torch.randn(3, k), torch.randn(3, 9)
    ref, test = both_backends(layer, layer, x, g)
    assert_same(ref, test, exact=True, dtype=torch.float32, what=f"{n}:{m}")


def test_stored_mask_matches():
    layer = make_linear("prune_once", "exact")
    set_betas(layer, 0.2)
    assert layer.mask is not None and layer.mask.dtype == torch.uint8
    ref, test = both_backends(layer, layer, torch.randn(4, 53), torch.randn(4, 37))
    assert_same(ref, test, exact=True, dtype=torch.float32)


def test_blended_weight_op_and_exact_grad():
    config = vk.Compose(vk.Prune(sparsity=0.5, grad="exact"), vk.Quantize(bits=4, grad="exact"))
    w0 = torch.randn(20, 48)
    out = []
    for name in ("torch", "cpp"):
        w = w0.clone().requires_grad_(True)
        with vk.backends.use(name):
            w_eff = vk.functional.blended_weight(w, torch.tensor([0.3, 0.6]), config)
            (w_eff * torch.linspace(-1, 1, w_eff.numel()).view_as(w_eff)).sum().backward()
        out.append((w_eff.detach(), w.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])


# -- properties of the fused path ----------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_beta_one_is_nn_linear_bit_exact(case):
    layer = make_linear(case)
    dense = torch.nn.Linear(layer.in_features, layer.out_features)
    with torch.no_grad():
        dense.weight.copy_(layer.weight)
        dense.bias.copy_(layer.bias)
    x = torch.randn(4, 7, layer.in_features)
    with vk.backends.use("cpp"):
        assert torch.equal(layer(x), dense(x))


def test_lowrank_beta_zero_is_finalized_bit_exact():
    layer = make_linear("lowrank")
    set_betas(layer, 0.0)
    x = torch.randn(6, layer.in_features)
    with vk.backends.use("cpp"):
        y = layer(x)
    final = vk.finalize(torch.nn.Sequential(layer))
    assert torch.equal(y, final(x))


@pytest.mark.parametrize("m", [4, 600])  # activation-space and weight-space low rank
@pytest.mark.parametrize("needs", ["all", "factors_only", "input_only"])
def test_lowrank_partial_grads(m, needs):
    torch.manual_seed(6)
    layer = vk.VCONLinear.from_linear(torch.nn.Linear(64, 48), vk.LowRank(rank=8, grad="exact"))
    set_betas(layer, 0.3)
    if needs == "factors_only":
        layer.weight.requires_grad_(False)
        layer.bias.requires_grad_(False)
    if needs == "input_only":
        for p in layer.parameters():
            p.requires_grad_(False)
    x, g = torch.randn(m, 64), torch.randn(m, 48)
    ref, test = both_backends(layer, layer, x, g)
    assert_same(ref, test, exact=False, dtype=torch.float32)


def test_thread_count_does_not_change_results():
    layer = vk.VCONLinear.from_linear(torch.nn.Linear(512, 256), vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize(1)))
    set_betas(layer, 0.5)
    x, g = torch.randn(32, 512), torch.randn(32, 256)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, max(2, threads)):
            torch.set_num_threads(n)
            with vk.backends.use("cpp"):
                results.append(run_fwd_bwd(layer, layer, x, g))
    finally:
        torch.set_num_threads(threads)
    assert_same(results[0], results[1], exact=True, dtype=torch.float32)


def test_workspace_is_reused_across_layers():
    _C.release_workspace()
    layers = [vk.VCONLinear.from_linear(torch.nn.Linear(k, n), vk.Prune(sparsity=0.5)) for k, n in
              [(64, 128), (128, 64), (96, 32), (64, 128)]]
    for layer in layers:
        set_betas(layer, 0.5)
    x = torch.randn(8, 64, requires_grad=True)
    with vk.backends.use("cpp"):
        for _ in range(2):
            h = x
            for layer in layers[:2]:
                h = layer(h)
            h.sum().backward()
    assert _C.workspace_bytes() == 128 * 64 * 4  # the largest weight, once
    _C.release_workspace()
    assert _C.workspace_bytes() == 0


def test_nothing_weight_sized_saved_for_backward():
    layer = make_linear("prune_int4", out_features=64)
    set_betas(layer, 0.5)
    x = torch.randn(8, layer.in_features, requires_grad=True)
    saved = []
    with vk.backends.use("cpp"), torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    allowed = {id(t) for t in (x, layer.weight, layer.bias)}
    assert not [t for t in saved if id(t) not in allowed and t.numel() >= layer.weight.numel() // 4]
    with vk.backends.use("cpp"):
        y.sum().backward()
    assert layer.weight.grad is not None


def test_clear_errors():
    spec = _C.Spec(*vk.Prune(sparsity=0.5).spec(4, 8).as_args())
    beta = torch.tensor([0.5])
    with pytest.raises(RuntimeError, match="weight dtype must be float32, float64, bfloat16 or float16"):
        _C.compute_state(torch.ones(4, 8, dtype=torch.int32), beta, None, spec, 16)
    with pytest.raises(RuntimeError, match="weight must be 2-D"):
        _C.compute_state(torch.ones(4, 8, 1), beta, None, spec, 16)
    with pytest.raises(RuntimeError, match="threshold must have 1 entries"):
        _C.blend_weight(torch.ones(4, 8), beta, torch.ones(3), torch.empty(0), None, spec)
    with pytest.raises(RuntimeError, match="isa must be one of"):
        _C.set_isa("sse9")


def test_compute_state_uses_radix_select_not_kthvalue(monkeypatch):
    """The C++ thresholds never call back into torch (kthvalue is what they replace)."""
    monkeypatch.setattr(torch, "kthvalue", None)
    w = torch.randn(40, 50)
    spec = vk.Prune(sparsity=0.5).spec(40, 50)
    assert spec.prune == PRUNE_THRESHOLD
    with vk.backends.use("cpp"):
        t, _ = torch.ops.vcon.compute_state(w, torch.tensor([0.5]), None, *spec.as_args())
    assert float(t) == float(w.abs().reshape(-1).sort(descending=True).values[999])
    assert transforms.kept_count(2000, 0.5) == 1000


# -- build and packaging --------------------------------------------------------------------------
@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump not installed")
def test_avx2_code_stays_in_the_avx2_kernels():
    """No function outside the AVX2 / AVX-512 kernel namespaces may contain AVX2 instructions,
    and none outside the AVX-512 one AVX-512 instructions: they would run (and crash) on a CPU
    without them before any capability check."""
    if "avx2" not in _C.compiled_isas():
        pytest.skip("no AVX2 kernels in this build")
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", _C.__file__], capture_output=True, text=True,
                         check=True).stdout
    offenders, current = set(), ""
    for line in out.splitlines():
        if line.endswith(">:"):
            current = line.split("<", 1)[1][:-2]
        elif ("%zmm" in line or "%k" in line) and "isa_avx512" not in current:
            offenders.add(current)
        elif ("%ymm" in line or "vfmadd" in line) and "isa_avx2" not in current and "isa_avx512" not in current:
            offenders.add(current)
    # kernels_avx2() itself only copies the table out, and is only called after the check.
    offenders.discard("vcon::kernels_avx2()")
    assert not offenders, sorted(offenders)[:10]


FALLBACK_SCRIPT = r"""
import sys, warnings
sys.modules["vcon_kernels._C"] = None          # as if the extension had not been built
import torch, vcon_kernels as vk
layer = vk.VCONLinear.from_linear(torch.nn.Linear(16, 8), vk.Prune(sparsity=0.5))
layer.set_beta(0.5)
x = torch.randn(3, 16)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y = layer(x); y.sum().backward(); layer(x)
with vk.backends.use("torch"):
    assert torch.equal(layer(x), y)
msgs = [str(w.message) for w in caught if "vcon_kernels" in str(w.message)]
assert len(msgs) == 1, msgs
assert "'cpp' backend" in msgs[0] and "not built" in msgs[0] and "\n" not in msgs[0], msgs[0]
try:
    vk.backends.get("cpp")
except RuntimeError as exc:
    assert "not built" in str(exc)
else:
    raise AssertionError("forcing a missing backend must raise")
print("fallback ok")
"""


def test_missing_extension_warns_once_and_falls_back():
    env = {**os.environ, "VCON_BACKEND": ""}
    res = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert res.returncode == 0, res.stderr[-3000:]
    assert "fallback ok" in res.stdout


def test_no_warning_when_extension_is_built(recwarn):
    layer = make_linear("prune_layer")
    layer(torch.randn(2, 53))
    assert not [w for w in recwarn if "vcon_kernels" in str(w.message)]


def test_explain_names_the_lowrank_path():
    layer = make_linear("lowrank")
    with vk.backends.use("cpp"):
        assert "activation space" in vk.explain(layer, (4, 53))
        assert "weight space" in vk.explain(layer, (100_000, 53))
        assert "workspace" in vk.explain(make_linear("prune_layer"), (4, 53))
