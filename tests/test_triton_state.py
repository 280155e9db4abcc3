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


@pytest.mark.parametrize("dtype", HALF_AND_FULL, ids=str)
@pytest.mark.parametrize("per_row", [False, True])
def test_threshold_several_chunks_per_program(per_row, dtype):
    """Per layer: 4 programs of 3 chunks adding into one histogram, a partial last chunk (10500 weights),
    the last program to finish selecting; per row: rows of 2100."""
    w = _weights(5, 2100, dtype, seed=3)
    for sparsity in (0.1, 0.9):
        assert torch.equal(ops.prune_threshold(w, sparsity, per_row), transforms.prune_threshold(w, sparsity, per_row))


# The smallest subnormal and a mid subnormal of each dtype, and its largest finite value.
EXTREMES = {torch.float32: (1.4e-45, 3.0e-39, 3.0e38), torch.float16: (6e-8, 3.0e-6, 65504.0),
            torch.bfloat16: (9.2e-41, 3.0e-39, 3.0e38)}


def _edge_weights(rows, cols, dtype, seed=0):
    """Mostly zeros of both signs, subnormals of the dtype, ties, a few normal values and the largest one."""
    torch.manual_seed(seed)
    tiny, sub, big = EXTREMES[dtype]
    choices = torch.tensor([0.0, -0.0, tiny, -tiny, sub, -sub, 0.5, -0.5, 1.0, big])
    pick = torch.randint(0, len(choices), (rows, cols))
    pick[torch.rand(rows, cols) < 0.5] = 0  # half the weights +0 (or -0 below)
    w = choices[pick]
    w[torch.rand(rows, cols) < 0.2] *= -1
    return w.to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("dtype", HALF_AND_FULL, ids=str)
@pytest.mark.parametrize("per_row", [False, True])
def test_threshold_zeros_subnormals_ties(per_row, dtype):
    """Thresholds at +0 (reached through -0), at subnormals and at ties; k = 1 and k = all. Per layer the
    zero bin is never counted by atomics (its count is the remainder), in fp32 also in the second pass."""
    w = _edge_weights(9, 77, dtype)
    for sparsity in (0.0, 0.1, 0.4, 0.6, 0.75, 0.9, 0.98, 1 - 1 / w.numel(), 1 - 1 / 77):
        expected = transforms.prune_threshold(w, sparsity, per_row)
        assert torch.equal(ops.prune_threshold(w, sparsity, per_row), expected), sparsity


@pytest.mark.parametrize("dtype", HALF_AND_FULL, ids=str)
@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("value", [0.0, -0.0, 0.3, -2.5])
def test_threshold_all_equal(value, per_row, dtype):
    w = torch.full((6, 35), value, dtype=dtype, device=DEVICE)
    for sparsity in (0.0, 0.5, 0.99):
        expected = transforms.prune_threshold(w, sparsity, per_row)
        assert torch.equal(ops.prune_threshold(w, sparsity, per_row), expected)


@pytest.mark.parametrize("shape", [(1, 1), (1, 3), (3, 1), (7, 13)])
@pytest.mark.parametrize("per_row", [False, True])
def test_threshold_odd_sizes(shape, per_row):
    w = _weights(max(shape[0], 3), shape[1], torch.bfloat16, seed=5)[:shape[0]].contiguous()
    for sparsity in (0.0, 0.5):
        expected = transforms.prune_threshold(w, sparsity, per_row)
        assert torch.equal(ops.prune_threshold(w, sparsity, per_row), expected)


@pytest.mark.parametrize("dtype", HALF_AND_FULL, ids=str)
def test_threshold_rows_longer_than_a_block(monkeypatch, dtype):
    """Rows longer than ROW_BLOCK are read once per bit instead of held in registers."""
    from vcon_kernels.ops import threshold

    monkeypatch.setattr(threshold, "ROW_BLOCK", 64)
    w = _weights(18, 150, dtype, seed=2)
    w[3] = 0.0
    for sparsity in (0.0, 0.3, 0.97):
        assert torch.equal(ops.prune_threshold(w, sparsity, True), transforms.prune_threshold(w, sparsity, True))


@pytest.mark.parametrize("dtype,passes", [(torch.float32, 2), (torch.bfloat16, 1), (torch.float16, 1)], ids=str)
def test_threshold_launches_and_no_host_sync(monkeypatch, dtype, passes):
    """Per layer one launch per 16-bit digit (the select runs in the last program), per row one launch;
    the launcher never reads a device value (k comes from the shape)."""
    from vcon_kernels.ops.utils import capture_launches

    def forbidden(*args, **kwargs):
        raise AssertionError("prune_threshold read a device value on the host")

    w = torch.randn(256, 2048, dtype=dtype)
    for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for per_row, expected in ((False, passes), (True, 1)):
        records: list = []
        with capture_launches(records):
            out = ops.prune_threshold(w, 0.9, per_row)
        assert len(records) == expected, [k.__name__ for k, _ in records]
        assert out.shape == ((256,) if per_row else (1,))


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
