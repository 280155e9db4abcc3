"""The ``torch.ops.vcon`` operators: one registration, every backend behind it.

Ops (all take the flat ``TransformSpec`` arguments last, see ``spec.py``):

* ``vcon::compute_state(weight, beta, mask) -> (threshold, scales)``: the reductions that
  must run before a blended GEMM (magnitude threshold, quantization scales). No autograd.
* ``vcon::linear(x, weight, bias, beta, threshold, scales, mask, u, v, ..., keep_t) -> (y, t)``:
  the blended linear layer, with autograd through ``vcon::linear_backward``. ``t`` is the
  low-rank activation t' = (1 - beta) x V^T (M x r, M = the tokens) when ``keep_t`` is set on a
  low-rank layer, else empty: the backward takes it for dU = dY^T t' instead of running the
  thin GEMM again (saved only when U needs a gradient). Callers set ``keep_t`` when U trains.
* ``vcon::conv2d(..., keep_t) -> (y, t)``: the same for convolutions, through
  ``vcon::conv2d_backward``; its ``t`` is the low-rank activation conv(x, V) (unscaled).
* ``vcon::blend_weight(weight, beta, threshold, scales, mask) -> W_eff`` with autograd
  through ``vcon::weight_grad`` (the exact-mode coefficient), for callers that want the
  blended weight itself (finalization, "build W_eff + GEMM" strategies).

Each op is a ``torch.library.custom_op``: opaque to ``torch.compile`` (no graph break,
and a tensor ``beta`` means changing it never recompiles), with fake implementations
for tracing. The implementation picks a backend from the weight's device at call time
(``backends.select``). Backward ops are ops too, which ``torch.compile`` needs.

Mixed precision: every op has its own autocast kernel (``_register_autocast``). Under
``torch.autocast`` the layer ops cast only the activation ``x`` to the autocast dtype (as
autocast does for ``F.linear``'s input); weights, bias, low-rank factors, beta and the state
stay in their own dtype (fp32 master weights). The backends then build the blended weight
from the fp32 weight in fp32 and round it to the compute dtype where it is built, so no
low-precision copy of W outlives the call and nothing weight-sized is saved for backward.
Every other op (state, blend, backward) runs with autocast switched off, so that autocast
never reaches into an op's own GEMMs. Outputs: ``y`` / ``dx`` / ``t`` in the activation dtype;
``dW``, ``db``, ``dU``, ``dV`` in the parameters' dtype (fp32 gradients for fp32 parameters).
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch.library import custom_op
from torch.library import register_autograd

from . import backends
from .autocast import register_autocast
from .spec import TransformSpec

Tensor = torch.Tensor

SPEC_SCHEMA = (
    "int prune, float sparsity, bool per_row, int nm_n, int nm_m, int bits, int group_size, bool exact, bool lowrank"
)
NUM_SPEC_ARGS = 9
STATE_SCHEMA = "Tensor beta, Tensor threshold, Tensor scales, Tensor? mask"
CONV_SCHEMA = "int[] stride, int[] padding, int[] dilation, int groups"


def _empty(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _or_empty(t, like, fmt=torch.contiguous_format):
    return _empty(like) if t is None else t.contiguous(memory_format=fmt)


# Layout contract of every op output. torch.compile (inductor) asserts that real outputs have the
# strides of the fake ones, so both follow one rule instead of whatever the backend happened to
# produce (a transposed mm result, a channels-last conv, a non-contiguous parameter's layout):
# outputs are contiguous, except activations shaped like a 4-D channels-last input, which are
# channels-last (as convolutions produce them).
def _format_of(x: Tensor):
    if x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


def _new(shape, like: Tensor, fmt=torch.contiguous_format) -> Tensor:
    return torch.empty(shape, dtype=like.dtype, device=like.device, memory_format=fmt)


# -- compute_state -----------------------------------------------------------------------------
@custom_op(
    "vcon::compute_state",
    mutates_args=(),
    schema=f"(Tensor weight, Tensor beta, Tensor? mask, {SPEC_SCHEMA}) -> (Tensor, Tensor)",
)
def compute_state(weight, beta, mask, *spec_args):
    spec = TransformSpec(*spec_args)
    return backends.select(weight.device.type).compute_state(weight, beta, mask, spec)


@compute_state.register_fake
def _(weight, beta, mask, *spec_args):
    spec = TransformSpec(*spec_args)
    rows, cols = weight.shape
    thr_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    threshold = weight.new_empty(spec.threshold_shape(rows), dtype=thr_dtype)
    return threshold, weight.new_empty(spec.scales_shape(rows, cols), dtype=torch.float32)


# -- blend_weight / weight_grad -------------------------------------------------------------------
@custom_op("vcon::blend_weight", mutates_args=(), schema=f"(Tensor weight, {STATE_SCHEMA}, {SPEC_SCHEMA}) -> Tensor")
def blend_weight(weight, beta, threshold, scales, mask, *spec_args):
    backend = backends.select(weight.device.type)
    out = backend.blend_weight(weight, beta, threshold, scales, mask, TransformSpec(*spec_args))
    return out.clone() if out is weight else out.contiguous()


@blend_weight.register_fake
def _(weight, beta, threshold, scales, mask, *spec_args):
    return _new(weight.shape, weight)


@custom_op(
    "vcon::weight_grad",
    mutates_args=(),
    schema=f"(Tensor grad, Tensor weight, {STATE_SCHEMA}, {SPEC_SCHEMA}) -> Tensor",
)
def weight_grad(grad, weight, beta, threshold, scales, mask, *spec_args):
    backend = backends.select(weight.device.type)
    out = backend.weight_grad(grad, weight, beta, threshold, scales, mask, TransformSpec(*spec_args))
    return out.clone() if out is grad else out.contiguous()


@weight_grad.register_fake
def _(grad, weight, beta, threshold, scales, mask, *spec_args):
    return _new(grad.shape, grad)


def _blend_setup(ctx, inputs, output):
    weight, beta, threshold, scales, mask, *spec_args = inputs
    ctx.spec_args = spec_args
    ctx.save_for_backward(weight, beta, threshold, scales, mask)


def _blend_backward(ctx, grad):
    weight, beta, threshold, scales, mask = ctx.saved_tensors
    dw = None
    if ctx.needs_input_grad[0]:
        exact = TransformSpec(*ctx.spec_args).exact
        dw = torch.ops.vcon.weight_grad(grad, weight, beta, threshold, scales, mask, *ctx.spec_args) if exact else grad
    return (dw, None, None, None, None) + (None,) * NUM_SPEC_ARGS


register_autograd("vcon::blend_weight", _blend_backward, setup_context=_blend_setup)


# -- linear ---------------------------------------------------------------------------------------
_LINEAR_ARGS = f"Tensor x, Tensor weight, Tensor? bias, {STATE_SCHEMA}, Tensor? u, Tensor? v, {SPEC_SCHEMA}"
_FIVE_GRADS = "(Tensor, Tensor, Tensor, Tensor, Tensor)"  # (dx, dW, db, dU, dV)


# keep_t and t have no schema defaults on purpose: the dispatcher drops arguments equal to their
# default before calling a Python kernel, which would shift the positional ``*rest`` unpacking.
def keeps_t(spec: TransformSpec, u) -> bool:
    """Whether a layer call should keep its low-rank activation t for backward: U trains (dU needs t)."""
    return spec.lowrank and u is not None and u.requires_grad and torch.is_grad_enabled()


# The op bodies are plain functions (``*_impl``, taking a TransformSpec) so that the eager fast
# path (eager.py) runs exactly the code the ops run.
def linear_impl(x, weight, bias, beta, threshold, scales, mask, u, v, spec: TransformSpec, keep_t=False):
    """(y, t): t the low-rank activation t' (M, r) when ``keep_t`` on a low-rank layer, else None."""
    backend = backends.select(weight.device.type)
    keep_t = keep_t and spec.lowrank
    x2 = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    y = backend.linear_forward(x2, weight, bias, beta, threshold, scales, mask, u, v, spec, keep_t)
    y, t = y if keep_t else (y, None)
    t = None if t is None else t.contiguous()
    if x.dim() == 2:  # the common case, without the reshape round trip
        return y.contiguous(), t
    # Not a view (a reshape would be one): autograd forbids in-place ops on a view made inside a
    # custom Function (nn.ReLU(inplace=True), `y += residual` after the layer), and FSDP2 drops its
    # pre-backward hook on one. _unsafe_view is how aten.matmul returns N-D results for this reason.
    return torch.ops.aten._unsafe_view(y.contiguous(), (*x.shape[:-1], weight.shape[0])), t


