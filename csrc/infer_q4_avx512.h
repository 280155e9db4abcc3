// Packed int4 and int8 GEMVs with AVX-512 (part of infer_kernels.h; only the AVX-512 copy
// defines VCON_INFER_AVX512 and includes it, inside its own ISA namespace).
//
// Why a separate kernel: at M = 1 the AVX2 int4 GEMV is compute-bound, not memory-bound
// (2 MiB of codes for a 2048 x 2048 layer): it interleaves the nibbles back into column
// order in registers (unpack + shift + two 8-lane conversions per 16 codes) and, with
// 32-column groups, runs one dependent FMA chain per group. Here 16 bytes (32 codes) give two
// 16-lane vectors as they lie in memory: the low nibbles are the even columns, the high
// nibbles the odd ones. x is permuted once per call to that order instead (per 32 columns:
// the 16 even ones, then the 16 odd ones), so each 32 codes cost ~8 instructions and no
// interleave. Codes are exact (a 16-entry table of float(field + qmin): no qmin * sum(x)
// correction that could cancel), products are fp32, the group's scale is
// applied once per group to its 16-lane partial sum, and two groups at a time go to two
// accumulators so the scale FMA is not one long dependent chain.
#pragma once

// x (M, K) -> xp (M, K): per 32 columns, the even columns then the odd ones. K % 32 == 0.
inline void q4_permute_x(const float* x, int64_t M, int64_t K, float* xp) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int64_t k = 0; k < M * K; k += 32) {
    const __m512 a = _mm512_loadu_ps(x + k), b = _mm512_loadu_ps(x + k + 16);
    _mm512_storeu_ps(xp + k, _mm512_permutex2var_ps(a, even, b));
    _mm512_storeu_ps(xp + k + 16, _mm512_permutex2var_ps(a, odd, b));
  }
}

// The 32 codes of 16 packed bytes as floats: columns 0, 2, .., 30 (lo) and 1, 3, .., 31 (hi).
// `table` holds float(field + qmin) for the 16 fields: vpermps reads only the low 4 bits of
// each index, so the zero-extended byte looks up its low nibble as is and, shifted by 4, its
// high one (one lookup instead of a mask, an add, a sign extension and a conversion).
inline void q4_codes32(const uint8_t* bytes, __m512 table, __m512* lo, __m512* hi) {
  const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  *lo = _mm512_permutexvar_ps(b, table);
  *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), table);
}

inline __m512 q4_table(int qmin) {
  return _mm512_add_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
                       _mm512_set1_ps(static_cast<float>(qmin)));
}

// d[i] = the 16-lane partial dot products of one group (columns k0 .. k0 + g) for MM rows.
template <int MM>
inline void q4_group_dot(const uint8_t* row, const float* xp, int64_t K, int64_t k0, int64_t g, __m512 table,
                         __m512* d) {
  __m512 lo, hi;
  q4_codes32(row + k0 / 2, table, &lo, &hi);
  for (int i = 0; i < MM; ++i) {
    const float* xr = xp + i * K + k0;
    d[i] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(xr)));
  }
  for (int64_t k = k0 + 32; k < k0 + g; k += 32) {
    q4_codes32(row + k / 2, table, &lo, &hi);
    for (int i = 0; i < MM; ++i) {
      const float* xr = xp + i * K + k;
      d[i] = _mm512_add_ps(d[i], _mm512_fmadd_ps(hi, _mm512_loadu_ps(xr + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(xr))));
    }
  }
}

