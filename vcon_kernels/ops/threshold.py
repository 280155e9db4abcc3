"""The magnitude-pruning threshold by radix select: the k-th largest |W|, per layer or per row.

For non-negative floats the bit pattern orders like the value (subnormals, +0 and -0 included,
once the sign bit is cleared), so the k-th largest |W| is found on the integer bits ("magnitude
bits": 15 for bf16 / fp16, their own 16-bit pattern; 31 for fp32). The result is exactly one of
the |W| (``spec.py``: ``t`` equals the kept-count-th largest magnitude, ties at ``t`` all kept).
The count ``k`` is known on the host (``kept_count`` of the shape), so nothing synchronizes.

Per layer (one segment of up to 2**31 - 1 weights, many programs): a histogram of 16-bit digits
in global memory, one ``atomic_add`` per weight (the compiled loop: ~9 SASS instructions per
weight and pass, against ~90 for ``tl.histogram`` of 8-bit digits, which Triton lowers to a ballot
per digit bit and popcounts per owned bin; ``bench/SM90.md``, radix section). bf16 / fp16 need one
pass (their 15 bits are one digit), fp32 two (bits 30..16, then 15..0 of the weights whose high
digit matched). The last program of a pass to finish (an acq_rel counter) walks the histogram from
the top and picks the digit, so a pass is one launch: 2 launches per threshold for bf16 / fp16 (the
zeroed scratch and the pass), 3 for fp32 (before: 2 per 8-bit digit plus 3 fills: 7, 9 and 11).
The cost moved to the L2's atomic throughput, which only a GPU measures. Digit 0 is never
counted by atomics (zeros, the usual mass of a repeated value, would serialize on one address): its
count is what the other bins leave of the segment. Non-counted weights of the first pass go to a
spread of 1024 unused slots instead of a masked atomic (a masked one compiles to a branch per
weight); a later pass counts the few matching weights with masked atomics.

Per row (a row is short, rows are many): one program per row (several under the interpreter), the
row held in registers, the threshold found bit by bit from the top: ``t | 2**b`` is kept when at
least k magnitudes are >= it, one compare and one add per weight and bit (~5 SASS instructions),
15 or 31 steps, one launch, no histogram and no atomics. Rows longer than ``ROW_BLOCK`` are read
once per bit.

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

# dtype -> (integer view, magnitude bits, the per-layer passes as (shift, digit bits), kind for the kernels)
FORMATS = {
    torch.float32: (torch.int32, 31, ((16, 15), (0, 16)), 0),
    torch.float16: (torch.int16, 15, ((0, 15),), 1),
    torch.bfloat16: (torch.int16, 15, ((0, 15),), 2),
}
BLOCK = 1024 if INTERPRET else 2048
# Programs per layer: enough to fill a GPU several times over, each adding into the shared histogram.
MAX_PROGRAMS = 4 if INTERPRET else 1024
# Unused slots after the histogram that take the non-counted weights of a first pass (see above).
TRASH = 1024
# Scratch words after the histograms: a finish counter per pass, then the prefix and the k left for the next pass.
COUNTERS, PREFIX, K_LEFT = tl.constexpr(0), tl.constexpr(2), tl.constexpr(3)
STATE_WORDS = 4
# Bins the last program reads per step of its walk down the histogram.
SELECT_BLOCK = 1024 if INTERPRET else 4096
# Row blocks: the row is held in registers up to ROW_BLOCK weights (64 per thread at 8 warps) and re-read per
# bit beyond; rows shorter than MIN_ROW_BLOCK are padded to it, so that a GPU compiles one program per power of
# two from 1024 to 16384 (and ``aot_record`` can record every one of them).
MIN_ROW_BLOCK = 16 if INTERPRET else 1024
ROW_BLOCK = 16384
# Rows per program in per-row mode: one on a GPU; several under the interpreter, whose cost is per program.
ROWS_PER_PROGRAM = 16 if INTERPRET else 1


@triton.jit
def _to_threshold(t, KIND: tl.constexpr):
    """Magnitude bits -> the fp32 value they encode (exact: every bf16 / fp16 value is an fp32 value)."""
    if KIND == 0:
        return t.to(tl.float32, bitcast=True)
    if KIND == 1:
        return t.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return (t << 16).to(tl.float32, bitcast=True)


@triton.jit
def _count_chunk(bits_ptr, hist_ptr, start, lanes, one, limit, high, MAG_MASK: tl.constexpr, SHIFT: tl.constexpr,
                 DIGIT_BITS: tl.constexpr, PASS: tl.constexpr, MASKED: tl.constexpr, TRASH: tl.constexpr):
    """Add the digits of weights ``start + lanes`` (those below ``limit`` when MASKED) to the histogram."""
    NBINS: tl.constexpr = 1 << DIGIT_BITS
    # ``lanes * one`` (one == 1, never specialized): the load is not vectorized, so its layout is the
    # atomic's and the weights do not pass through shared memory (8.9 instead of 10.6 SASS per weight)
    ptrs = (bits_ptr + start) + lanes * one
    if MASKED:
        valid = lanes < limit
        bits = (tl.load(ptrs, mask=valid, other=0) & MAG_MASK).to(tl.int32)
    else:
        bits = (tl.load(ptrs) & MAG_MASK).to(tl.int32)
    digit = (bits >> SHIFT) & (NBINS - 1)
    counted = digit != 0  # bin 0's count is what the other bins leave
    if MASKED:
        counted = counted & valid
    if PASS == 0:
        tl.atomic_add(hist_ptr + tl.where(counted, digit, NBINS + (lanes & (TRASH - 1))), 1, sem="relaxed")
    else:
        counted = counted & ((bits >> (SHIFT + DIGIT_BITS)) == high)
        tl.atomic_add(hist_ptr + digit, 1, mask=counted, sem="relaxed")


# n, k and chunks_per_prog depend on the layer's size (chunks_per_prog is 1 for some, 2 or 8 for
# others): unspecialized, one program serves every layer size instead of one per "== 1" case.
# (Not under the interpreter, where specialization means nothing.)
@triton.jit(do_not_specialize=[] if INTERPRET else ["n", "k", "chunks_per_prog", "one"])
def _radix_layer_kernel(bits_ptr, n, k, chunks_per_prog, one, hist_ptr, state_ptr, out_ptr,
                        MAG_MASK: tl.constexpr, SHIFT: tl.constexpr, DIGIT_BITS: tl.constexpr, PASS: tl.constexpr,
                        LAST: tl.constexpr, KIND: tl.constexpr, TRASH: tl.constexpr, BLOCK: tl.constexpr,
                        SELECT_BLOCK: tl.constexpr):
    """One pass over a layer: histogram of one digit; the last program to finish selects it."""
    NBINS: tl.constexpr = 1 << DIGIT_BITS
    lanes = tl.arange(0, BLOCK)
    high = 0
    if PASS > 0:
        high = tl.load(state_ptr + PREFIX) >> (SHIFT + DIGIT_BITS)
    full = n // BLOCK
    first = tl.program_id(0) * chunks_per_prog
    for c in range(first, tl.minimum(first + chunks_per_prog, full)):  # full chunks: no masks
        _count_chunk(bits_ptr, hist_ptr, tl.cast(c, tl.int64) * BLOCK, lanes, one, BLOCK, high, MAG_MASK, SHIFT,
                     DIGIT_BITS, PASS, False, TRASH)
    if (tl.program_id(0) == tl.num_programs(0) - 1) & (full * BLOCK < n):  # the partial chunk
        _count_chunk(bits_ptr, hist_ptr, tl.cast(full, tl.int64) * BLOCK, lanes, one, n - full * BLOCK, high,
                     MAG_MASK, SHIFT, DIGIT_BITS, PASS, True, TRASH)
    # Every thread's atomics precede the barrier; the counter's release orders them before the last
    # program's acquire, whose loads bypass L1 (.cg): it sees every count.
    tl.debug_barrier()
    finished = tl.atomic_add(state_ptr + COUNTERS + PASS, 1, sem="acq_rel")
    if finished == tl.num_programs(0) - 1:
        if PASS == 0:
            k_left = k
            prefix = 0
        else:
            k_left = tl.load(state_ptr + K_LEFT, cache_modifier=".cg")
            prefix = tl.load(state_ptr + PREFIX, cache_modifier=".cg")
        # Walk the bins from the top: the digit is the highest bin with >= k_left weights at or above it.
        bins = tl.arange(0, SELECT_BLOCK)
        above = 0  # weights in the bins above the current block
        digit = 0
        above_digit = -1  # weights above the selected digit; -1: none found (then it is bin 0)
        for j in range(0, NBINS // SELECT_BLOCK):
            base = NBINS - (j + 1) * SELECT_BLOCK
            counts = tl.load(hist_ptr + base + bins, cache_modifier=".cg")
            counts = tl.where(base + bins == 0, 0, counts)
            block_sum = tl.sum(counts)
            at_or_above = above + block_sum - tl.cumsum(counts) + counts
            hit = tl.max(tl.where(at_or_above >= k_left, bins, -1))
            new = (hit >= 0) & (above_digit < 0)
            digit = tl.where(new, base + hit, digit)
            above_digit = tl.where(new, above + tl.sum(tl.where(bins > hit, counts, 0)), above_digit)
            above += block_sum
        # no bin >= 1 reaches k_left: bin 0 does (the segment has >= k_left weights matching the prefix)
        above_digit = tl.where(above_digit < 0, above, above_digit)
        prefix = prefix | (digit << SHIFT)
        if LAST:
            tl.store(out_ptr, _to_threshold(prefix, KIND))
        else:
            tl.store(state_ptr + PREFIX, prefix)
            tl.store(state_ptr + K_LEFT, k_left - above_digit)


# n_rows and k vary from layer to layer without changing the program (k == 1 would make it a constexpr).
@triton.jit(do_not_specialize=[] if INTERPRET else ["n_rows", "k"])
def _radix_rows_kernel(bits_ptr, stride_r, n_rows, n_cols, k, out_ptr, MAG_MASK: tl.constexpr,
                       MAG_BITS: tl.constexpr, KIND: tl.constexpr, SEGS: tl.constexpr, BLOCK: tl.constexpr,
                       ONE_CHUNK: tl.constexpr):
    """Per-row thresholds, bit by bit: the largest t with at least k magnitudes >= t is the k-th largest."""
    rows = tl.program_id(0) * SEGS + tl.arange(0, SEGS)
    row_ok = rows < n_rows
    row_ptrs = bits_ptr + rows[:, None].to(tl.int64) * stride_r
    cols = tl.arange(0, BLOCK)
    t = tl.zeros((SEGS,), dtype=tl.int32)
    if ONE_CHUNK:
        valid = row_ok[:, None] & (cols < n_cols)[None, :]
        bits = (tl.load(row_ptrs + cols[None, :], mask=valid, other=0) & MAG_MASK).to(tl.int32)
        bits = tl.where(valid, bits, -1)  # below every candidate (>= 1)
        for b in range(MAG_BITS - 1, -1, -1):
            cand = t | (1 << b)
            count = tl.sum((bits >= cand[:, None]).to(tl.int32), axis=1)
            t = tl.where(count >= k, cand, t)
    else:
        for b in range(MAG_BITS - 1, -1, -1):
            cand = t | (1 << b)
            count = tl.zeros((SEGS,), dtype=tl.int32)
            for c in range(0, n_cols, BLOCK):
                valid = row_ok[:, None] & (c + cols < n_cols)[None, :]
                bits = (tl.load(row_ptrs + c + cols[None, :], mask=valid, other=0) & MAG_MASK).to(tl.int32)
                count += tl.sum((valid & (bits >= cand[:, None])).to(tl.int32), axis=1)
            t = tl.where(count >= k, cand, t)
    tl.store(out_ptr + rows, _to_threshold(t, KIND), mask=row_ok)


def prune_threshold(weight: torch.Tensor, sparsity: float, per_row: bool) -> torch.Tensor:
    """fp32 threshold(s) of shape (1,) or (N,): ``|W| >= t`` keeps ``round(count * (1 - sparsity))``."""
    if weight.dtype not in FORMATS:
        raise TypeError(f"prune_threshold: weight dtype must be one of {tuple(FORMATS)}, got {weight.dtype}")
    if weight.dim() != 2:
        raise ValueError(f"prune_threshold: weight must be 2-D, got shape {tuple(weight.shape)}")
    rows, cols = weight.shape
    segments, seg_len = (rows, cols) if per_row else (1, rows * cols)
    if seg_len >= 2**31:
        raise ValueError(f"prune_threshold: at most 2**31 - 1 weights per segment, got {seg_len}")
    k = kept_count(seg_len, sparsity)
    shape = (rows,) if per_row else (1,)
    if k == 0 or seg_len == 0 or segments == 0:
        return torch.full(shape, float("inf"), dtype=torch.float32, device=weight.device)
    view, mag_bits, passes, kind = FORMATS[weight.dtype]
    bits = weight.detach().contiguous().view(view)
    out = torch.empty(segments, dtype=torch.float32, device=weight.device)
    mag_mask = (1 << mag_bits) - 1
    if per_row:
        segs = ROWS_PER_PROGRAM
        block = min(ROW_BLOCK, max(MIN_ROW_BLOCK, triton.next_power_of_2(cols)))
        launch(_radix_rows_kernel, (triton.cdiv(rows, segs),), bits_ptr=bits, stride_r=cols, n_rows=rows,
               n_cols=cols, k=k, out_ptr=out, MAG_MASK=mag_mask, MAG_BITS=mag_bits, KIND=kind, SEGS=segs,
               BLOCK=block, ONE_CHUNK=cols <= block, num_warps=8 if block >= 4096 else 4)
        return out.reshape(shape)
    sizes = [(1 << d) + TRASH * (p == 0) for p, (_, d) in enumerate(passes)]
    scratch = torch.zeros(sum(sizes) + STATE_WORDS, dtype=torch.int32, device=weight.device)
    state = scratch[sum(sizes):]
    block = BLOCK  # small layers too (the partial chunk is masked): one program per dtype and pass
    chunks = triton.cdiv(seg_len, block)
    chunks_per_prog = triton.cdiv(chunks, min(chunks, MAX_PROGRAMS))
    progs = triton.cdiv(chunks, chunks_per_prog)
    offset = 0
    for p, (shift, digit_bits) in enumerate(passes):
        launch(_radix_layer_kernel, (progs,), bits_ptr=bits, n=seg_len, k=k, chunks_per_prog=chunks_per_prog, one=1,
               hist_ptr=scratch[offset:], state_ptr=state, out_ptr=out, MAG_MASK=mag_mask, SHIFT=shift,
               DIGIT_BITS=digit_bits, PASS=p, LAST=p == len(passes) - 1, KIND=kind, TRASH=TRASH, BLOCK=block,
               SELECT_BLOCK=min(SELECT_BLOCK, 1 << digit_bits), num_warps=8)
        offset += sizes[p]
    return out.reshape(shape)