def linear_backward_impl(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, spec, needs, t=None):
    """(dx, dW, db, dU, dV); an empty tensor for each gradient ``needs`` does not ask for.

    ``t``: the forward's low-rank activation (``linear_impl(keep_t=True)``) or None (recomputed).
    """
    backend = backends.select(weight.device.type)
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    dx, dw, db, du, dv = backend.linear_backward(
        g2, x2, weight, bias, beta, threshold, scales, mask, u, v, spec, tuple(needs), t
    )
    dx = None if dx is None else dx.reshape(x.shape)
    return _or_empty(dx, x), _or_empty(dw, weight), _or_empty(db, weight), _or_empty(du, weight), _or_empty(dv, weight)


@custom_op("vcon::linear", mutates_args=(), schema=f"({_LINEAR_ARGS}, bool keep_t) -> (Tensor, Tensor)")
def linear(x, weight, bias, beta, threshold, scales, mask, u, v, *rest):
    *spec_args, keep_t = rest
    y, t = linear_impl(x, weight, bias, beta, threshold, scales, mask, u, v, TransformSpec(*spec_args), keep_t)
    return y, _or_empty(t, x)


def _kept_t_shape(u, spec_args, keep_t, rows):
    """The shape of the ``t`` output: (rows, r) when a low-rank call keeps it, else (0,)."""
    if keep_t and TransformSpec(*spec_args).lowrank and u is not None:
        return (rows, u.shape[1])
    return (0,)


