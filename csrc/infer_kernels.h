// Row kernels of the finalized-layer matmul (see infer.h), compiled once per ISA.
//
// Included by infer_default.cpp, infer_avx2.cpp and infer_avx512.cpp with VCON_ISA set to a
// namespace name, so each ISA's copy has its own symbols. The AVX-512 copy is the AVX2 code
// (compiled with AVX-512 enabled) plus the kernels of infer_q4_avx512.h and infer_nm_avx512.h. As in kernels.h: no at::Tensor, no std containers, no
// static initializers here (the AVX2 copy must not run before the CPU check in infer.cpp).
//
// Numerics: every dequantized weight is `float(code) * scale` in fp32, the arithmetic of
// QuantizedWeight.materialize(), so the prefill path (dequantize + GEMM) multiplies by
// exactly the weight the plain path builds. The GEMV sums in its own order (FMA, scale
// applied once per group), which moves fp32 results by a few ulps of the row sum.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(CPU_CAPABILITY_AVX2)
#include <immintrin.h>
#endif

#include "infer.h"

#ifndef VCON_ISA
#error "define VCON_ISA (the namespace of this ISA's copy) before including infer_kernels.h"
#endif

namespace vcon {
namespace VCON_ISA {
namespace {

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// IEEE binary16 -> float, exact (subnormals included).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu;
  uint32_t mant = h & 0x3FFu;
  uint32_t u;
  if (exp == 0x1Fu) {
    u = sign | 0x7F800000u | (mant << 13);
  } else if (exp != 0) {
    u = sign | ((exp + 112u) << 23) | (mant << 13);
  } else if (mant == 0) {
    u = sign;
  } else {  // subnormal: normalize
    exp = 113u;
    while ((mant & 0x400u) == 0) {
      mant <<= 1;
      --exp;
    }
    u = sign | (exp << 23) | ((mant & 0x3FFu) << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// float -> bf16 bits, round to nearest even (torch's conversion; NaN stays NaN).
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) {
    return static_cast<uint16_t>((u >> 16) | 0x40u);
  }
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

inline float value_at(const InferArgs& a, int64_t i) {
  switch (a.value_type) {
    case IV_BF16:
      return bf16_to_float(static_cast<const uint16_t*>(a.a)[i]);
    case IV_F16:
      return half_to_float(static_cast<const uint16_t*>(a.a)[i]);
    default:
      return static_cast<const float*>(a.a)[i];
  }
}

inline float scale_at(const InferArgs& a, int64_t n, int64_t k) {
  if (a.group_size == 0) {
    return a.scales[0];
  }
  return a.scales[n * (a.cols / a.group_size) + k / a.group_size];
}

inline int64_t column_at(const InferArgs& a, int64_t p) {
  if (a.col_bytes == 2) {
    return reinterpret_cast<const int16_t*>(a.b)[p];
  }
  return reinterpret_cast<const int32_t*>(a.b)[p];
}

inline int packed_field(const uint8_t* row, int64_t i, int bits) {
  const int64_t bit = i * bits;
  return (row[bit >> 3] >> (bit & 7)) & ((1 << bits) - 1);
}

// Calls f(k0, k1, scale) for each quantization group of row n.
template <typename F>
inline void for_groups(const InferArgs& a, int64_t n, F&& f) {
  const int64_t K = a.cols;
  if (a.group_size == 0) {
    f(int64_t{0}, K, a.scales[0]);
    return;
  }
  const int64_t g = a.group_size;
  const int64_t G = K / g;
  const float* s = a.scales + n * G;
  for (int64_t j = 0; j < G; ++j) {
    f(j * g, j * g + g, s[j]);
  }
}

// Row n of the dense W in fp32 (K values) into `out`.
void dequant_row(const InferArgs& a, int64_t n, float* out) {
  const int64_t K = a.cols;
  switch (a.fmt) {
    case IF_Q8: {
      const int8_t* c = static_cast<const int8_t*>(a.a) + n * a.a_stride;
      for_groups(a, n, [&](int64_t k0, int64_t k1, float s) {
        for (int64_t k = k0; k < k1; ++k) {
          out[k] = static_cast<float>(c[k]) * s;
        }
      });
      return;
    }
    case IF_QPACK: {
      const uint8_t* row = static_cast<const uint8_t*>(a.a) + n * a.a_stride;
      for_groups(a, n, [&](int64_t k0, int64_t k1, float s) {
        for (int64_t k = k0; k < k1; ++k) {
          out[k] = static_cast<float>(packed_field(row, k, a.bits) + a.qmin) * s;
        }
      });
      return;
    }
    case IF_Q1: {
      const uint8_t* row = static_cast<const uint8_t*>(a.a) + n * a.a_stride;
      const uint8_t* nz = a.b == nullptr ? nullptr : a.b + n * a.b_stride;
      for_groups(a, n, [&](int64_t k0, int64_t k1, float s) {
        for (int64_t k = k0; k < k1; ++k) {
          int code = packed_field(row, k, 1) ? 1 : -1;
          if (nz != nullptr) {
            code *= packed_field(nz, k, 1);
          }
          out[k] = static_cast<float>(code) * s;
        }
      });
      return;
    }
    case IF_NM:
    case IF_NMQ: {
      std::memset(out, 0, sizeof(float) * K);
      const int64_t kept = K / a.nm_m * a.nm_n;
      const uint8_t* idx = a.b + n * a.b_stride;
      for (int64_t j = 0; j < kept; ++j) {
        const int64_t col = (j / a.nm_n) * a.nm_m + packed_field(idx, j, a.index_bits);
        if (a.fmt == IF_NM) {
          out[col] = value_at(a, n * kept + j);
        } else {
          out[col] = static_cast<float>(static_cast<const int8_t*>(a.a)[n * kept + j]) * scale_at(a, n, col);
        }
      }
      return;
    }
    case IF_CSR:
    case IF_CSRQ: {
      std::memset(out, 0, sizeof(float) * K);
      for (int64_t p = a.crow[n]; p < a.crow[n + 1]; ++p) {
        const int64_t col = column_at(a, p);
        if (a.fmt == IF_CSR) {
          out[col] = value_at(a, p);
        } else {
          out[col] = static_cast<float>(static_cast<const int8_t*>(a.a)[p]) * scale_at(a, n, col);
        }
      }
      return;
    }
    default:
      return;
  }
}

#if defined(CPU_CAPABILITY_AVX2)

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// y[i, n] = w . x[i] for MM rows of x (U chunks of 8 per step: MM*U independent FMA chains).
template <int MM, int U>
inline void dot_block(const float* w, const float* x, int64_t K, float* y, int64_t ystride) {
  __m256 acc[MM][U];
  for (int i = 0; i < MM; ++i) {
    for (int u = 0; u < U; ++u) {
      acc[i][u] = _mm256_setzero_ps();
    }
  }
  int64_t k = 0;
  for (; k + 8 * U <= K; k += 8 * U) {
    for (int u = 0; u < U; ++u) {
      const __m256 wv = _mm256_loadu_ps(w + k + 8 * u);
      for (int i = 0; i < MM; ++i) {
        acc[i][u] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i * K + k + 8 * u), acc[i][u]);
      }
    }
  }
  for (; k + 8 <= K; k += 8) {
    const __m256 wv = _mm256_loadu_ps(w + k);
    for (int i = 0; i < MM; ++i) {
      acc[i][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i * K + k), acc[i][0]);
    }
  }
  for (int i = 0; i < MM; ++i) {
    for (int u = 1; u < U; ++u) {
      acc[i][0] = _mm256_add_ps(acc[i][0], acc[i][u]);
    }
    float tail = 0.0f;
    for (int64_t t = k; t < K; ++t) {
      tail += w[t] * x[i * K + t];
    }
    y[i * ystride] = hsum(acc[i][0]) + tail;
  }
}

void dot_rows(const float* w, const float* x, int64_t M, int64_t K, int64_t N, float* y) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) {
    dot_block<4, 1>(w, x + i * K, K, y + i * N, N);
  }
  switch (M - i) {
    case 3:
      dot_block<3, 2>(w, x + i * K, K, y + i * N, N);
      break;
    case 2:
      dot_block<2, 2>(w, x + i * K, K, y + i * N, N);
      break;
    case 1:
      dot_block<1, 4>(w, x + i * K, K, y + i * N, N);
      break;
    default:
      break;
  }
}

