"""The ``torch.ops.vcon`` operators: one registration, every backend behind it.

Ops (all take the flat ``TransformSpec`` arguments last, see ``spec.py``):

* ``vcon::compute_state(weight, beta, mask) -> (threshold, scales)``: the reductions that
  must run before a blended GEMM (magnitude threshold, quantization scales). No autograd.
* ``vcon::linear(x, weight, bias, beta, threshold, scales, mask, u, v) -> y``: the blended
  linear layer, with autograd through ``vcon::linear_backward``.
* ``vcon::conv2d(...)``: the same for convolutions, through ``vcon::conv2d_backward``.
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
never reaches into an op's own GEMMs. Outputs: ``y`` / ``dx`` in the activation dtype;
``dW``, ``db``, ``dU``, ``dV`` in the parameters' dtype (fp32 gradients for fp32 parameters).
"""

from __future__ import annotations

import contextlib

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


# The op bodies are plain functions (``*_impl``, taking a TransformSpec) so that the eager fast
# path (eager.py) runs exactly the code the ops run.
def linear_impl(x, weight, bias, beta, threshold, scales, mask, u, v, spec: TransformSpec) -> Tensor:
    backend = backends.select(weight.device.type)
    if x.dim() == 2:  # the common case, without the reshape round trip
        return backend.linear_forward(x, weight, bias, beta, threshold, scales, mask, u, v, spec).contiguous()
    x2 = x.reshape(-1, x.shape[-1])
    y = backend.linear_forward(x2, weight, bias, beta, threshold, scales, mask, u, v, spec)
    # Not a view (a reshape would be one): autograd forbids in-place ops on a view made inside a
    # custom Function (nn.ReLU(inplace=True), `y += residual` after the layer), and FSDP2 drops its
    # pre-backward hook on one. _unsafe_view is how aten.matmul returns N-D results for this reason.
    return torch.ops.aten._unsafe_view(y.contiguous(), (*x.shape[:-1], weight.shape[0]))


def linear_backward_impl(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, spec, needs):
    """(dx, dW, db, dU, dV); an empty tensor for each gradient ``needs`` does not ask for."""
    backend = backends.select(weight.device.type)
    g2 = grad_out.reshape(-1, grad_out.shape[-1])
    x2 = x.reshape(-1, x.shape[-1])
    dx, dw, db, du, dv = backend.linear_backward(
        g2, x2, weight, bias, beta, threshold, scales, mask, u, v, spec, tuple(needs)
    )
    dx = None if dx is None else dx.reshape(x.shape)
    return _or_empty(dx, x), _or_empty(dw, weight), _or_empty(db, weight), _or_empty(du, weight), _or_empty(dv, weight)


@custom_op("vcon::linear", mutates_args=(), schema=f"({_LINEAR_ARGS}) -> Tensor")
def linear(x, weight, bias, beta, threshold, scales, mask, u, v, *spec_args):
    return linear_impl(x, weight, bias, beta, threshold, scales, mask, u, v, TransformSpec(*spec_args))


@linear.register_fake
def _(x, weight, bias, beta, threshold, scales, mask, u, v, *spec_args):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