// y[i * N + n] = row n of W . x[i] for MM rows of the permuted x.
template <int MM>
void q4_row_avx512(const InferArgs& a, int64_t n, const float* xp, float* y, int64_t N) {
  const int64_t K = a.cols;
  const int64_t g = a.group_size == 0 ? K : a.group_size;
  const int64_t G = K / g;
  const uint8_t* row = static_cast<const uint8_t*>(a.a) + n * a.a_stride;
  const float* s = a.group_size == 0 ? a.scales : a.scales + n * G;
  const __m512 table = q4_table(a.qmin);
  __m512 t0[MM], t1[MM], d0[MM], d1[MM];
  for (int i = 0; i < MM; ++i) {
    t0[i] = _mm512_setzero_ps();
    t1[i] = _mm512_setzero_ps();
  }
  int64_t j = 0;
  for (; j + 2 <= G; j += 2) {
    q4_group_dot<MM>(row, xp, K, j * g, g, table, d0);
    q4_group_dot<MM>(row, xp, K, (j + 1) * g, g, table, d1);
    const __m512 s0 = _mm512_set1_ps(s[j]), s1 = _mm512_set1_ps(s[j + 1]);
    for (int i = 0; i < MM; ++i) {
      t0[i] = _mm512_fmadd_ps(d0[i], s0, t0[i]);
      t1[i] = _mm512_fmadd_ps(d1[i], s1, t1[i]);
    }
  }
  if (j < G) {
    q4_group_dot<MM>(row, xp, K, j * g, g, table, d0);
    const __m512 s0 = _mm512_set1_ps(s[j]);
    for (int i = 0; i < MM; ++i) {
      t0[i] = _mm512_fmadd_ps(d0[i], s0, t0[i]);
    }
  }
  for (int i = 0; i < MM; ++i) {
    y[i * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(t0[i], t1[i]));
  }
}

// Whether the AVX-512 int4 GEMV takes this storage: groups (or the whole row) of 32k columns.
inline bool q4_avx512_applies(const InferArgs& a) {
  return a.fmt == IF_QPACK && a.bits == 4 && a.cols % 32 == 0 && (a.group_size == 0 || a.group_size % 32 == 0);
}

// Rows n0..n1 of y for M rows of x; `xp` has M * K floats of room.
inline void q4_rows_avx512(const InferArgs& a, const float* x, int64_t M, float* y, int64_t n0, int64_t n1,
                           float* xp) {
  const int64_t K = a.cols, N = a.rows;
  q4_permute_x(x, M, K, xp);
  for (int64_t n = n0; n < n1; ++n) {
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) q4_row_avx512<4>(a, n, xp + i * K, y + i * N, N);
    switch (M - i) {
      case 3: q4_row_avx512<3>(a, n, xp + i * K, y + i * N, N); break;
      case 2: q4_row_avx512<2>(a, n, xp + i * K, y + i * N, N); break;
      case 1: q4_row_avx512<1>(a, n, xp + i * K, y + i * N, N); break;
      default: break;
    }
  }
}

// int8 GEMV with AVX-512: 16 codes per step (one sign-extending load, one conversion, one
// FMA per row of x: half the AVX2 kernel's instructions per weight), the group's scale
// applied once per group, two accumulators per group so the FMA chain is not the limit.
template <int MM>
void q8_row_avx512(const InferArgs& a, int64_t n, const float* x, float* y, int64_t N) {
  const int64_t K = a.cols;
  const int8_t* row = static_cast<const int8_t*>(a.a) + n * a.a_stride;
  __m512 total[MM];
  for (int i = 0; i < MM; ++i) total[i] = _mm512_setzero_ps();
  for_groups(a, n, [&](int64_t k0, int64_t k1, float s) {
    __m512 acc0[MM], acc1[MM];
    for (int i = 0; i < MM; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
    auto step = [&](int64_t k, __m512* acc) {
      const __m512 c = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + k))));
      for (int i = 0; i < MM; ++i) acc[i] = _mm512_fmadd_ps(c, _mm512_loadu_ps(x + i * K + k), acc[i]);
    };
    int64_t k = k0;
    for (; k + 32 <= k1; k += 32) {
      step(k, acc0);
      step(k + 16, acc1);
    }
    if (k < k1) step(k, acc0);
    const __m512 sv = _mm512_set1_ps(s);
    for (int i = 0; i < MM; ++i) total[i] = _mm512_fmadd_ps(_mm512_add_ps(acc0[i], acc1[i]), sv, total[i]);
  });
  for (int i = 0; i < MM; ++i) y[i * N + n] = _mm512_reduce_add_ps(total[i]);
}

// Whether the AVX-512 int8 GEMV takes this storage: 16k columns (groups of 16k or the row).
inline bool q8_avx512_applies(const InferArgs& a) {
  return a.fmt == IF_Q8 && a.cols % 16 == 0 && (a.group_size == 0 || a.group_size % 16 == 0);
}

inline void q8_rows_avx512(const InferArgs& a, const float* x, int64_t M, float* y, int64_t n0, int64_t n1) {
  rows_by_m(a, x, M, y, n0, n1, [&](auto mm, int64_t n, const float* xr, float* yr) {
    q8_row_avx512<decltype(mm)::value>(a, n, xr, yr, a.rows);
  });
}