// The 8 (or 16) codes at k as floats: int8 codes, or 4-bit fields (k even) with qmin added.
inline __m256 q8_chunk(const int8_t* c) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(c))));
}

inline void q4_chunk(const uint8_t* bytes, __m128i qmin, __m256* lo, __m256* hi) {
  const __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(bytes));
  const __m128i mask = _mm_set1_epi8(0x0F);
  const __m128i v = _mm_add_epi8(
      _mm_unpacklo_epi8(_mm_and_si128(b, mask), _mm_and_si128(_mm_srli_epi16(b, 4), mask)), qmin);
  *lo = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v));
  *hi = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)));
}

// Fused GEMV of int8 (BITS = 8) or packed int4 (BITS = 4) codes: the codes of a group are
// converted once and multiplied into MM rows of x; the group's scale is applied to the
// group's partial sums (one multiply per group, not per weight).
template <int BITS, int MM, int U>
void quant_row(const InferArgs& a, int64_t n, const float* x, float* y, int64_t N) {
  const int64_t K = a.cols;
  const uint8_t* row = static_cast<const uint8_t*>(a.a) + n * a.a_stride;
  constexpr int STEP = BITS == 8 ? 8 : 16;
  const __m128i qmin = _mm_set1_epi8(static_cast<char>(a.qmin));
  __m256 total[MM];
  float tail_total[MM];
  for (int i = 0; i < MM; ++i) {
    total[i] = _mm256_setzero_ps();
    tail_total[i] = 0.0f;
  }
  for_groups(a, n, [&](int64_t k0, int64_t k1, float s) {
    __m256 acc[MM][U];
    for (int i = 0; i < MM; ++i) {
      for (int u = 0; u < U; ++u) {
        acc[i][u] = _mm256_setzero_ps();
      }
    }
    int64_t k = k0;
    for (; k + STEP * U <= k1; k += STEP * U) {
      for (int u = 0; u < U; ++u) {
        const int64_t kk = k + STEP * u;
        if constexpr (BITS == 8) {
          const __m256 c = q8_chunk(reinterpret_cast<const int8_t*>(row) + kk);
          for (int i = 0; i < MM; ++i) {
            acc[i][u] = _mm256_fmadd_ps(c, _mm256_loadu_ps(x + i * K + kk), acc[i][u]);
          }
        } else {
          __m256 lo, hi;
          q4_chunk(row + kk / 2, qmin, &lo, &hi);
          for (int i = 0; i < MM; ++i) {
            acc[i][u] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + i * K + kk), acc[i][u]);
            acc[i][u] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + i * K + kk + 8), acc[i][u]);
          }
        }
      }
    }
    for (; k + STEP <= k1; k += STEP) {
      if constexpr (BITS == 8) {
        const __m256 c = q8_chunk(reinterpret_cast<const int8_t*>(row) + k);
        for (int i = 0; i < MM; ++i) {
          acc[i][0] = _mm256_fmadd_ps(c, _mm256_loadu_ps(x + i * K + k), acc[i][0]);
        }
      } else {
        __m256 lo, hi;
        q4_chunk(row + k / 2, qmin, &lo, &hi);
        for (int i = 0; i < MM; ++i) {
          acc[i][0] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x + i * K + k), acc[i][0]);
          acc[i][0] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x + i * K + k + 8), acc[i][0]);
        }
      }
    }
    const __m256 sv = _mm256_set1_ps(s);
    for (int i = 0; i < MM; ++i) {
      for (int u = 1; u < U; ++u) {
        acc[i][0] = _mm256_add_ps(acc[i][0], acc[i][u]);
      }
      total[i] = _mm256_fmadd_ps(acc[i][0], sv, total[i]);
      float tail = 0.0f;
      for (int64_t t = k; t < k1; ++t) {
        const int code = BITS == 8 ? static_cast<int>(reinterpret_cast<const int8_t*>(row)[t])
                                   : packed_field(row, t, 4) + a.qmin;
        tail += static_cast<float>(code) * x[i * K + t];
      }
      tail_total[i] += tail * s;
    }
  });
  for (int i = 0; i < MM; ++i) {
    y[i * N + n] = hsum(total[i]) + tail_total[i];
  }
}