@custom_op(
    "vcon::linear_backward",
    mutates_args=(),
    schema=f"(Tensor grad_out, {_LINEAR_ARGS}, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def linear_backward(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, *rest):
    *spec_args, needs = rest
    spec = TransformSpec(*spec_args)
    return linear_backward_impl(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, spec, needs)


@linear_backward.register_fake
def _(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, *rest):
    return _fake_grads(x, weight, bias, u, v, rest[-1])


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


def _backend_scope(ctx):
    """The backend forced at forward time, re-applied around the backward op.

    Autograd may run the backward on another thread (always on CUDA), where a thread-local
    ``vk.backends.use(...)`` of the forward would not be seen.
    """
    return backends.use(ctx.backend) if ctx.backend is not None else contextlib.nullcontext()


def _linear_setup(ctx, inputs, output):
    x, weight, bias, beta, threshold, scales, mask, u, v, *spec_args = inputs
    ctx.spec_args = spec_args
    ctx.backend = backends.forced()
    ctx.save_for_backward(_saved_input(ctx, x, 1, 7, 8), weight, bias, beta, threshold, scales, mask, u, v)


def _linear_backward(ctx, grad_out):
    saved = ctx.saved_tensors
    needs = _needs(ctx, 0, 1, 2, 7, 8)
    with _backend_scope(ctx):
        grads = torch.ops.vcon.linear_backward(grad_out, *saved, *ctx.spec_args, needs)
    dx, dw, db, du, dv = _grads_tuple(grads, needs)
    return (dx, dw, db, None, None, None, None, du, dv) + (None,) * NUM_SPEC_ARGS


register_autograd("vcon::linear", _linear_backward, setup_context=_linear_setup)


# -- conv2d ---------------------------------------------------------------------------------------
_CONV_ARGS = (
    f"Tensor x, Tensor weight, Tensor? bias, {STATE_SCHEMA}, Tensor? u, Tensor? v, {CONV_SCHEMA}, {SPEC_SCHEMA}"
)


def _split_conv(rest):
    stride, padding, dilation, groups, *spec_args = rest
    return (list(stride), list(padding), list(dilation), groups), spec_args


@custom_op("vcon::conv2d", mutates_args=(), schema=f"({_CONV_ARGS}) -> Tensor")
def conv2d(x, weight, bias, beta, threshold, scales, mask, u, v, *rest):
    conv_args, spec_args = _split_conv(rest)
    return conv2d_impl(x, weight, bias, beta, threshold, scales, mask, u, v, TransformSpec(*spec_args), conv_args)


def conv2d_impl(x, weight, bias, beta, threshold, scales, mask, u, v, spec: TransformSpec, conv_args) -> Tensor:
    backend = backends.select(weight.device.type)
    y = backend.conv2d_forward(x, weight, bias, beta, threshold, scales, mask, u, v, spec, conv_args)
    return y.contiguous(memory_format=_format_of(x))


def conv2d_backward_impl(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, spec, conv_args, needs):
    backend = backends.select(weight.device.type)
    dx, dw, db, du, dv = backend.conv2d_backward(
        grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, spec, conv_args, tuple(needs)
    )
    dx = _or_empty(dx, x, _format_of(x))
    return dx, _or_empty(dw, weight), _or_empty(db, weight), _or_empty(du, weight), _or_empty(dv, weight)


@conv2d.register_fake
def _(x, weight, bias, beta, threshold, scales, mask, u, v, *rest):
    (stride, padding, dilation, _), _ = _split_conv(rest)
    n, _, h, w = x.shape
    kh, kw = weight.shape[-2:]
    oh = (h + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    ow = (w + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    return _new((n, weight.shape[0], oh, ow), x, _format_of(x))


@custom_op(
    "vcon::conv2d_backward",
    mutates_args=(),
    schema=f"(Tensor grad_out, {_CONV_ARGS}, bool[] needs) -> (Tensor, Tensor, Tensor, Tensor, Tensor)",
)
def conv2d_backward(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, *rest):
    *rest, needs = rest
    conv_args, spec_args = _split_conv(rest)
    spec = TransformSpec(*spec_args)
    return conv2d_backward_impl(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, spec, conv_args, needs)


@conv2d_backward.register_fake
def _(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, *rest):
    return _fake_grads(x, weight, bias, u, v, rest[-1], _format_of(x))


def _conv_setup(ctx, inputs, output):
    x, weight, bias, beta, threshold, scales, mask, u, v, *rest = inputs
    ctx.rest = rest
    ctx.backend = backends.forced()
    ctx.save_for_backward(_saved_input(ctx, x, 1, 7, 8), weight, bias, beta, threshold, scales, mask, u, v)


def _conv_backward(ctx, grad_out):
    needs = _needs(ctx, 0, 1, 2, 7, 8)
    with _backend_scope(ctx):
        grads = torch.ops.vcon.conv2d_backward(grad_out, *ctx.saved_tensors, *ctx.rest, needs)
    dx, dw, db, du, dv = _grads_tuple(grads, needs)
    return (dx, dw, db, None, None, None, None, du, dv) + (None,) * (4 + NUM_SPEC_ARGS)


register_autograd("vcon::conv2d", _conv_backward, setup_context=_conv_setup)

# -- autocast -------------------------------------------------------------------------------------
# The layer ops cast their activation (argument 0) to the autocast dtype; every other op only
# switches autocast off inside (see the module docstring and autocast.py).
for _name in ("linear", "conv2d"):
    register_autocast(f"vcon::{_name}", cast_args=(0,))
for _name in ("compute_state", "blend_weight", "weight_grad", "linear_backward", "conv2d_backward"):
    register_autocast(f"vcon::{_name}", cast_args=())