@linear.register_fake
def _(x, weight, bias, beta, threshold, scales, mask, u, v, *rest):
    *spec_args, keep_t = rest
    t = x.new_empty(_kept_t_shape(u, spec_args, keep_t, math.prod(x.shape[:-1])))
    return x.new_empty(*x.shape[:-1], weight.shape[0]), t


@custom_op(
    "vcon::linear_backward",
    mutates_args=(),
    schema=f"(Tensor grad_out, {_LINEAR_ARGS}, bool[] needs, Tensor? t) -> {_FIVE_GRADS}",
)
def linear_backward(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, *rest):
    *spec_args, needs, t = rest
    spec = TransformSpec(*spec_args)
    return linear_backward_impl(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, spec, needs, t)


@linear_backward.register_fake
def _(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, *rest):
    return _fake_grads(x, weight, bias, u, v, rest[-2])


def _fake_grads(x, weight, bias, u, v, needs, x_format=torch.contiguous_format):
    need_x, need_w, need_b, need_lr = needs
    dx = _new(x.shape, x, x_format) if need_x else _empty(x)
    dw = _new(weight.shape, weight) if need_w else _empty(weight)
    db = _new(bias.shape, bias) if (need_b and bias is not None) else _empty(weight)
    du = _new(u.shape, u) if (need_lr and u is not None) else _empty(weight)
    dv = _new(v.shape, v) if (need_lr and v is not None) else _empty(weight)
    return dx, dw, db, du, dv


