"""vcon_kernels: fused VCON (Vanishing Contributions) compression layers for PyTorch.

Example usage::

    import vcon_kernels as vk
    model = vk.convert(model, vk.Prune(sparsity=0.9))
    sched = vk.VCONScheduler(model, steps=1000)
    for batch in loader:
        ...; optimizer.step(); sched.step()
    model = vk.finalize(model)
"""

from . import backends
from . import functional
from . import library  # noqa: F401  (registers torch.ops.vcon)
from . import state_cache
from .compressed import CompressedConv2d
from .compressed import CompressedLinear
from .compressed import LowRankConv2d
from .compressed import LowRankLinear
from .configs import Compose
from .configs import LowRank
from .configs import Prune
from .configs import Quantize
from .configs import VCONConfig
from .convert import convert
from .convert import finalize
from .convert import refresh_masks
from .convert import storage_bytes
from .convert import vcon_layers
from .explain import explain
from .functional import VCONState
from .integrations.saving import load_compressed
from .integrations.saving import save_compressed
from .modules import VCONConv2d
from .modules import VCONLinear
from .scheduler import VCONScheduler
from .state_cache import refresh as refresh_state

# Every optimizer step starts a new generation of cached layer state (state_cache.py).
state_cache.install_optimizer_hook()

__version__ = "0.1.0"

__all__ = [
    # configs
    "Compose", "LowRank", "Prune", "Quantize", "VCONConfig",
    # layers and state
    "VCONConv2d", "VCONLinear", "VCONState",
    # model-level
    "VCONScheduler", "convert", "explain", "finalize", "refresh_masks", "refresh_state", "storage_bytes",
    "vcon_layers",
    # saving finalized models (integrations/saving.py)
    "load_compressed", "save_compressed",
    # finalized layers
    "CompressedConv2d", "CompressedLinear", "LowRankConv2d", "LowRankLinear",
    # submodules
    "backends", "functional", "state_cache",
]
