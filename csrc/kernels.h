// The per-row kernels of the blended weight, written once with at::vec::Vectorized and
// compiled once per ISA (kernels_default.cpp, kernels_avx2.cpp). VCON_ISA names the
// namespace, so the two copies never share a symbol.
//
// One pass over W: each row is loaded once (converted to the compute dtype C = float, or
// double for fp64 weights), pruned, quantized and blended in registers, and stored once:
//
//   prune:    W1 = where(M, W, beta_p * W)          M from |W| >= t, N:M ranks, or stored bits
//   quantize: Q  = clamp(round_half_even(W1 / s'), qmin, qmax) * s     (bits > 1)
//             Q  = s * sign(W1)                                        (bits == 1)
//             W_eff = beta_q * W1 + (1 - beta_q) * Q
//
// Bit-identical to vcon_kernels/transforms.py: every product and sum is rounded once, in
// the same order as the torch expression, and the build passes -ffp-contract=off so that
// `a * b + c * d` is never fused into an FMA (one rounding fewer, a different result).
// IEEE division (not a multiply by 1/s) and round-half-even (Vectorized::round) as torch.
#pragma once

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "vcon.h"

#ifndef VCON_ISA
#error "define VCON_ISA (the namespace of this copy of the kernels) before including kernels.h"
#endif