template <int BITS>
void quant_rows(const InferArgs& a, const float* x, int64_t M, float* y, int64_t n0, int64_t n1) {
  const int64_t K = a.cols, N = a.rows;
  for (int64_t n = n0; n < n1; ++n) {
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) {
      quant_row<BITS, 4, 1>(a, n, x + i * K, y + i * N, N);
    }
    switch (M - i) {
      case 3:
        quant_row<BITS, 3, 1>(a, n, x + i * K, y + i * N, N);
        break;
      case 2:
        quant_row<BITS, 2, 2>(a, n, x + i * K, y + i * N, N);
        break;
      case 1:
        quant_row<BITS, 1, 4>(a, n, x + i * K, y + i * N, N);
        break;
      default:
        break;
    }
  }
}

// 8 values of an N:M / CSR value array at element i as floats (fp32, bf16 or fp16).
template <int VT>
inline __m256 values8(const void* base, int64_t i) {
  if constexpr (VT == IV_F32) {
    return _mm256_loadu_ps(static_cast<const float*>(base) + i);
  } else if constexpr (VT == IV_BF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if constexpr (VT == IV_F16) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + i)));
  } else {  // int8 codes
    return q8_chunk(static_cast<const int8_t*>(base) + i);
  }
}
constexpr int IV_CODES = 99;