def _needs(ctx, x_idx, w_idx, b_idx, u_idx, v_idx):
    n = ctx.needs_input_grad
    return [n[x_idx], n[w_idx], n[b_idx], n[u_idx] or n[v_idx]]


def _grads_tuple(grads, needs):
    dx, dw, db, du, dv = grads
    need_x, need_w, need_b, need_lr = needs
    return (
        dx if need_x else None,
        dw if need_w else None,
        db if (need_b and db.numel()) else None,
        du if need_lr else None,
        dv if need_lr else None,
    )


def _saved_input(ctx, x, w_idx, u_idx, v_idx):
    """``x`` when a weight-side gradient needs it; else a stand-in with its shape and no storage.

    A frozen layer (no gradient for W, U, V: LoRA on a frozen base, a frozen backbone) needs only
    dY W_eff in backward, so keeping its input alive would cost activation memory for nothing.
    """
    n = ctx.needs_input_grad
    if n[w_idx] or n[u_idx] or n[v_idx]:
        return x
    return x.new_zeros(()).expand(x.shape)


def _kept_t(ctx, t: Tensor, u_idx: int, keep_t: bool, spec_args):
    """The forward's low-rank activation when dU will be computed from it, else None (not kept alive).

    A frozen U (LoRA-like V-only training, a frozen layer) saves nothing more than before.
    """
    return t if keep_t and ctx.needs_input_grad[u_idx] and TransformSpec(*spec_args).lowrank else None


def _backend_scope(ctx):
    """The backend forced at forward time, re-applied around the backward op.

    Autograd may run the backward on another thread (always on CUDA), where a thread-local
    ``vk.backends.use(...)`` of the forward would not be seen.
    """
    return backends.use(ctx.backend) if ctx.backend is not None else contextlib.nullcontext()


def _linear_setup(ctx, inputs, output):
    x, weight, bias, beta, threshold, scales, mask, u, v, *spec_args, keep_t = inputs
    ctx.spec_args = spec_args
    ctx.backend = backends.forced()
    ctx.mark_non_differentiable(output[1])
    t = _kept_t(ctx, output[1], 7, keep_t, spec_args)
    ctx.save_for_backward(_saved_input(ctx, x, 1, 7, 8), weight, bias, beta, threshold, scales, mask, u, v, t)


def _linear_backward(ctx, grad_out, _grad_t):
    *saved, t = ctx.saved_tensors
    needs = _needs(ctx, 0, 1, 2, 7, 8)
    with _backend_scope(ctx):
        grads = torch.ops.vcon.linear_backward(grad_out, *saved, *ctx.spec_args, needs, t)
    dx, dw, db, du, dv = _grads_tuple(grads, needs)
    return (dx, dw, db, None, None, None, None, du, dv) + (None,) * (NUM_SPEC_ARGS + 1)  # + keep_t


register_autograd("vcon::linear", _linear_backward, setup_context=_linear_setup)


# -- conv2d ---------------------------------------------------------------------------------------
_CONV_ARGS = (
    f"Tensor x, Tensor weight, Tensor? bias, {STATE_SCHEMA}, Tensor? u, Tensor? v, {CONV_SCHEMA}, {SPEC_SCHEMA}"
)


def _split_conv(rest):
    stride, padding, dilation, groups, *spec_args = rest
    return (list(stride), list(padding), list(dilation), groups), spec_args


@custom_op("vcon::conv2d", mutates_args=(), schema=f"({_CONV_ARGS}, bool keep_t) -> (Tensor, Tensor)")
def conv2d(x, weight, bias, beta, threshold, scales, mask, u, v, *rest):
    *rest, keep_t = rest
    conv_args, spec_args = _split_conv(rest)
    spec = TransformSpec(*spec_args)
    y, t = conv2d_impl(x, weight, bias, beta, threshold, scales, mask, u, v, spec, conv_args, keep_t)
    return y, _or_empty(t, x, _format_of(x))  # t in the activation layout, like y


