"""The eager fast path of the layer ops: the ops' own code, without the op dispatcher.

A ``torch.library.custom_op`` call costs ~100-200 us of Python in eager mode (argument
normalization, the generated autograd wrapper, a redispatch per dispatch key), against
~10 us for the GEMM of a small layer. That is per layer and per call: ~200 linears of a
7B-class model pay it at every micro-batch. In eager mode, with plain tensors, the layers
call the same implementation functions (``library.linear_impl`` and friends) through a
``torch.autograd.Function`` instead: same kernels, same saved tensors, same backend choice,
same autocast behaviour (cast only the activation, switch autocast off inside). With the C++
backend the linear layer's node is C++ itself (``_C.linear_autograd``, csrc/autograd.cpp), so
the autograd engine runs its backward without entering Python.

The ops stay the path for everything that needs them: ``torch.compile`` (the ops are opaque
to it and never recompile on a beta change), tensor subclasses (DTensor, FakeTensor),
``__torch_function__`` / ``__torch_dispatch__`` modes and functorch transforms.
:func:`can_run` decides, per call.

Example (what ``VCONLinear.forward`` does)::

    if eager.can_run(x, weight):
        y = eager.linear(x, weight, bias, beta, threshold, scales, mask, u, v, spec)
    else:
        y = torch.ops.vcon.linear(x, weight, bias, beta, threshold, scales, mask, u, v, *spec.as_args(),
                                  keep_t=keeps_t(spec, u))[0]
"""

from __future__ import annotations

import contextlib

import torch

from . import backends
from .autocast import any_autocast_on
from .autocast import autocast_input
from .autocast import autocast_off
from .library import _backend_scope
from .library import _grads_tuple
from .library import _needs
from .library import _saved_input
from .library import conv2d_backward_impl
from .library import conv2d_impl
from .library import linear_backward_impl
from .library import linear_impl

Tensor = torch.Tensor
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _probe(name: str):
    """A torch._C predicate; a missing one (other torch version) answers "active" (the op path)."""
    fn = getattr(torch._C, name, None)
    return fn if fn is not None else (lambda: True)


_function_mode_on = _probe("_is_torch_function_mode_enabled")
_dispatch_modes = getattr(torch._C, "_len_torch_dispatch_stack", None)
_functorch_on = _probe("_are_functorch_transforms_active")


def can_run(*tensors) -> bool:
    """Whether the eager path computes what the op would: eager mode, plain tensors, no modes."""
    if torch.compiler.is_compiling() or _function_mode_on() or _functorch_on():
        return False
    if _dispatch_modes is None or _dispatch_modes() > 0:
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)


def _off_if_autocast():
    return autocast_off() if any_autocast_on() else contextlib.nullcontext()


# The ops' ``keep_t``: the low-rank activation t is kept for dU exactly when U needs a gradient
# (library._kept_t); here ctx.needs_input_grad says so before the forward runs.
class _Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, beta, threshold, scales, mask, u, v, spec):
        ctx.spec = spec
        ctx.backend = backends.forced()
        keep_t = spec.lowrank and ctx.needs_input_grad[7]
        with _off_if_autocast():
            y, t = linear_impl(x, weight, bias, beta, threshold, scales, mask, u, v, spec, keep_t)
        ctx.save_for_backward(_saved_input(ctx, x, 1, 7, 8), weight, bias, beta, threshold, scales, mask, u, v, t)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        needs = _needs(ctx, 0, 1, 2, 7, 8)
        *saved, t = ctx.saved_tensors
        with _backend_scope(ctx), _off_if_autocast():
            grads = linear_backward_impl(grad_out, *saved, ctx.spec, needs, t)
        dx, dw, db, du, dv = _grads_tuple(grads, needs)
        return dx, dw, db, None, None, None, None, du, dv, None