template <int VT>
inline float value1(const void* base, int64_t i) {
  if constexpr (VT == IV_CODES) {
    return static_cast<float>(static_cast<const int8_t*>(base)[i]);
  } else if constexpr (VT == IV_BF16) {
    return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
  } else if constexpr (VT == IV_F16) {
    return half_to_float(static_cast<const uint16_t*>(base)[i]);
  } else {
    return static_cast<const float*>(base)[i];
  }
}

// Binary GEMV: x with its sign flipped where the sign bit is 0 (and zeroed where the
// non-zero bit is 0), summed per group, times the group's scale. Needs groups of 8k.
template <int MM>
void binary_row(const InferArgs& a, int64_t n, const float* x, float* y, int64_t N) {
  const int64_t K = a.cols;
  const uint8_t* row = static_cast<const uint8_t*>(a.a) + n * a.a_stride;
  const uint8_t* nz = a.b == nullptr ? nullptr : a.b + n * a.b_stride;
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  const __m256i signbit = _mm256_set1_epi32(static_cast<int>(0x80000000u));
  __m256 total[MM];
  float tail_total[MM];
  for (int i = 0; i < MM; ++i) {
    total[i] = _mm256_setzero_ps();
    tail_total[i] = 0.0f;
  }
  for_groups(a, n, [&](int64_t k0, int64_t k1, float s) {
    __m256 acc[MM][2];
    for (int i = 0; i < MM; ++i) {
      acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    }
    auto step = [&](int64_t kk, int u) {
      const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(row[kk >> 3]), bit), bit);
      const __m256 flip = _mm256_castsi256_ps(_mm256_andnot_si256(set, signbit));
      if (nz != nullptr) {
        const __m256 keep =
            _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(nz[kk >> 3]), bit), bit));
        for (int i = 0; i < MM; ++i) {
          acc[i][u] = _mm256_add_ps(acc[i][u], _mm256_and_ps(_mm256_xor_ps(_mm256_loadu_ps(x + i * K + kk), flip), keep));
        }
      } else {
        for (int i = 0; i < MM; ++i) {
          acc[i][u] = _mm256_add_ps(acc[i][u], _mm256_xor_ps(_mm256_loadu_ps(x + i * K + kk), flip));
        }
      }
    };
    int64_t k = k0;
    // Two chunks per step into two accumulators (a compile-time index keeps them in registers).
    for (; k + 16 <= k1; k += 16) {
      step(k, 0);
      step(k + 8, 1);
    }
    for (; k + 8 <= k1; k += 8) {
      step(k, 0);
    }
    const __m256 sv = _mm256_set1_ps(s);
    for (int i = 0; i < MM; ++i) {
      total[i] = _mm256_fmadd_ps(_mm256_add_ps(acc[i][0], acc[i][1]), sv, total[i]);
      float tail = 0.0f;
      for (int64_t t = k; t < k1; ++t) {
        int code = packed_field(row, t, 1) ? 1 : -1;
        if (nz != nullptr) code *= packed_field(nz, t, 1);
        tail += static_cast<float>(code) * x[i * K + t];
      }
      tail_total[i] += tail * s;
    }
  });
  for (int i = 0; i < MM; ++i) {
    y[i * N + n] = hsum(total[i]) + tail_total[i];
  }
}

