"""The C++ CPU backend: the fused ops of ``csrc/`` (extension ``vcon_kernels._C``).

What it makes faster than :class:`TorchBackend` on CPU tensors:

* ``compute_state``: magnitude thresholds by radix select on the float bits (not
  ``torch.kthvalue``), absmax / mean-of-non-zero scales in one vectorized pass;
* ``blend_weight`` / ``weight_grad``: the whole transform (prune, fake quant, blend) in
  one pass over W instead of a chain of torch ops with a temporary each;
* ``linear_forward`` / ``linear_backward``: W_eff built into a reused per-thread
  workspace and consumed by one GEMM (the same ``addmm`` / ``mm`` calls as the plain-torch
  backend, so results are bit-identical where the transform is); low rank picks the
  cheaper of a weight-space and an activation-space form by FLOP count; its backward takes
  the forward's t' = (1 - beta) x V^T for dU where the activation-space form needs it.

Convolutions use the inherited plain-torch code around the C++ ``blend_weight`` and
``weight_grad``.

The extension is optional. When it is missing (no compiler at install time) or stale,
:meth:`CppBackend.is_available` is False with the reason in ``unavailable_reason``, and
``backends.select`` falls back to plain torch with one warning.

Example usage::

    import vcon_kernels as vk
    with vk.backends.use("cpp"):      # force it (an error if the extension is missing)
        y = layer(x)
"""

from __future__ import annotations

import functools
from typing import Optional

from ..spec import PRUNE_THRESHOLD
from ..spec import TransformSpec
from ..torch_transforms import kept_count
from .torch_backend import TorchBackend

# The extension's binding version this module is written for (csrc/module.cpp kAbiVersion).
ABI_VERSION = 4
BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (needs a C++ compiler)"

try:
    from .. import _C
except ImportError as exc:  # not built: the package still works through plain torch
    _C = None
    _IMPORT_ERROR = f"the C++ extension vcon_kernels._C is not built ({exc}); {BUILD_HINT}"
else:
    _IMPORT_ERROR = None
    if getattr(_C, "ABI_VERSION", None) != ABI_VERSION:
        _IMPORT_ERROR = (
            f"the C++ extension vcon_kernels._C is stale (ABI {getattr(_C, 'ABI_VERSION', None)}, "
            f"expected {ABI_VERSION}); re{BUILD_HINT[1:]}"
        )
        _C = None


@functools.lru_cache(maxsize=256)
def _cpp_spec(spec: TransformSpec):
    return _C.Spec(*spec.as_args())


def _kept(weight, spec: TransformSpec) -> int:
    if spec.prune != PRUNE_THRESHOLD:
        return 0
    rows, cols = weight.shape
    return kept_count(cols if spec.per_row else rows * cols, spec.sparsity)


class CppBackend(TorchBackend):
    name = "cpp"

    def __init__(self):
        self.unavailable_reason: Optional[str] = _IMPORT_ERROR

    def is_available(self) -> bool:
        return _C is not None

    @property
    def isa(self) -> str:
        """The kernel ISA in use ("avx2" or "default")."""
        return _C.isa()

    # -- per-layer state ------------------------------------------------------------------
    def compute_state(self, weight, beta, mask, spec: TransformSpec):
        return _C.compute_state(weight, beta, mask, _cpp_spec(spec), _kept(weight, spec))

    # -- the blended weight -----------------------------------------------------------------
    def blend_weight(self, weight, beta, threshold, scales, mask, spec: TransformSpec):
        return _C.blend_weight(weight, beta, threshold, scales, mask, _cpp_spec(spec))

    def weight_grad(self, grad_w_eff, weight, beta, threshold, scales, mask, spec: TransformSpec):
        return _C.weight_grad(grad_w_eff, weight, beta, threshold, scales, mask, _cpp_spec(spec))

    # -- linear -----------------------------------------------------------------------------
    def linear_forward(self, x, weight, bias, beta, threshold, scales, mask, u, v, spec: TransformSpec,
                       keep_t: bool = False):
        # keep_t: t' always (KeepT::kAlways): the op's outputs have fixed shapes (csrc/ops.h)
        y, t = _C.linear_forward(x, weight, bias, beta, threshold, scales, mask, u, v, _cpp_spec(spec),
                                 2 if keep_t else 0)
        return (y, t) if keep_t else y

    @property
    def linear_node(self):
        """``_C.linear_autograd`` itself: arguments as ``linear_autograd``'s, the spec as ``native_spec(spec)``."""
        return _C.linear_autograd

    @staticmethod
    def native_spec(spec: TransformSpec):
        return _cpp_spec(spec)

    def linear_autograd(self, x, weight, bias, beta, threshold, scales, mask, u, v, spec: TransformSpec):
        """The eager layer with its autograd node in C++ (csrc/autograd.cpp): no Python in backward."""
        return _C.linear_autograd(x, weight, bias, beta, threshold, scales, mask, u, v, _cpp_spec(spec))

    def linear_backward(self, grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, spec, needs, t=None):
        return tuple(
            _C.linear_backward(grad_out, x, weight, bias, beta, threshold, scales, mask, u, v, _cpp_spec(spec),
                               list(needs), t)
        )

    # -- introspection -----------------------------------------------------------------------
    def explain(self, x_shape, weight_shape, spec: TransformSpec, device) -> str:
        isa = _C.isa()
        if spec.lowrank:
            m = 1
            for d in x_shape[:-1]:
                m *= int(d)
            n, k = weight_shape
            if n * k <= m * (n + k):  # the rule of csrc/linear.cpp
                return (f"cpp ({isa}): low rank in weight space: W_eff = beta W + (1-beta) U V by one addmm into "
                        "a reused workspace, then one GEMM (M large enough to amortize N K r)")
            return (f"cpp ({isa}): low rank in activation space: beta x W^T and (1-beta) (x V^T) U^T accumulated "
                    "by addmm into the output (M too small to amortize building W_eff)")
        return (f"cpp ({isa}): W_eff built in one vectorized pass into a reused per-thread workspace, "
                "then one addmm; rebuilt the same way for the input gradient")
