// Magnitude thresholds by radix select (select.cpp).
#pragma once

#include <ATen/core/Tensor.h>

#include <type_traits>
#include <utility>

namespace vcon {

// The dtype the transforms compute in: float, or double for fp64 weights (spec.py).
template <typename T>
using compute_type_of = std::conditional_t<std::is_same_v<T, double>, double, float>;

// out[i] = the `kept`-th largest |w| of the layer (out has 1 entry) or of row i (per_row),
// +inf when kept == 0. weight: contiguous 2-D; out: contiguous, compute dtype.
void magnitude_thresholds(const at::Tensor& weight, int64_t kept, bool per_row, at::Tensor& out);

// (hits, misses) of the per-layer threshold hints since the last clear (select.cpp).
std::pair<int64_t, int64_t> threshold_hint_stats();
void clear_threshold_hints();

}  // namespace vcon