class _Conv2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, beta, threshold, scales, mask, u, v, spec, conv_args):
        ctx.spec, ctx.conv_args = spec, conv_args
        ctx.backend = backends.forced()
        keep_t = spec.lowrank and ctx.needs_input_grad[7]
        with _off_if_autocast():
            y, t = conv2d_impl(x, weight, bias, beta, threshold, scales, mask, u, v, spec, conv_args, keep_t)
        ctx.save_for_backward(_saved_input(ctx, x, 1, 7, 8), weight, bias, beta, threshold, scales, mask, u, v, t)
        return y

    @staticmethod
    def backward(ctx, grad_out):
        needs = _needs(ctx, 0, 1, 2, 7, 8)
        *saved, t = ctx.saved_tensors
        with _backend_scope(ctx), _off_if_autocast():
            grads = conv2d_backward_impl(grad_out, *saved, ctx.spec, ctx.conv_args, needs, t)
        dx, dw, db, du, dv = _grads_tuple(grads, needs)
        return dx, dw, db, None, None, None, None, du, dv, None, None


_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: True)


def linear_node(x, weight):
    """The C++ layer with its autograd node (``_C.linear_autograd``) when a call can go straight to it.

    That is: eager mode (the caller checked ``torch.compiler.is_compiling()``), grad mode on,
    plain CPU tensors of one dtype, no autocast, no torch-function / dispatch modes, no functorch
    transforms, and the C++ backend selected for CPU. Otherwise None: take ``linear_call``.
    Each check is a single C call or attribute read: for small layers, Python between the
    module call and the kernel is most of the cost (see the module docstring). The caller
    validates its arguments only when the node raises (``check_inputs`` then names the problem).
    Call it as ``node(x, weight, bias, beta, threshold, scales, mask, u, v, native_spec(spec))``.
    """
    if type(x) is not torch.Tensor or type(weight) not in _PLAIN or x.dtype is not weight.dtype:
        return None
    if not (weight.is_cpu and torch.is_grad_enabled()) or _any_autocast() or _function_mode_on() or _functorch_on():
        return None
    if _dispatch_modes is None or _dispatch_modes() > 0:
        return None
    return backends.cpu_linear_node()


def native_spec(spec):
    """The spec as ``linear_node`` takes it (built once per layer and cached by the caller), or None."""
    backend = backends._load("cpp")
    return None if backend is None else backend.native_spec(spec)


def _needs_graph(x, weight, bias, u, v) -> bool:
    if not torch.is_grad_enabled():
        return False
    return any(t is not None and t.requires_grad for t in (x, weight, bias, u, v))


def linear(x, weight, bias, beta, threshold, scales, mask, u, v, spec) -> Tensor:
    """``torch.ops.vcon.linear`` in eager mode (``spec``: a TransformSpec)."""
    x = autocast_input(x)
    if not _needs_graph(x, weight, bias, u, v):  # inference, eval, frozen layers on frozen inputs
        with _off_if_autocast():
            return linear_impl(x, weight, bias, beta, threshold, scales, mask, u, v, spec)[0]
    backend = backends.select(weight.device.type)
    native = getattr(backend, "linear_autograd", None)  # the C++ backend's node: no Python in backward
    if native is not None:  # switches autocast off itself, in forward and backward (csrc/autograd.cpp)
        return native(x, weight, bias, beta, threshold, scales, mask, u, v, spec)
    return _Linear.apply(x, weight, bias, beta, threshold, scales, mask, u, v, spec)


def conv2d(x, weight, bias, beta, threshold, scales, mask, u, v, spec, conv_args) -> Tensor:
    """``torch.ops.vcon.conv2d`` in eager mode; ``conv_args`` = (stride, padding, dilation, groups)."""
    x = autocast_input(x)
    if not _needs_graph(x, weight, bias, u, v):
        with _off_if_autocast():
            return conv2d_impl(x, weight, bias, beta, threshold, scales, mask, u, v, spec, conv_args)[0]
    return _Conv2d.apply(x, weight, bias, beta, threshold, scales, mask, u, v, spec, conv_args)


def compute_state(weight, beta, mask, spec):
    """``torch.ops.vcon.compute_state`` in eager mode: (threshold, scales), no autograd."""
    with torch.no_grad(), _off_if_autocast():
        return backends.select(weight.device.type).compute_state(weight.detach(), beta, mask, spec)


__all__ = ["can_run", "compute_state", "conv2d", "linear", "linear_node", "native_spec"]
