"""The magnitude-pruning threshold by radix select: the k-th largest |W|, per layer or per row.

For non-negative floats the fp32 bit pattern orders like the value, so the k-th largest
|W| is found digit by digit, 8 bits at a time from the top: a histogram pass counts, per
segment (the layer, or each row), the next digit of every |W| whose higher digits match
the prefix found so far; a one-program-per-segment select pass walks the 256 bins from
the top to the bin that holds the k-th largest, appends that digit to the prefix and
subtracts the count above it from k. After the last digit the prefix *is* the threshold,
exactly one of the |W| (``spec.py``: ``t`` equals the kept-count-th largest magnitude,
ties at ``t`` all kept).

Passes: 4 for fp32 weights, 3 for fp16 (its |W| has 13 trailing zero bits as fp32), 2 for
bf16 (16). Each pass reads the weight once, with no host synchronization; the count k
lives on the device. ``torch.kthvalue`` is the reference (``bench/bench_gpu.py`` times both).

Example usage::

    t = prune_threshold(weight, sparsity=0.9, per_row=False)      # shape (1,), fp32
    keep = weight.abs().float() >= t
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..torch_transforms import kept_count
from .utils import INTERPRET
from .utils import launch

DIGIT_BITS = 8
NUM_BINS = 1 << DIGIT_BITS
SHIFTS = {torch.float32: (24, 16, 8, 0), torch.float16: (24, 16, 8), torch.bfloat16: (24, 16)}
BLOCK = 1024 if INTERPRET else 2048
# Programs per segment are capped so that a whole-layer histogram is not 10^4 programs all
# adding into the same 256 counters.
MAX_PROGRAMS = 4 if INTERPRET else 1024
# Rows per program in per-row mode: one on a GPU (rows are many and long); several under the
# interpreter, whose cost is per program (digits are offset by 256 per row: one histogram).
ROWS_PER_PROGRAM = 16 if INTERPRET else 1


# chunks_per_prog is a loop trip count that depends on the layer's size (1 for some, 2 or 8 for
# others): unspecialized, one program serves every layer size instead of one per "== 1" case.
# (Not under the interpreter, where specialization means nothing.)
@triton.jit(do_not_specialize=[] if INTERPRET else ["chunks_per_prog"])
def _radix_histogram_kernel(w_ptr, stride_r, n_segments, seg_len, chunks_per_prog, prefix_ptr, hist_ptr,
                            SHIFT: tl.constexpr, PER_ROW: tl.constexpr, SEGS: tl.constexpr, BLOCK: tl.constexpr):
    local = tl.arange(0, SEGS)
    segs = tl.program_id(0) * SEGS + local
    seg_ok = segs < n_segments
    prefix = tl.load(prefix_ptr + segs, mask=seg_ok, other=0)
    counts = tl.zeros((SEGS * 256,), dtype=tl.int32)
    first = tl.program_id(1).to(tl.int64) * chunks_per_prog
    for i in range(0, chunks_per_prog):
        offs = (first + i) * BLOCK + tl.arange(0, BLOCK)
        valid = seg_ok[:, None] & (offs < seg_len)[None, :]
        if PER_ROW:
            ptrs = w_ptr + segs[:, None].to(tl.int64) * stride_r + offs[None, :]
        else:
            ptrs = w_ptr + tl.broadcast_to(offs[None, :], (SEGS, BLOCK))
        w = tl.load(ptrs, mask=valid, other=0.0).to(tl.float32)
        bits = tl.abs(w).to(tl.int32, bitcast=True)
        if SHIFT < 24:  # only values whose higher digits equal the prefix found so far
            valid = valid & ((bits >> (SHIFT + 8)) == (prefix[:, None] >> (SHIFT + 8)))
        digit = ((bits >> SHIFT) & 255) + local[:, None] * 256
        counts += tl.histogram(tl.reshape(digit, (SEGS * BLOCK,)), SEGS * 256,
                               mask=tl.reshape(valid, (SEGS * BLOCK,)))
    bins = tl.arange(0, SEGS * 256)
    first_seg = tl.program_id(0) * SEGS
    tl.atomic_add(hist_ptr + first_seg * 256 + bins, counts, mask=(first_seg + bins // 256) < n_segments)


@triton.jit
def _radix_select_kernel(hist_ptr, prefix_ptr, k_ptr, out_ptr, n_segments,
                         SHIFT: tl.constexpr, LAST: tl.constexpr, SEGS: tl.constexpr):
    segs = tl.program_id(0) * SEGS + tl.arange(0, SEGS)
    seg_ok = segs < n_segments
    bins = tl.arange(0, 256)
    ptrs = hist_ptr + segs[:, None] * 256 + bins[None, :]
    ok = seg_ok[:, None] & (bins[None, :] < 256)
    counts = tl.load(ptrs, mask=ok, other=0)
    tl.store(ptrs, tl.zeros_like(counts), mask=ok)  # ready for the next pass
    k = tl.load(k_ptr + segs, mask=seg_ok, other=1)
    at_or_above = tl.sum(counts, axis=1)[:, None] - tl.cumsum(counts, axis=1) + counts
    digit = tl.max(tl.where(at_or_above >= k[:, None], bins[None, :], -1), axis=1)
    above = tl.sum(tl.where(bins[None, :] > digit[:, None], counts, 0), axis=1)
    prefix = tl.load(prefix_ptr + segs, mask=seg_ok, other=0) | (digit << SHIFT)
    tl.store(prefix_ptr + segs, prefix, mask=seg_ok)
    tl.store(k_ptr + segs, k - above, mask=seg_ok)
    if LAST:
        tl.store(out_ptr + segs, prefix.to(tl.float32, bitcast=True), mask=seg_ok)


def prune_threshold(weight: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """fp32 threshold(s) of shape (1,) or (N,): ``|W| >= t`` keeps ``round(count * (1 - sparsity))``."""
    if weight.dtype not in SHIFTS:
        raise TypeError(f"prune_threshold: weight dtype must be one of {tuple(SHIFTS)}, got {weight.dtype}")
    w = weight.detach().contiguous()
    rows, cols = w.shape
    segments, seg_len = (rows, cols) if per_row else (1, rows * cols)
    if seg_len >= 2**31:
        raise ValueError(f"prune_threshold: at most 2**31 - 1 weights per segment, got {seg_len}")
    k = kept_count(seg_len, sparsity)
    shape = (rows,) if per_row else (1,)
    device = w.device
    if k == 0 or seg_len == 0:
        return torch.full(shape, float("inf"), dtype=torch.float32, device=device)
    prefix = torch.zeros(segments, dtype=torch.int32, device=device)
    k_left = torch.full((segments,), k, dtype=torch.int32, device=device)
    hist = torch.zeros(segments, NUM_BINS, dtype=torch.int32, device=device)
    out = torch.empty(segments, dtype=torch.float32, device=device)
    segs_per_prog = ROWS_PER_PROGRAM if per_row else 1
    seg_progs = triton.cdiv(segments, segs_per_prog)
    block = min(BLOCK, triton.next_power_of_2(seg_len))
    chunks = triton.cdiv(seg_len, block)
    progs = max(1, min(chunks, MAX_PROGRAMS // seg_progs))
    chunks_per_prog = triton.cdiv(chunks, progs)
    progs = triton.cdiv(chunks, chunks_per_prog)
    shifts = SHIFTS[w.dtype]
    for i, shift in enumerate(shifts):
        launch(_radix_histogram_kernel, (seg_progs, progs), w_ptr=w, stride_r=cols, n_segments=segments,
               seg_len=seg_len, chunks_per_prog=chunks_per_prog, prefix_ptr=prefix, hist_ptr=hist, SHIFT=shift,
               PER_ROW=per_row, SEGS=segs_per_prog, BLOCK=block, num_warps=8)
        launch(_radix_select_kernel, (seg_progs,), hist_ptr=hist, prefix_ptr=prefix, k_ptr=k_left, out_ptr=out,
               n_segments=segments, SHIFT=shift, LAST=i == len(shifts) - 1, SEGS=segs_per_prog, num_warps=4)
    return out.reshape(shape)
