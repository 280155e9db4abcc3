// 2:4 GEMV with AVX-512 (part of infer_kernels.h; only the AVX-512 copy includes it).
//
// Why: at M = 1 the AVX2 2:4 kernel spends ~12 instructions per 8 kept weights (two x loads,
// two permutes and a blend to pick the kept columns, the index unpack, the value conversion),
// so once the codes are in cache (a 2048 x 2048 layer's are) it is slower than dense's 4
// instructions per 16 weights. Here one vpermt2ps picks the 16 x values of 16 kept weights
// straight out of the 32 columns they come from (two 16-lane loads), with the index of kept
// value j = 4 * (j / 2) + its 2-bit position: ~9 instructions per 16 kept weights.
#pragma once

// 16 values of an N:M value array at element i as floats (fp32, bf16, fp16 or int8 codes).
template <int VT>
inline __m512 nm_values16(const void* base, int64_t i) {
  if constexpr (VT == IV_F32) {
    return _mm512_loadu_ps(static_cast<const float*>(base) + i);
  } else if constexpr (VT == IV_BF16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else if constexpr (VT == IV_F16) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(base) + i)));
  } else {  // int8 codes
    return _mm512_cvtepi32_ps(
        _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(base) + i))));
  }
}

// The lane of each of the 16 kept values of 32 columns, from their 32 bits of 2-bit positions.
inline __m512i nm24_lanes(const uint8_t* idx) {
  uint32_t bits;
  std::memcpy(&bits, idx, 4);
  const __m512i shifts = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i base = _mm512_setr_epi32(0, 0, 4, 4, 8, 8, 12, 12, 16, 16, 20, 20, 24, 24, 28, 28);
  const __m512i pos = _mm512_and_si512(_mm512_srlv_epi32(_mm512_set1_epi32(static_cast<int>(bits)), shifts),
                                       _mm512_set1_epi32(3));
  return _mm512_add_epi32(pos, base);
}

// Row n of a 2:4 storage times MM rows of x. VT: value type or IV_CODES (int8 codes times the
// scale of their quantization group; groups of 32k columns or the whole row).
template <int VT, int MM>
void nm24_row_avx512(const InferArgs& a, int64_t n, const float* x, float* y, int64_t N) {
  const int64_t K = a.cols, kept = K / 2;
  const void* vals = a.fmt == IF_NMQ ? static_cast<const void*>(static_cast<const int8_t*>(a.a) + n * kept)
                                     : static_cast<const void*>(static_cast<const char*>(a.a) +
                                                                n * kept * (VT == IV_F32 ? 4 : 2));
  const uint8_t* idx = a.b + n * a.b_stride;
  __m512 total[MM];
  for (int i = 0; i < MM; ++i) total[i] = _mm512_setzero_ps();
  auto run = [&](int64_t k0, int64_t k1, float s) {
    __m512 acc0[MM], acc1[MM];
    for (int i = 0; i < MM; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
    auto step = [&](int64_t k, __m512* acc) {  // 32 columns: kept values k / 2 .. k / 2 + 16
      const __m512i lanes = nm24_lanes(idx + k / 8);
      const __m512 v = nm_values16<VT>(vals, k / 2);
      for (int i = 0; i < MM; ++i) {
        const float* xr = x + i * K + k;
        const __m512 xs = _mm512_permutex2var_ps(_mm512_loadu_ps(xr), lanes, _mm512_loadu_ps(xr + 16));
        acc[i] = _mm512_fmadd_ps(v, xs, acc[i]);
      }
    };
    int64_t k = k0;
    for (; k + 64 <= k1; k += 64) {  // two accumulators: the FMA chain is not the limit
      step(k, acc0);
      step(k + 32, acc1);
    }
    if (k < k1) step(k, acc0);
    const __m512 sv = _mm512_set1_ps(s);
    for (int i = 0; i < MM; ++i) total[i] = _mm512_fmadd_ps(_mm512_add_ps(acc0[i], acc1[i]), sv, total[i]);
  };
  if (a.fmt == IF_NMQ) {
    for_groups(a, n, run);
  } else {
    run(0, K, 1.0f);
  }
  for (int i = 0; i < MM; ++i) y[i * N + n] = _mm512_reduce_add_ps(total[i]);
}

// Whether the AVX-512 2:4 GEMV takes this storage: 32k columns (and groups of 32k or the row).
inline bool nm24_avx512_applies(const InferArgs& a) {
  if (!((a.fmt == IF_NM || a.fmt == IF_NMQ) && a.nm_n == 2 && a.nm_m == 4 && a.index_bits == 2)) return false;
  return a.cols % 32 == 0 && (a.fmt == IF_NM || a.group_size == 0 || a.group_size % 32 == 0);
}

inline void nm24_rows_avx512(const InferArgs& a, const float* x, int64_t M, float* y, int64_t n0, int64_t n1) {
  auto go = [&](auto tag) {
    constexpr int VT = decltype(tag)::value;
    rows_by_m(a, x, M, y, n0, n1, [&](auto mm, int64_t n, const float* xr, float* yr) {
      nm24_row_avx512<VT, decltype(mm)::value>(a, n, xr, yr, a.rows);
    });
  };
  const int vt = a.fmt == IF_NMQ ? IV_CODES : a.value_type;
  switch (vt) {
    case IV_CODES: go(std::integral_constant<int, IV_CODES>{}); break;
    case IV_BF16: go(std::integral_constant<int, IV_BF16>{}); break;
    case IV_F16: go(std::integral_constant<int, IV_F16>{}); break;
    default: go(std::integral_constant<int, IV_F32>{}); break;
  }
}
