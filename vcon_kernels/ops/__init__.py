"""Triton kernels of the VCON ops, one op per file (kernels + launcher).

The autograd glue is ``library.py`` (custom ops, backward ops); the Triton backend
(``backends/triton_backend.py``) calls the launchers below.

* ``threshold.py``: per-layer / per-row magnitude threshold (radix select).
* ``scales.py``: quantization scales of the prune-blended weight.
* ``blend_weight.py``: W_eff in one elementwise kernel.
* ``weight_grad.py``: the exact-mode gradient coefficient as an elementwise epilogue.
* ``vcon_matmul.py``: the tiled GEMM with the in-register W transform and the low-rank fold.
* ``linear_forward.py`` / ``linear_backward.py``: the linear layer, per strategy (``dispatch.py``).
* ``transform.py``: the in-register transforms shared by all of them; ``utils.py``: launch helpers.
* ``dequant_matmul.py``: finalized layers' weight-only GEMM over the stored codes (CUDA path of
  ``compressed/matmul.py``; imported there, not here).
"""

from . import dispatch
from . import linear_backward
from . import linear_forward
from . import utils
from . import vcon_matmul
from .blend_weight import blend_weight
from .scales import quant_scales
from .threshold import prune_threshold
from .weight_grad import weight_grad
from .weight_state import WeightState

__all__ = [
    "WeightState", "blend_weight", "dispatch", "linear_backward", "linear_forward", "prune_threshold",
    "quant_scales", "utils", "vcon_matmul", "weight_grad",
]