// 2:4 GEMV: 8 kept values cover 16 columns; their 2-bit positions pick the matching x
// values with two in-register permutes (no gather). VT: value type or IV_CODES (times the
// scale of the quantization group, groups of 16k columns).
template <int VT, int MM>
void nm24_row(const InferArgs& a, int64_t n, const float* x, float* y, int64_t N) {
  const int64_t K = a.cols, kept = K / 2;
  const void* vals = a.fmt == IF_NMQ ? static_cast<const void*>(static_cast<const int8_t*>(a.a) + n * kept)
                                     : static_cast<const void*>(static_cast<const char*>(a.a) +
                                                                n * kept * (VT == IV_F32 ? 4 : 2));
  const uint8_t* idx = a.b + n * a.b_stride;
  const __m256i shifts = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i base = _mm256_setr_epi32(0, 0, 4, 4, 0, 0, 4, 4);
  const __m256i three = _mm256_set1_epi32(3);
  __m256 total[MM];
  float tail_total[MM];
  for (int i = 0; i < MM; ++i) {
    total[i] = _mm256_setzero_ps();
    tail_total[i] = 0.0f;
  }
  auto run = [&](int64_t k0, int64_t k1, float s) {
    __m256 acc[MM];
    for (int i = 0; i < MM; ++i) acc[i] = _mm256_setzero_ps();
    int64_t k = k0;
    for (; k + 16 <= k1; k += 16) {
      const int64_t j = k / 2;  // first kept value of this window
      uint16_t bits16;
      std::memcpy(&bits16, idx + j / 4, 2);
      const __m256i pos = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32(bits16), shifts), three);
      const __m256i perm = _mm256_add_epi32(pos, base);
      const __m256 v = values8<VT>(vals, j);
      for (int i = 0; i < MM; ++i) {
        const float* xr = x + i * K + k;
        const __m256 lo = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xr), perm);
        const __m256 hi = _mm256_permutevar8x32_ps(_mm256_loadu_ps(xr + 8), perm);
        acc[i] = _mm256_fmadd_ps(v, _mm256_blend_ps(lo, hi, 0xF0), acc[i]);
      }
    }
    const __m256 sv = _mm256_set1_ps(s);
    for (int i = 0; i < MM; ++i) {
      total[i] = _mm256_fmadd_ps(acc[i], sv, total[i]);
      float tail = 0.0f;
      for (int64_t j = k / 2; j < k1 / 2; ++j) {
        const int64_t col = (j / 2) * 4 + packed_field(idx, j, 2);
        tail += value1<VT>(vals, j) * x[i * K + col];
      }
      tail_total[i] += tail * s;
    }
  };
  if (a.fmt == IF_NMQ) {
    for_groups(a, n, run);
  } else {
    run(0, K, 1.0f);
  }
  for (int i = 0; i < MM; ++i) {
    y[i * N + n] = hsum(total[i]) + tail_total[i];
  }
}

// CSR GEMV for one row of x: 8 non-zeros at a time, x gathered by column.
template <int VT>
void csr_rows_m1(const InferArgs& a, const float* x, float* y, int64_t n0, int64_t n1) {
  const bool quant = a.fmt == IF_CSRQ;
  const bool row_scale = quant && (a.group_size == 0 || a.group_size == a.cols);
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t p0 = a.crow[n], p1 = a.crow[n + 1];
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float tail = 0.0f;
    int64_t p = p0;
    if (!quant || row_scale) {
      for (; p + 16 <= p1; p += 16) {
        __m256i c0, c1;
        if (a.col_bytes == 2) {
          const __m256i c = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const int16_t*>(a.b) + p));
          c0 = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(c));
          c1 = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(c, 1));
        } else {
          c0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const int32_t*>(a.b) + p));
          c1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const int32_t*>(a.b) + p + 8));
        }
        acc0 = _mm256_fmadd_ps(values8<VT>(a.a, p), _mm256_i32gather_ps(x, c0, 4), acc0);
        acc1 = _mm256_fmadd_ps(values8<VT>(a.a, p + 8), _mm256_i32gather_ps(x, c1, 4), acc1);
      }
    }
    for (; p < p1; ++p) {
      const int64_t col = column_at(a, p);
      float v = value1<VT>(a.a, p);
      if (quant && !row_scale) v *= scale_at(a, n, col);
      tail += v * x[col];
    }
    float r = hsum(_mm256_add_ps(acc0, acc1)) + tail;
    if (row_scale) r *= scale_at(a, n, 0);
    y[n] = r;
  }
}

