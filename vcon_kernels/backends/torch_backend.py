"""The plain-torch backend: correct on every device, the fallback and the base class.

Other backends subclass :class:`TorchBackend` and override what they make faster; a
method they leave alone runs this plain-torch version. Every method takes the flat,
already-validated arguments of the ``torch.ops.vcon`` ops (weights 2-D (N, K), inputs
2-D (M, K), ``beta`` an fp32 tensor of one entry per stage) and a ``TransformSpec``.

beta stays an fp32 0-dim tensor in elementwise products: a CPU scalar tensor keeps its own
precision inside a bf16/fp16 kernel, whereas casting it first would round beta to bf16.

Mixed precision (``torch.autocast``, see ``autocast.py``): ``x`` and ``grad_out`` may come in
bf16/fp16 while the parameters stay fp32. The blended weight is then built in fp32 from the
master weight and rounded once to the activation dtype for the GEMMs; gradients of parameters
are returned in the parameters' dtype, ``dx`` in the activation dtype.

Memory: the forward builds the blended weight as one temporary, uses it for one GEMM and
drops it; the backward rebuilds it. Nothing the size of a weight is kept between forward
and backward besides the parameters themselves. Low rank keeps its thin activation
t' = (1 - beta) x V^T (M x r) when asked (``keep_t``), for dU without a second x V^T.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .. import torch_transforms as transforms
from ..spec import TransformSpec

Tensor = torch.Tensor


def to_dtype(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``t`` in ``dtype`` (itself when it already is, None stays None)."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def dense_stopped(b: Tensor) -> bool:
    """Whether low rank's beta is 0 as far as the host knows without a sync (CPU: read; else False)."""
    return b.device.type == "cpu" and float(b) == 0.0


def lowrank_weight_grad(make_g, weight, b: Tensor, exact: bool) -> Tensor:
    """dW of a low-rank layer from ``make_g() = G = dY^T X``: ``b G`` (exact) or ``G`` (STE) while
    beta > 0, and zero once beta = 0: the dense path is stopped, as in the authors' reference
    (W no longer affects the output). Zero, not None, so that DDP / FSDP see every gradient and a
    compiled graph needs no beta-dependent branch. On CPU the GEMM is skipped at beta = 0.
    """
    if b.device.type == "cpu":
        if float(b) == 0.0:
            return torch.zeros_like(weight)
        g = make_g()
        return g.mul_(b) if exact else g
    g = make_g()  # no host sync on an accelerator: zero it on the device
    return g.mul_(b) if exact else g.mul_(b != 0)


