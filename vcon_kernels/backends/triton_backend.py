"""The Triton backend: fused VCON kernels for CUDA tensors (interpreted on CPU for tests).

It overrides the hot methods of :class:`TorchBackend` with the kernels of
``vcon_kernels/ops``; convolutions use the plain-torch conv methods, which call this
backend's ``blend_weight`` / ``weight_grad`` kernels. fp64 tensors (gradcheck) and empty
weights go to the plain-torch methods.

It runs CUDA tensors, and CPU tensors only when ``TRITON_INTERPRET=1`` was set before the
kernels were imported (the CPU test suite). Which strategy a linear call takes is chosen
per shape (``ops/dispatch.py``) and shown by ``vk.explain(layer, x)`` and, per call, by
the debug log of the ``vcon_kernels.triton`` logger.

Example usage::

    with vk.backends.use("triton"):
        y = layer(x)
"""

from __future__ import annotations

import logging
import math

import torch

from ..spec import PRUNE_THRESHOLD
from .torch_backend import TorchBackend

log = logging.getLogger("vcon_kernels.triton")


class TritonBackend(TorchBackend):
    name = "triton"
    unavailable_reason = ""

    def __init__(self):
        try:
            from .. import ops
        except ImportError as exc:  # triton (or numpy for the interpreter) missing
            self._ops = None
            self.unavailable_reason = f"cannot import the Triton kernels: {exc}"
            return
        self._ops = ops

    def is_available(self) -> bool:
        if self._ops is None:
            return False
        if torch.cuda.is_available() or self._ops.utils.INTERPRET:
            return True
        self.unavailable_reason = (
            "no CUDA device, and TRITON_INTERPRET=1 was not set before the kernels were imported"
        )
        return False

    # -- which tensors run here -------------------------------------------------------------------
    def _runs(self, weight: torch.Tensor) -> bool:
        """True if the kernels take this call; False sends it to the plain-torch methods (fp64, empty)."""
        if weight.dtype not in self._ops.utils.SUPPORTED_DTYPES or weight.numel() == 0:
            return False
        if weight.device.type == "cuda":
            return True
        if weight.device.type == "cpu" and self._ops.utils.INTERPRET:
            return True
        raise RuntimeError(
            f"the triton backend runs CUDA tensors (CPU tensors only under TRITON_INTERPRET=1); "
            f"got a weight on {weight.device}"
        )

    def _state(self, weight, beta, threshold, scales, mask, spec):
        return self._ops.WeightState(weight, beta, threshold, scales, mask, spec)

    # -- per-layer state ----------------------------------------------------------------------------
    def compute_state(self, weight, beta, mask, spec):
        if not self._runs(weight):
            return super().compute_state(weight, beta, mask, spec)
        rows, cols = weight.shape
        threshold = torch.empty(spec.threshold_shape(rows), dtype=torch.float32, device=weight.device)
        if spec.prune == PRUNE_THRESHOLD:
            threshold = self._ops.prune_threshold(weight, spec.sparsity, spec.per_row)
        if not spec.has_quant:
            scales = torch.empty(spec.scales_shape(rows, cols), dtype=torch.float32, device=weight.device)
            return threshold, scales
        scales = self._ops.quant_scales(self._state(weight.detach(), beta, threshold, None, mask, spec))
        return threshold, scales

    # -- the blended weight --------------------------------------------------------------------------
    def blend_weight(self, weight, beta, threshold, scales, mask, spec):
        if not self._runs(weight) or not (spec.has_prune or spec.has_quant):
            return super().blend_weight(weight, beta, threshold, scales, mask, spec)
        return self._ops.blend_weight(self._state(weight.detach(), beta, threshold, scales, mask, spec))

    def weight_grad(self, grad_w_eff, weight, beta, threshold, scales, mask, spec):
        if not self._runs(weight):
            return super().weight_grad(grad_w_eff, weight, beta, threshold, scales, mask, spec)
        epilogue = self._ops.linear_backward.weight_epilogue(spec)
        if epilogue == self._ops.vcon_matmul.EPI_NONE:
            return grad_w_eff
        if epilogue == self._ops.vcon_matmul.EPI_BETA:
            state = self._state(grad_w_eff, beta, None, None, None, spec)
            return self._ops.blend_weight(state, scale_by_beta=True)
        return self._ops.weight_grad(grad_w_eff, self._state(weight.detach(), beta, threshold, scales, mask, spec))

    # -- linear -----------------------------------------------------------------------------------------
    def linear_forward(self, x, weight, bias, beta, threshold, scales, mask, u, v, spec, keep_t=False):
        if not self._runs(weight) or x.shape[0] == 0:
            return super().linear_forward(x, weight, bias, beta, threshold, scales, mask, u, v, spec, keep_t)
        self._log("forward", x.shape[0], weight.shape, spec, x.dtype)
        return self._ops.linear_forward.linear_forward(x, weight, bias, beta, threshold, scales, mask, u, v, spec,
                                                       keep_t)

    def linear_backward(self, grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, spec, needs, t=None):
        if not self._runs(weight) or x.shape[0] == 0:
            return super().linear_backward(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, spec,
                                           needs, t)
        self._log("backward", x.shape[0], weight.shape, spec, x.dtype)
        grads = self._ops.linear_backward.linear_backward(
            grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, spec, needs, t
        )
        if spec.lowrank and not spec.exact and grads[1] is not None:
            grads[1].mul_(beta[0] != 0)  # STE's dW is 0 once beta = 0 (torch_backend.lowrank_weight_grad)
        return grads

    # -- introspection -----------------------------------------------------------------------------------
    def _log(self, what, m, weight_shape, spec, dtype):
        if log.isEnabledFor(logging.DEBUG):
            strategy = self._ops.dispatch.choose(m, spec, dtype)
            log.debug("vcon linear %s: M=%d weight=%s %s strategy=%s", what, m, tuple(weight_shape), spec, strategy)

    def explain(self, x_shape, weight_shape, spec, device) -> str:
        rows, cols = weight_shape
        if len(x_shape) == 4 and x_shape[-1] != cols:
            if spec.lowrank:
                return "triton: conv2d low rank runs the plain-torch path (cuDNN convolutions, blended outputs)"
            return ("triton: conv2d: W_eff by one elementwise Triton kernel, then the cuDNN convolution "
                    "(exact-mode dW: elementwise Triton epilogue)")
        m = math.prod(x_shape[:-1]) if len(x_shape) > 1 else 1
        strategy = self._ops.dispatch.choose(m, spec, torch.bfloat16)  # the choice does not depend on dtype
        return self._ops.dispatch.describe(strategy, m, rows, cols, spec)