// CSR GEMV for a few rows of x: each non-zero into every row.
template <int VT>
void csr_rows(const InferArgs& a, const float* x, int64_t M, float* y, int64_t n0, int64_t n1) {
  const bool quant = a.fmt == IF_CSRQ;
  const int64_t K = a.cols, N = a.rows;
  float acc[16];
  for (int64_t n = n0; n < n1; ++n) {
    for (int64_t i0 = 0; i0 < M; i0 += 16) {
      const int64_t mm = M - i0 < 16 ? M - i0 : 16;
      for (int64_t i = 0; i < mm; ++i) acc[i] = 0.0f;
      for (int64_t p = a.crow[n]; p < a.crow[n + 1]; ++p) {
        const int64_t col = column_at(a, p);
        float v = value1<VT>(a.a, p);
        if (quant) v *= scale_at(a, n, col);
        const float* xc = x + i0 * K + col;
        for (int64_t i = 0; i < mm; ++i) acc[i] += v * xc[i * K];
      }
      for (int64_t i = 0; i < mm; ++i) y[(i0 + i) * N + n] = acc[i];
    }
  }
}

template <typename RowFn>
void rows_by_m(const InferArgs& a, const float* x, int64_t M, float* y, int64_t n0, int64_t n1, RowFn&& row) {
  const int64_t K = a.cols, N = a.rows;
  for (int64_t n = n0; n < n1; ++n) {
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) row(std::integral_constant<int, 4>{}, n, x + i * K, y + i * N);
    switch (M - i) {
      case 3: row(std::integral_constant<int, 3>{}, n, x + i * K, y + i * N); break;
      case 2: row(std::integral_constant<int, 2>{}, n, x + i * K, y + i * N); break;
      case 1: row(std::integral_constant<int, 1>{}, n, x + i * K, y + i * N); break;
      default: break;
    }
  }
}

template <int VT>
bool nm24_dispatch(const InferArgs& a, const float* x, int64_t M, float* y, int64_t n0, int64_t n1) {
  rows_by_m(a, x, M, y, n0, n1, [&](auto mm, int64_t n, const float* xr, float* yr) {
    nm24_row<VT, decltype(mm)::value>(a, n, xr, yr, a.rows);
  });
  return true;
}

// The fused kernels of the formats that have one; false: use dequantize-row + dot.
bool fused_gemv(const InferArgs& a, const float* x, int64_t M, float* y, int64_t n0, int64_t n1) {
  if (a.fmt == IF_Q1 && a.group_size % 8 == 0) {
    rows_by_m(a, x, M, y, n0, n1, [&](auto mm, int64_t n, const float* xr, float* yr) {
      binary_row<decltype(mm)::value>(a, n, xr, yr, a.rows);
    });
    return true;
  }
  if ((a.fmt == IF_NM || a.fmt == IF_NMQ) && a.nm_n == 2 && a.nm_m == 4 && a.index_bits == 2) {
    if (a.fmt == IF_NMQ) {
      if (a.group_size % 16 != 0) return false;
      return nm24_dispatch<IV_CODES>(a, x, M, y, n0, n1);
    }
    switch (a.value_type) {
      case IV_BF16: return nm24_dispatch<IV_BF16>(a, x, M, y, n0, n1);
      case IV_F16: return nm24_dispatch<IV_F16>(a, x, M, y, n0, n1);
      default: return nm24_dispatch<IV_F32>(a, x, M, y, n0, n1);
    }
  }
  if (a.fmt == IF_CSR || a.fmt == IF_CSRQ) {
    const int vt = a.fmt == IF_CSRQ ? IV_CODES : a.value_type;
    auto go = [&](auto tag) {
      constexpr int T = decltype(tag)::value;
      if (M == 1) {
        csr_rows_m1<T>(a, x, y, n0, n1);
      } else {
        csr_rows<T>(a, x, M, y, n0, n1);
      }
    };
    switch (vt) {
      case IV_CODES: go(std::integral_constant<int, IV_CODES>{}); break;
      case IV_BF16: go(std::integral_constant<int, IV_BF16>{}); break;
      case IV_F16: go(std::integral_constant<int, IV_F16>{}); break;
      default: go(std::integral_constant<int, IV_F32>{}); break;
    }
    return true;
  }
  return false;
}

