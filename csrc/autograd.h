// The C++ autograd node of the eager linear layer (autograd.cpp).
#pragma once

#include "ops.h"

namespace vcon {

// y = the blended linear layer of linear_forward, differentiable: its backward is linear_backward,
// run by the autograd engine without Python. x: (..., K); the output (..., N) is not a view.
at::Tensor linear_autograd(const at::Tensor& x, const at::Tensor& weight, const OptTensor& bias,
                           const at::Tensor& beta, const at::Tensor& threshold, const at::Tensor& scales,
                           const OptTensor& mask, const OptTensor& u, const OptTensor& v, const Spec& spec);

}  // namespace vcon