namespace vcon {
namespace VCON_ISA {

using at::vec::Vectorized;

template <typename T>
struct ComputeType {
  using type = float;
};
template <>
struct ComputeType<double> {
  using type = double;
};
template <typename T>
using compute_t = typename ComputeType<T>::type;

// Compute-dtype rows carved out of the caller's scratch block (see row_scratch_bytes):
// two for converted rows, one for a 0/1 keep-mask followed by a padded |W| row (N:M).
// The caller allocates it: this file allocates nothing.
template <typename C>
struct RowScratch {
  C* a;
  C* b;
  C* keep;
  RowScratch(void* base, int64_t cols) {
    auto p = (reinterpret_cast<uintptr_t>(base) + 63) & ~uintptr_t(63);
    a = reinterpret_cast<C*>(p);
    b = a + cols;
    keep = b + cols;
  }
};

// -- row loads and stores in the compute dtype ------------------------------------------------
template <typename T>
inline void to_float(const T* src, float* dst, int64_t n) {
  using VT = Vectorized<T>;
  using VF = Vectorized<float>;
  int64_t i = 0;
  for (; i + VT::size() <= n; i += VT::size()) {
    auto halves = at::vec::convert_to_float<T>(VT::loadu(src + i));
    std::get<0>(halves).store(dst + i);
    std::get<1>(halves).store(dst + i + VF::size());
  }
  for (; i < n; ++i) {
    dst[i] = static_cast<float>(src[i]);
  }
}

// Pointer to row `src` in the compute dtype: the row itself, or its conversion in `buf`.
template <typename T, typename C>
inline const C* load_row(const T* src, C* buf, int64_t n) {
  if constexpr (std::is_same_v<T, C>) {
    return src;
  } else {
    to_float(src, buf, n);
    return buf;
  }
}

// Where the compute-dtype result of a row goes: the output row itself, or `buf`.
template <typename T, typename C>
inline C* dest_row(T* out, C* buf) {
  if constexpr (std::is_same_v<T, C>) {
    return out;
  } else {
    return buf;
  }
}

// Round the compute-dtype row into the output (round-to-nearest-even, as Tensor.to()).
template <typename T, typename C>
inline void store_row(const C* src, T* out, int64_t n) {
  if constexpr (!std::is_same_v<T, C>) {
    at::vec::convert(src, out, n);
  }
}

// -- keep-masks ---------------------------------------------------------------------------------
template <typename C>
inline C magnitude(C x) {
  return x < C(0) ? -x : x;
}

// N:M: keep element i of each group of m when #{j: |w_j| > |w_i|} + #{j < i: |w_j| == |w_i|} < n.
//
// Vectorized without shuffles: for d = 1 .. m-1, the partner of the entry at position p
// of its group is the entry at position (p + d) mod m, i.e. d entries ahead, or m - d
// behind when p + d wraps past the group end. Two unaligned loads of |W| (from `absw`,
// padded by kNmPad entries on both sides) and a per-lane blend give the partners of a
// whole vector; the partner beats the entry when it is larger, or equal with a lower
// index (exactly when the position wrapped). Ranks are small integers, exact in float.
constexpr int64_t kNmPad = 64;

template <typename C>
inline void nm_keep_row(const C* w, int64_t cols, int n, int m, C* absw, C* keep) {
  using V = Vectorized<C>;
  if (m > 32) {  // rare: insertion sort of each group's indices by (|w| desc, index asc)
    C a[256];
    uint16_t order[256];
    for (int64_t g = 0; g < cols; g += m) {
      for (int j = 0; j < m; ++j) {
        a[j] = magnitude(w[g + j]);
        int p = j;
        while (p > 0 && a[order[p - 1]] < a[j]) {
          order[p] = order[p - 1];
          --p;
        }
        order[p] = static_cast<uint16_t>(j);
        keep[g + j] = C(0);
      }
      for (int j = 0; j < n; ++j) {
        keep[g + order[j]] = C(1);
      }
    }
    return;
  }
  constexpr int64_t L = V::size();
  for (int64_t i = 0; i < kNmPad; ++i) {
    absw[i] = C(0);
    absw[kNmPad + cols + i] = C(0);
  }
  C* a = absw + kNmPad;
  int64_t i = 0;
  for (; i + L <= cols; i += L) {
    V::loadu(w + i).abs().store(a + i);
  }
  if (i < cols) {
    V::loadu(w + i, cols - i).abs().store(a + i, cols - i);
  }
  // Position in its group of each lane, for each start offset i mod m.
  C pos[32 * L];
  for (int s0 = 0; s0 < m; ++s0) {
    for (int64_t l = 0; l < L; ++l) {
      pos[s0 * L + l] = static_cast<C>((s0 + l) % m);
    }
  }
  const V vm(static_cast<C>(m)), vn(static_cast<C>(n));
  for (i = 0; i < cols; i += L) {
    const V x = V::loadu(a + i);
    const V p = V::loadu(pos + (i % m) * L);
    V rank(C(0));
    for (int d = 1; d < m; ++d) {
      const V wrapped = (p + V(static_cast<C>(d))).ge(vm);  // 1.0 where p + d >= m
      const V partner = V::blendv(V::loadu(a + i + d), V::loadu(a + i + d - m), wrapped != V(C(0)));
      rank = rank + partner.gt(x) + partner.eq(x) * wrapped;
    }
    const V kept = rank.lt(vn);
    if (i + L <= cols) {
      kept.store(keep + i);
    } else {
      kept.store(keep + i, cols - i);
    }
  }
}

template <typename C>
inline void keep_row(const RowArgs& a, int64_t r, const C* w, C* keep) {
  if (a.prune == PRUNE_NM) {
    nm_keep_row(w, a.cols, a.nm_n, a.nm_m, keep + a.cols, keep);
  } else {  // PRUNE_MASK: bit i % 8 of byte i / 8 (vcon_kernels/packing.py)
    const uint8_t* bits = a.mask + r * a.mask_stride;
    for (int64_t i = 0; i < a.cols; ++i) {
      keep[i] = static_cast<C>((bits[i >> 3] >> (i & 7)) & 1);
    }
  }
}

// W1 = where(M, W, beta_p * W) for row r, into w1.
template <typename C>
inline void prune_row(const RowArgs& a, int64_t r, const C* w, C* w1, C bp, C* keep) {
  using V = Vectorized<C>;
  const int64_t n = a.cols;
  if (a.prune == PRUNE_THRESHOLD) {
    const C t = static_cast<const C*>(a.threshold)[a.threshold_per_row ? r : 0];
    const V vt(t), vbp(bp);
    int64_t i = 0;
    for (; i + V::size() <= n; i += V::size()) {
      V x = V::loadu(w + i);
      V::blendv(x * vbp, x, x.abs() >= vt).store(w1 + i);
    }
    if (i < n) {
      V x = V::loadu(w + i, n - i);
      V::blendv(x * vbp, x, x.abs() >= vt).store(w1 + i, n - i);
    }
    return;
  }
  keep_row(a, r, w, keep);
  const V vbp(bp), zero(C(0));
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    V x = V::loadu(w + i);
    V::blendv(x * vbp, x, V::loadu(keep + i) != zero).store(w1 + i);
  }
  if (i < n) {
    V x = V::loadu(w + i, n - i);
    V::blendv(x * vbp, x, V::loadu(keep + i, n - i) != zero).store(w1 + i, n - i);
  }
}

// -- quantization ---------------------------------------------------------------------------------
// The scale of group g of row r (one scale for the tensor when a.group == 0).
inline float scale_of(const RowArgs& a, int64_t r, int64_t g) {
  return a.group == 0 ? a.scales[0] : a.scales[r * a.groups_per_row + g];
}

inline int64_t group_len(const RowArgs& a) {
  return a.group == 0 ? a.cols : a.group;
}

// out = beta_q * W1 + (1 - beta_q) * Q(W1) over one quantization group of n entries.
template <typename C>
inline void quant_blend_segment(const RowArgs& a, const C* w1, C* out, int64_t n, C s, C bq, C omb) {
  using V = Vectorized<C>;
  const V vbq(bq), vomb(omb), vs(s);
  const V zero(C(0));
  if (a.bits == 1) {
    const V neg(-s);
    auto body = [&](const V& x) { return vbq * x + vomb * V::blendv(V::blendv(zero, vs, x > zero), neg, x < zero); };
    int64_t i = 0;
    for (; i + V::size() <= n; i += V::size()) {
      body(V::loadu(w1 + i)).store(out + i);
    }
    if (i < n) {
      body(V::loadu(w1 + i, n - i)).store(out + i, n - i);
    }
    return;
  }
  const V div(s > C(0) ? s : C(1)), lo(C(a.qmin)), hi(C(a.qmax));
  auto body = [&](const V& x) { return vbq * x + vomb * (at::vec::clamp((x / div).round(), lo, hi) * vs); };
  int64_t i = 0;
  for (; i + V::size() <= n; i += V::size()) {
    body(V::loadu(w1 + i)).store(out + i);
  }
  if (i < n) {
    body(V::loadu(w1 + i, n - i)).store(out + i, n - i);
  }
}

// -- kernels ----------------------------------------------------------------------------------------
// T: the weight's dtype; O: the output's (T itself, or bf16/fp16 from an fp32 weight under
// autocast: the row is computed in fp32 and rounded once, as `blend(W).to(O)` in torch).
template <typename T, typename O = T>
void blend_rows(const RowArgs& a, const void* weight, void* out, int64_t r0, int64_t r1, void* scratch) {
  using C = compute_t<T>;
  const int64_t cols = a.cols;
  RowScratch<C> buf(scratch, cols);
  const C bp = static_cast<C>(a.beta_prune);
  const C bq = static_cast<C>(a.beta_quant);
  const C omb = C(1) - bq;
  const int64_t glen = group_len(a);
  for (int64_t r = r0; r < r1; ++r) {
    const T* src_row = static_cast<const T*>(weight) + r * cols;
    O* out_row = static_cast<O*>(out) + r * cols;
    const C* w = load_row(src_row, buf.a, cols);
    C* dst = dest_row(out_row, buf.b);
    const C* w1 = w;
    if (a.prune != PRUNE_NONE) {
      prune_row(a, r, w, dst, bp, buf.keep);
      w1 = dst;
    }
    if (a.bits != 0) {
      for (int64_t g0 = 0, g = 0; g0 < cols; g0 += glen, ++g) {
        const C s = static_cast<C>(scale_of(a, r, g));
        quant_blend_segment(a, w1 + g0, dst + g0, glen, s, bq, omb);
      }
    } else if (a.prune == PRUNE_NONE) {
      if constexpr (std::is_same_v<O, C>) {
        std::memmove(dst, w, cols * sizeof(C));
      } else {  // identity blend into a lower dtype: the conversion is the whole job
        store_row(w, out_row, cols);
        continue;
      }
    }
    store_row(dst, out_row, cols);
  }
}

// grad *= dW_eff/dW (exact mode): where(M, 1, beta_p) * (beta_q + (1 - beta_q) R), R = codes in range.
// Binary quantization alone has coefficient 1 and is never called here.
template <typename T>
void coef_rows(const RowArgs& a, const void* weight, void* grad, int64_t r0, int64_t r1, void* scratch) {
  using C = compute_t<T>;
  using V = Vectorized<C>;
  const int64_t cols = a.cols;
  RowScratch<C> buf(scratch, cols);
  const C bp = static_cast<C>(a.beta_prune);
  const C bq = static_cast<C>(a.beta_quant);
  const C omb = C(1) - bq;
  const bool quant_coef = a.bits > 1;
  const int64_t glen = group_len(a);
  const V one(C(1)), vbp(bp), vbq(bq), vomb(omb), lo(C(a.qmin)), hi(C(a.qmax));
  for (int64_t r = r0; r < r1; ++r) {
    const C* w = load_row(static_cast<const T*>(weight) + r * cols, buf.a, cols);
    T* grad_row = static_cast<T*>(grad) + r * cols;
    // buf.b holds the gradient row in the compute dtype (or is the row itself).
    C* g = dest_row(grad_row, buf.b);
    if constexpr (!std::is_same_v<T, C>) {
      to_float(grad_row, g, cols);
    }
    bool threshold_keep = a.prune == PRUNE_THRESHOLD;
    C t = C(0);
    if (threshold_keep) {
      t = static_cast<const C*>(a.threshold)[a.threshold_per_row ? r : 0];
    } else if (a.prune != PRUNE_NONE) {
      keep_row(a, r, w, buf.keep);
    }
    const V vt(t);
    for (int64_t g0 = 0, gi = 0; g0 < cols; g0 += glen, ++gi) {
      V div(C(1));
      if (quant_coef) {
        const C s = static_cast<C>(scale_of(a, r, gi));
        div = V(s > C(0) ? s : C(1));
      }
      const int64_t end = g0 + glen;
      for (int64_t i = g0; i < end; i += V::size()) {
        const int64_t len = end - i < V::size() ? end - i : V::size();
        V x = V::loadu(w + i, len);
        V pc = one;
        V x1 = x;
        if (a.prune != PRUNE_NONE) {
          V keep;
          if (threshold_keep) {
            keep = x.abs() >= vt;
          } else {
            keep = V::loadu(buf.keep + i, len) == one;
          }
          pc = V::blendv(vbp, one, keep);
          x1 = V::blendv(x * vbp, x, keep);
        }
        V coef = pc;
        if (quant_coef) {
          V code = (x1 / div).round();
          V qc = vbq + vomb * (code.ge(lo) * code.le(hi));
          coef = a.prune != PRUNE_NONE ? pc * qc : qc;
        }
        (V::loadu(g + i, len) * coef).store(g + i, len);
      }
    }
    store_row(g, grad_row, cols);
  }
}

// Scale statistics of W1 per (row, group): amax |W1| (bits > 1), or sum |W1| and the
// non-zero count (bits == 1). Sums accumulate in the vector dtype over blocks of 1024
// entries and in double across blocks.
template <typename T>
void stats_rows(const RowArgs& a, const void* weight, double* stat, int64_t* count, int64_t r0, int64_t r1,
                void* scratch) {
  using C = compute_t<T>;
  using V = Vectorized<C>;
  const int64_t cols = a.cols;
  RowScratch<C> buf(scratch, cols);
  const C bp = static_cast<C>(a.beta_prune);
  const int64_t glen = group_len(a);
  const int64_t per_row = a.group == 0 ? 1 : a.groups_per_row;
  for (int64_t r = r0; r < r1; ++r) {
    const C* w1 = load_row(static_cast<const T*>(weight) + r * cols, buf.a, cols);
    if (a.prune != PRUNE_NONE) {
      prune_row(a, r, w1, buf.b, bp, buf.keep);
      w1 = buf.b;
    }
    for (int64_t g0 = 0, g = 0; g0 < cols; g0 += glen, ++g) {
      const int64_t end = g0 + glen;
      const int64_t out = r * per_row + g;
      if (a.bits > 1) {
        V m(C(0));
        for (int64_t i = g0; i < end; i += V::size()) {
          const int64_t len = end - i < V::size() ? end - i : V::size();
          m = at::vec::maximum(m, V::loadu(w1 + i, len).abs());
        }
        C lanes[V::size()];
        m.store(lanes);
        C best = lanes[0];
        for (int64_t j = 1; j < V::size(); ++j) {
          best = lanes[j] > best ? lanes[j] : best;
        }
        stat[out] = static_cast<double>(best);
      } else {
        double total = 0.0;
        int64_t nonzero = 0;
        const V zero(C(0));
        for (int64_t b0 = g0; b0 < end; b0 += 1024) {
          const int64_t b1 = b0 + 1024 < end ? b0 + 1024 : end;
          V acc(C(0)), cnt(C(0));
          for (int64_t i = b0; i < b1; i += V::size()) {
            const int64_t len = b1 - i < V::size() ? b1 - i : V::size();
            V x = V::loadu(w1 + i, len);  // zero-filled tail: adds 0, counts nothing
            acc = acc + x.abs();
            cnt = cnt + x.ne(zero);
          }
          C lanes[V::size()], counts[V::size()];
          acc.store(lanes);
          cnt.store(counts);
          for (int64_t j = 0; j < V::size(); ++j) {
            total += static_cast<double>(lanes[j]);
            nonzero += static_cast<int64_t>(counts[j]);
          }
        }
        stat[out] = total;
        count[out] = nonzero;
      }
    }
  }
}

template <typename T>
void axpby(const void* xv, const void* yv, void* outv, int64_t n, double a, double b) {
  using C = compute_t<T>;
  using V = Vectorized<C>;
  const T* x = static_cast<const T*>(xv);
  const T* y = static_cast<const T*>(yv);
  T* out = static_cast<T*>(outv);
  const V va(static_cast<C>(a)), vb(static_cast<C>(b));
  constexpr int64_t kChunk = 256;  // reduced-precision inputs are widened a chunk at a time
  C bx[kChunk], by[kChunk], bo[kChunk];
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t len = n - c0 < kChunk ? n - c0 : kChunk;
    const C* px = load_row(x + c0, bx, len);
    const C* py = load_row(y + c0, by, len);
    C* po = dest_row(out + c0, bo);
    int64_t i = 0;
    for (; i + V::size() <= len; i += V::size()) {
      (va * V::loadu(px + i) + vb * V::loadu(py + i)).store(po + i);
    }
    if (i < len) {
      (va * V::loadu(px + i, len - i) + vb * V::loadu(py + i, len - i)).store(po + i, len - i);
    }
    store_row(po, out + c0, len);
  }
}