// Vectorized dequantize of one row for the formats whose generic loop is slow (bit fields,
// 2:4 positions); false: use dequant_row. Same values as dequant_row (float(code) * s).
bool fast_dequant_row(const InferArgs& a, int64_t n, float* out) {
  const int64_t K = a.cols;
  if (a.fmt == IF_Q1 && a.group_size % 8 == 0) {
    const uint8_t* row = static_cast<const uint8_t*>(a.a) + n * a.a_stride;
    const uint8_t* nz = a.b == nullptr ? nullptr : a.b + n * a.b_stride;
    const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    const __m256i signbit = _mm256_set1_epi32(static_cast<int>(0x80000000u));
    for_groups(a, n, [&](int64_t k0, int64_t k1, float s) {
      const __m256 sv = _mm256_set1_ps(s);
      int64_t k = k0;
      for (; k + 8 <= k1; k += 8) {
        const __m256i set = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(row[k >> 3]), bit), bit);
        __m256 v = _mm256_xor_ps(sv, _mm256_castsi256_ps(_mm256_andnot_si256(set, signbit)));
        if (nz != nullptr) {
          // code 0 -> 0 * s = +0 (what float(0) * s gives)
          v = _mm256_and_ps(v, _mm256_castsi256_ps(_mm256_cmpeq_epi32(
                                   _mm256_and_si256(_mm256_set1_epi32(nz[k >> 3]), bit), bit)));
        }
        _mm256_storeu_ps(out + k, v);
      }
      for (; k < k1; ++k) {
        int code = packed_field(row, k, 1) ? 1 : -1;
        if (nz != nullptr) code *= packed_field(nz, k, 1);
        out[k] = static_cast<float>(code) * s;
      }
    });
    return true;
  }
  if (a.fmt == IF_QPACK && a.bits == 4 && a.group_size % 2 == 0) {
    const uint8_t* row = static_cast<const uint8_t*>(a.a) + n * a.a_stride;
    const __m128i qmin = _mm_set1_epi8(static_cast<char>(a.qmin));
    for_groups(a, n, [&](int64_t k0, int64_t k1, float s) {
      const __m256 sv = _mm256_set1_ps(s);
      int64_t k = k0;
      for (; k + 16 <= k1; k += 16) {
        __m256 lo, hi;
        q4_chunk(row + k / 2, qmin, &lo, &hi);
        _mm256_storeu_ps(out + k, _mm256_mul_ps(lo, sv));
        _mm256_storeu_ps(out + k + 8, _mm256_mul_ps(hi, sv));
      }
      for (; k < k1; ++k) {
        out[k] = static_cast<float>(packed_field(row, k, 4) + a.qmin) * s;
      }
    });
    return true;
  }
  if ((a.fmt == IF_NM || a.fmt == IF_NMQ) && a.nm_n == 2 && a.nm_m == 4 && a.index_bits == 2) {
    const int64_t kept = K / 2;
    const uint8_t* idx = a.b + n * a.b_stride;
    std::memset(out, 0, sizeof(float) * K);
    for (int64_t j = 0; j < kept; ++j) {
      const int64_t col = (j >> 1) * 4 + ((idx[j >> 2] >> ((j & 3) * 2)) & 3);
      if (a.fmt == IF_NM) {
        out[col] = value_at(a, n * kept + j);
      } else {
        out[col] = static_cast<float>(static_cast<const int8_t*>(a.a)[n * kept + j]);
      }
    }
    if (a.fmt == IF_NMQ) {
      for_groups(a, n, [&](int64_t k0, int64_t k1, float s) {
        for (int64_t k = k0; k < k1; ++k) out[k] *= s;
      });
    }
    return true;
  }
  return false;
}

