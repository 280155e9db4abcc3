// Tensor-level ops of the C++ CPU backend (ops.cpp, linear.cpp). Arguments follow the
// torch.ops.vcon ops of vcon_kernels/library.py, already validated there; these functions
// re-check what would otherwise be undefined behaviour (dtypes, shapes, devices).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "vcon.h"

namespace vcon {

using OptTensor = std::optional<at::Tensor>;

// -- ISA dispatch (ops.cpp) ---------------------------------------------------------------------
const KernelTable& kernels();
std::string current_isa();
// "auto" (AVX2 when the CPU and ATEN_CPU_CAPABILITY allow it), "default" or "avx2".
void set_isa(const std::string& name);
std::vector<std::string> compiled_isas();

// -- the weight transform (ops.cpp) ----------------------------------------------------------------
// The weight, state and kernel arguments of one call, kept together so the raw pointers
// in `args` stay valid.
struct Prepared {
  at::Tensor weight;  // contiguous 2-D
  at::Tensor threshold;
  at::Tensor scales;
  at::Tensor mask;
  RowArgs args;
  int dtype = DT_FLOAT;
  bool identity = false;  // every stage beta is 1: W_eff == W exactly
};

Prepared prepare(const at::Tensor& weight, const at::Tensor& beta, const at::Tensor& threshold,
                 const at::Tensor& scales, const OptTensor& mask, const Spec& spec);

// (threshold, scales) of the current weight; `kept` is the kept count of a threshold prune.
std::tuple<at::Tensor, at::Tensor> compute_state(const at::Tensor& weight, const at::Tensor& beta,
                                                 const OptTensor& mask, const Spec& spec, int64_t kept);

// W_eff into `out` (contiguous, the weight's shape and dtype).
void blend_into(const Prepared& p, at::Tensor& out);

at::Tensor blend_weight(const at::Tensor& weight, const at::Tensor& beta, const at::Tensor& threshold,
                        const at::Tensor& scales, const OptTensor& mask, const Spec& spec);

// Whether the exact-mode coefficient differs from 1 (not for STE, binary alone, or beta = 1).
bool has_coefficient(const Prepared& p, const Spec& spec);

// grad *= dW_eff/dW in place (grad: contiguous, the weight's shape and dtype).
void scale_grad_(const Prepared& p, at::Tensor& grad);

// dW from dL/dW_eff: `grad` itself for STE, else a new tensor.
at::Tensor weight_grad(const at::Tensor& grad, const at::Tensor& weight, const at::Tensor& beta,
                       const at::Tensor& threshold, const at::Tensor& scales, const OptTensor& mask, const Spec& spec);

// -- the blended linear layer (linear.cpp) --------------------------------------------------------
at::Tensor linear_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                          const at::Tensor& beta, const at::Tensor& threshold, const at::Tensor& scales,
                          const OptTensor& mask, const OptTensor& u, const OptTensor& v, const Spec& spec);

// (dx, dW, db, dU, dV); undefined (None) where `needs` = (x, weight, bias, lowrank) says not needed.
std::vector<at::Tensor> linear_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
                                        const OptTensor& bias, const at::Tensor& beta, const at::Tensor& threshold,
                                        const at::Tensor& scales, const OptTensor& mask, const OptTensor& u,
                                        const OptTensor& v, const Spec& spec, const std::vector<bool>& needs);

// Low rank with beta = 0 (the dense path stopped), for an autograd node that keeps t = x V^T:
// whether beta (a CPU fp32 tensor) is 0, y = t U^T + bias with t returned through `t_out`, and the
// backward reusing that t for dU (the finalized V-then-U pair's saved activation) instead of
// recomputing it. Same values as linear_forward / linear_backward at beta = 0.
bool lowrank_stopped(const at::Tensor& beta, const Spec& spec);
at::Tensor lowrank_stopped_forward(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                                   const at::Tensor& u, const at::Tensor& v, at::Tensor& t_out);
std::vector<at::Tensor> lowrank_stopped_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& t,
                                                 const at::Tensor& weight, const OptTensor& bias, const at::Tensor& u,
                                                 const at::Tensor& v, const std::vector<bool>& needs);

// The per-thread workspace that holds W_eff between its build and its GEMM.
int64_t workspace_bytes();
void release_workspace();

}  // namespace vcon