class TorchBackend:
    name = "torch"

    def is_available(self) -> bool:
        return True

    # -- per-layer state ------------------------------------------------------------------
    def compute_state(self, weight: Tensor, beta: Tensor, mask: Optional[Tensor], spec: TransformSpec):
        """(threshold, scales): see ``TransformSpec.threshold_shape`` / ``scales_shape``."""
        return transforms.compute_state(weight, beta, mask, spec)

    # -- the blended weight -----------------------------------------------------------------
    def blend_weight(self, weight, beta, threshold, scales, mask, spec: TransformSpec) -> Tensor:
        """W_eff in weight.dtype (no autograd; see spec.py for the formula)."""
        return transforms.blend_weight_with_coef(weight, beta, threshold, scales, mask, spec)[0]

    def weight_grad(self, grad_w_eff, weight, beta, threshold, scales, mask, spec: TransformSpec) -> Tensor:
        """dW from dL/dW_eff: unchanged for STE, times the exact coefficient otherwise."""
        if not spec.exact:
            return grad_w_eff
        if spec.lowrank:
            return grad_w_eff * beta[0]
        coef = transforms.blend_weight_with_coef(
            weight, beta, threshold, scales, mask, spec, want_weight=False, want_coef=True
        )[1]
        if coef is None:  # binary quantization: the exact coefficient is 1
            return grad_w_eff
        return (grad_w_eff.to(coef.dtype) * coef).to(grad_w_eff.dtype)

    # -- linear -----------------------------------------------------------------------------
    def linear_forward(self, x, weight, bias, beta, threshold, scales, mask, u, v, spec: TransformSpec,
                       keep_t: bool = False):
        """y (M, N); with ``keep_t`` on a low-rank layer, ``(y, t')`` with t' = (1 - beta) x V^T (M, r).

        t' is what the backward takes for dU = dY^T t' (``linear_backward(..., t=t')``) instead of
        recomputing the thin GEMM x V^T. Every backend returns the same quantity (scaled by 1 - beta,
        in x's dtype), so a backward may run on another backend than its forward.
        """
        dt = x.dtype
        if spec.lowrank:
            y, t = self._lowrank_forward(x, to_dtype(weight, dt), to_dtype(bias, dt), beta, to_dtype(u, dt),
                                         to_dtype(v, dt), keep_t)
            return (y, t) if keep_t else y
        w_eff = self.blend_weight(weight, beta, threshold, scales, mask, spec)
        y = F.linear(x, to_dtype(w_eff, dt), to_dtype(bias, dt))
        return (y, None) if keep_t else y

    def linear_backward(self, grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, spec, needs, t=None):
        """(dx, dW, db, dU, dV), None where ``needs`` (x, weight, bias, lowrank) says not needed.

        ``t``: the forward's t' = (1 - beta) x V^T of a low-rank layer (``linear_forward(keep_t=True)``),
        or None to recompute it.
        """
        need_x, need_w, need_b, need_lr = needs
        if spec.lowrank:
            return self._lowrank_backward(grad_out, x, weight, beta, u, v, spec, needs, t)
        dx = dw = db = None
        if need_x:
            dx = grad_out @ to_dtype(self.blend_weight(weight, beta, threshold, scales, mask, spec), grad_out.dtype)
        if need_w:
            g = to_dtype(grad_out.t() @ x, weight.dtype)
            dw = self.weight_grad(g, weight, beta, threshold, scales, mask, spec)
        if need_b and bias is not None:
            db = grad_out.sum(0).to(bias.dtype)
        return dx, dw, db, None, None

    def _lowrank_forward(self, x, weight, bias, beta, u, v, keep_t=False):
        """(y, t' or None): t' = (1 - beta) x V^T, scaled in place once y no longer needs x V^T."""
        # The bias rides on both paths (b = beta b + (1 - beta) b) so that beta = 1 is
        # nn.Linear and beta = 0 is the finalized V-then-U pair, bit for bit.
        b = beta[0]
        t = F.linear(x, v)
        low = F.linear(t, u, bias).mul_(1 - b)
        y = F.linear(x, weight, bias).mul_(b).add_(low)
        return y, (t.mul_(1 - b) if keep_t else None)

    @staticmethod
    def lowrank_t(x, v, b):
        """t' = (1 - b) x V^T as ``_lowrank_forward`` keeps it: the backward's recompute when none was kept."""
        return F.linear(x, v).mul_(1 - b)

    def _lowrank_backward(self, grad_out, x, weight, beta, u, v, spec, needs, t=None):
        need_x, need_w, need_b, need_lr = needs
        b = beta[0]
        dt, pdt = grad_out.dtype, weight.dtype
        w_c, u_c, v_c = to_dtype(weight, dt), to_dtype(u, dt), to_dtype(v, dt)
        gu = grad_out @ u_c  # (M, r)
        dx = dw = db = du = dv = None
        if need_x:
            dx = (grad_out @ w_c).mul_(b).add_((gu @ v_c).mul_(1 - b))
        if need_w:
            dw = lowrank_weight_grad(lambda: to_dtype(grad_out.t() @ x, pdt), weight, b, spec.exact)
        if need_b:
            db = to_dtype(grad_out.sum(0), pdt)
        if need_lr:
            t = self.lowrank_t(x, v_c, b) if t is None else t  # the forward's t' spares this thin GEMM
            du = to_dtype(grad_out.t() @ t, u.dtype)
            dv = to_dtype(gu.t() @ x, v.dtype).mul_(1 - b)
        return dx, dw, db, du, dv

    # -- conv2d: the blended weight feeds the ordinary convolution ---------------------------
    def conv2d_forward(self, x, weight, bias, beta, threshold, scales, mask, u, v, spec, conv_args, keep_t=False):
        """y; with ``keep_t`` on a low-rank layer, ``(y, t)`` with t = conv(x, V) (unscaled: the
        convolutions have this one implementation, so no other backend needs to read it)."""
        stride, padding, dilation, groups = conv_args
        dt = x.dtype
        bias = to_dtype(bias, dt)
        if spec.lowrank:  # bias on both paths, as in _lowrank_forward
            b = beta[0]
            t = F.conv2d(x, to_dtype(v, dt), None, stride, padding, dilation, groups)
            low = F.conv2d(t, to_dtype(u, dt), bias).mul_(1 - b)
            y = F.conv2d(x, to_dtype(weight, dt), bias, stride, padding, dilation, groups).mul_(b).add_(low)
            return (y, t) if keep_t else y
        w2d = weight.reshape(weight.shape[0], -1)
        w_eff = self.blend_weight(w2d, beta, threshold, scales, mask, spec).view_as(weight)
        y = F.conv2d(x, to_dtype(w_eff, dt), bias, stride, padding, dilation, groups)
        return (y, None) if keep_t else y

    def conv2d_backward(self, grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, spec, conv_args, needs,
                        t=None):
        """(dx, dW, db, dU, dV) of :meth:`conv2d_forward`, None where not needed; ``t``: its kept t or None."""
        stride, padding, dilation, groups = conv_args
        need_x, need_w, need_b, need_lr = needs
        conv_bwd = torch.ops.aten.convolution_backward

        def backward_of(g, inp, w, mask3, stride=stride, padding=padding, dilation=dilation, groups=groups):
            return conv_bwd(g, inp, w, None, stride, padding, dilation, False, [0, 0], groups, mask3)

        db = grad_out.sum(dim=(0, 2, 3)).to(bias.dtype) if (need_b and bias is not None) else None
        cdt = grad_out.dtype
        if not spec.lowrank:
            w2d = weight.reshape(weight.shape[0], -1)
            w_eff = self.blend_weight(w2d, beta, threshold, scales, mask, spec).view_as(weight)
            dx, g, _ = backward_of(grad_out, x, to_dtype(w_eff, cdt), [need_x, need_w, False])
            dw = None
            if need_w:
                g = to_dtype(g.reshape(w2d.shape), weight.dtype)
                dw = self.weight_grad(g, w2d, beta, threshold, scales, mask, spec).view_as(weight)
            return dx, dw, db, None, None
        b = beta[0]
        u_c, v_c = to_dtype(u, cdt), to_dtype(v, cdt)
        gemm_w = need_w and not dense_stopped(b)
        dx, g, _ = backward_of(grad_out, x, to_dtype(weight, cdt), [need_x, gemm_w, False])
        if dx is not None:
            dx = dx.mul_(b)
        dw = None
        if need_w:
            dw = lowrank_weight_grad(lambda: to_dtype(g, weight.dtype), weight, b, spec.exact)
        du = dv = None
        if need_x or need_lr:
            if t is None:  # the forward's t spares this convolution
                t = F.conv2d(x, v_c, None, stride, padding, dilation, groups)
            d_t, du, _ = backward_of(grad_out, t, u_c, [True, need_lr, False], [1, 1], [0, 0], [1, 1], 1)
            d_t = d_t.mul_(1 - b)
            dx_lr, dv, _ = backward_of(d_t, x, v_c, [need_x, need_lr, False])
            if need_x:
                dx = dx.add_(dx_lr)
            if need_lr:
                du = to_dtype(du, u.dtype).mul_(1 - b)
                dv = to_dtype(dv, v.dtype)
        return dx, dw, db, du, dv

    # -- introspection -----------------------------------------------------------------------
    def explain(self, x_shape, weight_shape, spec: TransformSpec, device) -> str:
        if spec.lowrank:
            return "torch: dense GEMM + thin GEMM t = x V^T + GEMM t U^T (three GEMMs, blended in the output)"
        return "torch: blended weight W_eff built once (one temporary), then one F.linear"