void bf16_row(const float* in, uint16_t* out, int64_t K) {
  int64_t k = 0;
  const __m256i one = _mm256_set1_epi32(1);
  const __m256i bias = _mm256_set1_epi32(0x7FFF);
  for (; k + 16 <= K; k += 16) {
    __m256i u0 = _mm256_castps_si256(_mm256_loadu_ps(in + k));
    __m256i u1 = _mm256_castps_si256(_mm256_loadu_ps(in + k + 8));
    // Finite inputs only (codes * scale): NaN handling is not needed on this path.
    u0 = _mm256_srli_epi32(_mm256_add_epi32(u0, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u0, 16), one))), 16);
    u1 = _mm256_srli_epi32(_mm256_add_epi32(u1, _mm256_add_epi32(bias, _mm256_and_si256(_mm256_srli_epi32(u1, 16), one))), 16);
    const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(u0, u1), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + k), packed);
  }
  for (; k < K; ++k) {
    out[k] = float_to_bf16(in[k]);
  }
}

#else  // baseline ISA: plain loops

bool fast_dequant_row(const InferArgs&, int64_t, float*) {
  return false;
}

void dot_rows(const float* w, const float* x, int64_t M, int64_t K, int64_t N, float* y) {
  for (int64_t i = 0; i < M; ++i) {
    float acc = 0.0f;
    for (int64_t k = 0; k < K; ++k) {
      acc += w[k] * x[i * K + k];
    }
    y[i * N] = acc;
  }
}

void bf16_row(const float* in, uint16_t* out, int64_t K) {
  for (int64_t k = 0; k < K; ++k) {
    out[k] = float_to_bf16(in[k]);
  }
}

#endif

void dequant_any(const InferArgs& a, int64_t n, float* out) {
  if (!fast_dequant_row(a, n, out)) {
    dequant_row(a, n, out);
  }
}

#if defined(VCON_INFER_AVX512)
#include "infer_nm_avx512.h"
#include "infer_q4_avx512.h"
#endif

void gemv(const InferArgs& a, const float* x, int64_t M, float* y, int64_t n0, int64_t n1, float* buf) {
#if defined(VCON_INFER_AVX512)
  if (q4_avx512_applies(a)) {
    q4_rows_avx512(a, x, M, y, n0, n1, buf);
    return;
  }
  if (q8_avx512_applies(a)) {
    q8_rows_avx512(a, x, M, y, n0, n1);
    return;
  }
  if (nm24_avx512_applies(a)) {
    nm24_rows_avx512(a, x, M, y, n0, n1);
    return;
  }
#endif
#if defined(CPU_CAPABILITY_AVX2)
  if (a.fmt == IF_Q8) {
    quant_rows<8>(a, x, M, y, n0, n1);
    return;
  }
  if (a.fmt == IF_QPACK && a.bits == 4 && a.group_size % 2 == 0) {
    quant_rows<4>(a, x, M, y, n0, n1);
    return;
  }
  if (fused_gemv(a, x, M, y, n0, n1)) {
    return;
  }
#endif
  for (int64_t n = n0; n < n1; ++n) {
    dequant_any(a, n, buf);
    dot_rows(buf, x, M, a.cols, a.rows, y + n);
  }
}

void dequant_f32(const InferArgs& a, int64_t n0, int64_t n1, float* out) {
  for (int64_t n = n0; n < n1; ++n) {
    dequant_any(a, n, out + (n - n0) * a.cols);
  }
}

void dequant_bf16(const InferArgs& a, int64_t n0, int64_t n1, uint16_t* out, float* buf) {
  for (int64_t n = n0; n < n1; ++n) {
    dequant_any(a, n, buf);
    bf16_row(buf, out + (n - n0) * a.cols, a.cols);
  }
}

}  // namespace

inline InferTable make_infer_table(const char* isa) {
  return InferTable{isa, &gemv, &dequant_f32, &dequant_bf16};
}

}  // namespace VCON_ISA
}  // namespace vcon