inline KernelTable make_table(const char* isa) {
  KernelTable t{};
  t.isa = isa;
  t.blend[DT_FLOAT] = &blend_rows<float>;
  t.blend[DT_DOUBLE] = &blend_rows<double>;
  t.blend[DT_BFLOAT16] = &blend_rows<c10::BFloat16>;
  t.blend[DT_HALF] = &blend_rows<c10::Half>;
  t.blend_from_float[DT_BFLOAT16] = &blend_rows<float, c10::BFloat16>;
  t.blend_from_float[DT_HALF] = &blend_rows<float, c10::Half>;
  t.coef[DT_FLOAT] = &coef_rows<float>;
  t.coef[DT_DOUBLE] = &coef_rows<double>;
  t.coef[DT_BFLOAT16] = &coef_rows<c10::BFloat16>;
  t.coef[DT_HALF] = &coef_rows<c10::Half>;
  t.stats[DT_FLOAT] = &stats_rows<float>;
  t.stats[DT_DOUBLE] = &stats_rows<double>;
  t.stats[DT_BFLOAT16] = &stats_rows<c10::BFloat16>;
  t.stats[DT_HALF] = &stats_rows<c10::Half>;
  t.axpby[DT_FLOAT] = &axpby<float>;
  t.axpby[DT_DOUBLE] = &axpby<double>;
  t.axpby[DT_BFLOAT16] = &axpby<c10::BFloat16>;
  t.axpby[DT_HALF] = &axpby<c10::Half>;
  return t;
}

}  // namespace VCON_ISA
}  // namespace vcon
