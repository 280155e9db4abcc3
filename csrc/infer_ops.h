// Tensor-level op of the finalized-layer matmul (infer.cpp); bound in module.cpp.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

namespace vcon {

// y = x W^T (no bias) for W in one of the InferFormat storages (infer.h); y has x's dtype.
// M <= decode_max_m runs the GEMV, larger M the blocked dequantize + GEMM.
at::Tensor infer_linear(const at::Tensor& x, int64_t fmt, const at::Tensor& a, const std::optional<at::Tensor>& b,
                        const std::optional<at::Tensor>& crow, const std::optional<at::Tensor>& scales, int64_t rows,
                        int64_t bits, int64_t qmin, int64_t group_size, int64_t nm_n, int64_t nm_m,
                        int64_t index_bits, int64_t decode_max_m);

// The ISA of the infer kernels in use ("default" or "avx2").
std::string infer_isa();

}  // namespace vcon
