"""Triton compute_state kernels: the radix-select threshold and the quantization scales."""

import pytest
import torch
import triton  # noqa: F401  (a missing Triton fails this module, it does not skip it)
from cases import LINEAR_CASES
from cases import make_linear
from cases import set_betas
from triton_helpers import DEVICE
from triton_helpers import TORCH
from triton_helpers import TRITON
from triton_helpers import layer_tensors
from triton_helpers import on_device

from vcon_kernels import ops
from vcon_kernels import torch_transforms as transforms

HALF_AND_FULL = [torch.float32, torch.bfloat16, torch.float16]


def _weights(rows, cols, dtype, seed=0):
    torch.manual_seed(seed)
    w = torch.randn(rows, cols)
    w[1, :7] = 0.0
    w[2, 3:9] = -0.0  # negative zeros have |w| = +0
    return w.to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", HALF_AND_FULL, ids=str)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.97])
def test_threshold_equals_kthvalue(sparsity, per_row, dtype):
    # 23 x 150: per layer 4 programs of one 1024-chunk each (histograms merged by atomics);
    # per row two programs of 16 rows.
    w = _weights(23, 150, dtype)
    got = ops.prune_threshold(w, sparsity, per_row)
    assert got.dtype == torch.float32
    assert torch.equal(got, transforms.prune_threshold(w, sparsity, per_row))


@pytest.mark.parametrize("per_row", [False, True])
def test_threshold_several_chunks_per_program(per_row):
    """Long rows: several programs per row, several chunks per program (per layer)."""
    w = _weights(5, 2100, torch.float32, seed=3)
    for sparsity in (0.1, 0.9):
        assert torch.equal(ops.prune_threshold(w, sparsity, per_row), transforms.prune_threshold(w, sparsity, per_row))


@pytest.mark.parametrize("per_row", [False, True])
def test_threshold_ties_and_empty_keep(per_row):
    torch.manual_seed(1)
    w = torch.randint(-3, 4, (9, 40)).float().to(DEVICE)  # few distinct magnitudes: ties at every threshold
    w[4] = 0.0
    for sparsity in (0.2, 0.5, 0.8, 0.999):  # 0.999 keeps round(40 * 0.001) = 0: threshold +inf
        expected = transforms.prune_threshold(w, sparsity, per_row)
        assert torch.equal(ops.prune_threshold(w, sparsity, per_row), expected)
    assert torch.isinf(ops.prune_threshold(w, 0.999, True)).all()


def test_threshold_rejects_other_dtypes():
    with pytest.raises(TypeError, match="weight dtype must be one of"):
        ops.prune_threshold(torch.randn(3, 4, dtype=torch.float64, device=DEVICE), 0.5, False)


QUANT_CASES = [c for c in sorted(LINEAR_CASES) if "int" in c or "binary" in c]


@pytest.mark.parametrize("dtype", HALF_AND_FULL, ids=str)
@pytest.mark.parametrize("beta", [0.0, 0.37, 1.0])
@pytest.mark.parametrize("case", sorted(LINEAR_CASES))
def test_compute_state_matches_torch_backend(case, beta, dtype):
    """Thresholds and integer scales bit for bit; binary scales (a sum) to a few fp32 ulps."""
    layer = on_device(make_linear(case, dtype=dtype))
    set_betas(layer, beta, 1.0 - beta)
    w, _, beta_t, mask, _, _ = layer_tensors(layer)
    spec = layer.spec()
    thr, scales = TRITON.compute_state(w, beta_t, mask, spec)
    thr_ref, scales_ref = TORCH.compute_state(w, beta_t, mask, spec)
    assert thr.shape == thr_ref.shape and scales.shape == scales_ref.shape
    assert thr.dtype == torch.float32 and scales.dtype == torch.float32
    assert torch.equal(thr, thr_ref)
    if spec.bits == 1:
        torch.testing.assert_close(scales, scales_ref, rtol=1e-6, atol=0)
    else:
        assert torch.equal(scales, scales_ref)


def test_scales_follow_the_prune_blend():
    """Binary scale over W1 = where(M, W, beta_p W): pruned entries count only while beta_p > 0."""
    layer = on_device(make_linear("prune_binary"))
    w, _, _, mask, _, _ = layer_tensors(layer)
    spec = layer.spec()
    for bp in (0.0, 0.5):
        beta = torch.tensor([bp, 0.3], device=DEVICE)
        thr, scales = TRITON.compute_state(w, beta, mask, spec)
        keep = w.abs() >= thr
        w1 = torch.where(keep, w, bp * w)
        expected = w1.abs().sum(1) / (w1 != 0).sum(1).clamp_min(1)
        torch.testing.assert_close(scales.reshape(-1), expected, rtol=1e-6, atol=0)