def conv2d_impl(x, weight, bias, beta, threshold, scales, mask, u, v, spec: TransformSpec, conv_args, keep_t=False):
    """(y, t): t = conv(x, V) (N, r, OH, OW) when ``keep_t`` on a low-rank layer, else None."""
    backend = backends.select(weight.device.type)
    keep_t = keep_t and spec.lowrank
    y = backend.conv2d_forward(x, weight, bias, beta, threshold, scales, mask, u, v, spec, conv_args, keep_t)
    y, t = y if keep_t else (y, None)
    fmt = _format_of(x)
    return y.contiguous(memory_format=fmt), (None if t is None else t.contiguous(memory_format=fmt))


def conv2d_backward_impl(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, spec, conv_args, needs,
                         t=None):
    backend = backends.select(weight.device.type)
    dx, dw, db, du, dv = backend.conv2d_backward(
        grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, spec, conv_args, tuple(needs), t
    )
    dx = _or_empty(dx, x, _format_of(x))
    return dx, _or_empty(dw, weight), _or_empty(db, weight), _or_empty(du, weight), _or_empty(dv, weight)


@conv2d.register_fake
def _(x, weight, bias, beta, threshold, scales, mask, u, v, *rest):
    *rest, keep_t = rest
    (stride, padding, dilation, _), spec_args = _split_conv(rest)
    n, _, h, w = x.shape
    kh, kw = weight.shape[-2:]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    fmt = _format_of(x)
    if keep_t and TransformSpec(*spec_args).lowrank and u is not None:
        t = _new((n, u.shape[1], oh, ow), x, fmt)
    else:
        t = x.new_empty(0)
    return _new((n, weight.shape[0], oh, ow), x, fmt), t


@custom_op(
    "vcon::conv2d_backward",
    mutates_args=(),
    schema=f"(Tensor grad_out, {_CONV_ARGS}, bool[] needs, Tensor? t) -> {_FIVE_GRADS}",
)
def conv2d_backward(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, *rest):
    *rest, needs, t = rest
    conv_args, spec_args = _split_conv(rest)
    spec = TransformSpec(*spec_args)
    return conv2d_backward_impl(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, spec, conv_args, needs,
                                t)


@conv2d_backward.register_fake
def _(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, *rest):
    return _fake_grads(x, weight, bias, u, v, rest[-2], _format_of(x))


def _conv_setup(ctx, inputs, output):
    x, weight, bias, beta, threshold, scales, mask, u, v, *rest, keep_t = inputs
    ctx.rest = rest
    ctx.backend = backends.forced()
    ctx.mark_non_differentiable(output[1])
    t = _kept_t(ctx, output[1], 7, keep_t, _split_conv(rest)[1])
    ctx.save_for_backward(_saved_input(ctx, x, 1, 7, 8), weight, bias, beta, threshold, scales, mask, u, v, t)


def _conv_backward(ctx, grad_out, _grad_t):
    *saved, t = ctx.saved_tensors
    needs = _needs(ctx, 0, 1, 2, 7, 8)
    with _backend_scope(ctx):
        grads = torch.ops.vcon.conv2d_backward(grad_out, *saved, *ctx.rest, needs, t)
    dx, dw, db, du, dv = _grads_tuple(grads, needs)
    return (dx, dw, db, None, None, None, None, du, dv) + (None,) * (4 + NUM_SPEC_ARGS + 1)  # + keep_t


register_autograd("vcon::conv2d", _conv_backward, setup_context=_conv_setup)

# -- autocast -------------------------------------------------------------------------------------
# The layer ops cast their activation (argument 0) to the autocast dtype; every other op only
# switches autocast off inside (see the module docstring and autocast.py).
for _name in ("linear", "conv2d"):
    register_autocast(f"vcon::{_name}", cast_args=(0,))
for _name in ("compute_state", "blend_weight", "weight_grad", "linear_backward", "conv2d_backward"):
    register_autocast(f"vcon::{_name}", cast_args=())
