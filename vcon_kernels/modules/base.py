"""What every VCON layer shares: config, per-stage beta, stored mask, low-rank factors.

A layer holds parameters and state; it never computes the blend itself. Its forward is
one call into ``vcon_kernels.functional``.

State kept per layer:

* ``beta`` (buffer, fp32, one entry per stage in ``stage_names``): 1.0 at creation,
  written by ``set_beta`` / ``VCONScheduler``. It stays fp32 when the module is cast
  (``.half()``, ``.to(torch.bfloat16)``): a bf16 beta would round a linear schedule into
  a staircase.
* ``mask`` (buffer, uint8, bit-packed (N, ceil(K/8))) only for pruning with
  ``update="once"`` or an int ``k``; with ``update="step"`` the mask is re-derived from the
  weights at every call and nothing is stored.
* ``lowrank_u`` / ``lowrank_v`` (parameters) for ``LowRank``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from .. import eager
from .. import state_cache
from .. import torch_transforms as transforms
from ..configs import LowRank
from ..configs import VCONConfig
from ..configs import prune_stage
from ..functional import VCONState
from ..functional import blended_weight
from ..functional import check_beta_value
from ..functional import layer_state
from ..functional import needs_state
from ..packing import pack_mask

try:
    from torch.distributed.tensor import DTensor
except ImportError:  # torch built without distributed support
    DTensor = None


def check_config(config) -> VCONConfig:
    if not isinstance(config, VCONConfig):
        raise TypeError(
            "config must be a vcon_kernels config (vk.Prune, vk.Quantize, vk.LowRank or vk.Compose), "
            f"got {type(config).__name__}"
        )
    return config


def _unsharded(weight: torch.Tensor) -> torch.Tensor:
    """The full weight, also outside forward under FSDP2, where parameters are sharded DTensors.

    Gathering is a collective: every rank calls it, as every rank steps the scheduler.
    """
    if DTensor is not None and isinstance(weight, DTensor):
        return weight.full_tensor()
    return weight


try:
    from torch.distributed.fsdp import FSDPModule
except ImportError:  # older torch (FSDP2 under _composable) or no distributed support
    try:
        from torch.distributed._composable.fsdp import FSDPModule
    except ImportError:
        FSDPModule = None


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _needs_every_gradient(module: nn.Module) -> bool:
    """Whether a parameter without a gradient would break the job: DDP (its reducer waits for every
    parameter it was built with). FSDP2 (``fully_shard``) reduces only the gradients that exist."""
    return _distributed() and not (FSDPModule is not None and isinstance(module, FSDPModule))


def check_finite(weight: torch.Tensor, where: str) -> None:
    if weight.is_meta:
        raise ValueError(
            f"{where}: weight is on the meta device (not materialized); masks, scales and low-rank factors "
            "are derived from the weights, so convert after the weights are loaded"
        )
    if not torch.isfinite(weight).all():
        raise ValueError(f"{where}: weight has NaN or Inf entries; VCON cannot derive masks/scales from it")


class VCONLayerBase(nn.Module):
    """Shared behaviour of :class:`VCONLinear` and :class:`VCONConv2d` (not used directly)."""

    config: VCONConfig
    mask: Optional[torch.Tensor]
    # Per-call caches (plain attributes, never in the state dict; see call_spec / call_state).
    _spec_cache = None
    _vcon_state_cache = None
    _beta_host = None  # (beta tensor, its version, whether every entry is 0): beta's value without a device sync

    def _init_vcon_state(self, config: VCONConfig) -> None:
        """Called once the layer has ``weight`` (and ``bias``); builds beta, mask, U and V."""
        self.config = config
        self.stage_names = tuple(config.stage_names)
        device = self.weight.device
        self.register_buffer("beta", torch.ones(len(self.stage_names), dtype=torch.float32, device=device))
        self.register_buffer("mask", None)
        if isinstance(config, LowRank):
            self._init_lowrank()
        prune = prune_stage(config)
        if prune is not None and prune.stores_mask:
            self.register_buffer("mask", self._current_mask())

    # -- weights as the (N, K) matrix the transforms work on ------------------------------------
    def weight_2d(self) -> torch.Tensor:
        return self.weight.reshape(self.weight.shape[0], -1)

    @property
    def state(self) -> VCONState:
        # Straight from the registries: getattr on a missing name goes through nn.Module.__getattr__'s
        # AttributeError path, which costs more than the rest of a small layer's forward.
        params = self._parameters
        return VCONState(self._buffers.get("mask"), params.get("lowrank_u"), params.get("lowrank_v"))

    def spec(self):
        rows, cols = self.weight_2d().shape
        return self.config.spec(rows, cols, stored_mask=self.mask is not None)

    # -- per-call arguments, cached between the changes that invalidate them ---------------------
    def call_spec(self):
        """``spec()``, rebuilt only when the config, the weight shape or the mask presence changes."""
        config, shape, has_mask = self.config, self.weight.shape, self._buffers.get("mask") is not None
        cached = self._spec_cache
        if cached is not None and cached[0] is config and cached[1] == shape and cached[2] == has_mask:
            return cached[3]
        spec = config.spec(shape[0], math.prod(shape[1:]), stored_mask=has_mask)
        self._spec_cache = (config, shape, has_mask, spec, eager.native_spec(spec))
        return spec

    def call_state(self, spec):
        """(threshold, scales) for this call: the cached ones while W, beta and the mask are unchanged.

        See ``state_cache.py`` for the key and what it cannot see.
        """
        weight, buffers = self.weight, self._buffers
        beta, mask = buffers["beta"], buffers.get("mask")
        cached = self._vcon_state_cache
        if not needs_state(spec):
            if cached is None or cached[0] != weight.device:
                empty = torch.empty(0, dtype=torch.float32, device=weight.device)
                cached = self._vcon_state_cache = (weight.device, empty, empty, None)
            return cached[1], cached[2]
        # Training calls only (grad mode on, module in train mode): micro-batches and checkpoint
        # recomputes reuse the state; eval and no-grad calls, after which weights are edited
        # through .data (PEFT's merge, zeroth-order updates), recompute it.
        key = state_cache.key(weight, beta, mask) if (self.training and torch.is_grad_enabled()) else None
        if key is not None and cached is not None and cached[0] == key and cached[3] is spec:
            return cached[1], cached[2]
        threshold, scales = layer_state(self.weight_2d(), beta, spec, mask)
        self._vcon_state_cache = None if key is None else (key, threshold, scales, spec)
        return threshold, scales

    def call_weight(self, spec):
        """The weight argument of a training call: ``weight``, or ``weight.detach()`` once low rank's beta is 0.

        At beta = 0 a low-rank layer's output no longer depends on W (the dense path is stopped).
        Detaching W gives it no gradient at all, as for a frozen parameter: no W-sized gradient is
        written and optimizers skip W (AdamW's update of the latent weights was a quarter of a
        12-layer low-rank step, bench/NOTES.md). Raising beta again makes W train again, from where
        it stopped. Two cases keep W attached, where the kernels give it a zero gradient instead
        (W then still moves by AdamW's momentum and weight decay): a distributed job other than
        FSDP2 (DDP's reducer waits for a gradient of every parameter it was built with) and a beta
        on a GPU that cannot be read without a device sync (written other than by ``set_beta``).
        """
        weight = self.weight
        if not spec.lowrank or not weight.requires_grad or not torch.is_grad_enabled():
            return weight
        if self._beta_is_zero() and not _needs_every_gradient(self):
            return weight.detach()
        return weight

    def _beta_is_zero(self) -> bool:
        beta = self._buffers["beta"]
        known = self._beta_host
        if known is None or known[0] is not beta or known[1] != beta._version:
            if beta.device.type != "cpu":
                return False  # reading it would wait for the device; set_beta records the value it writes
            known = self._beta_host = (beta, beta._version, not bool(beta.any()))
        return known[2]

    _CALL_CACHES = ("_spec_cache", "_vcon_state_cache", "_beta_host")

    def _drop_call_caches(self) -> None:
        for name in self._CALL_CACHES:
            setattr(self, name, None)

    def __getstate__(self):
        # copy.deepcopy / pickle (EMA copies, Trainer, torch.save of the module): the per-call caches
        # are not part of the layer; the native spec in _spec_cache cannot even be pickled.
        state = dict(super().__getstate__())
        for name in self._CALL_CACHES:
            state.pop(name, None)
        return state

    def _load_from_state_dict(self, *args, **kwargs):
        self._drop_call_caches()
        super()._load_from_state_dict(*args, **kwargs)

    # -- beta ------------------------------------------------------------------------------------
    def _stage_index(self, stage: Optional[str]) -> Optional[int]:
        if stage is None:
            return None
        if stage not in self.stage_names:
            raise ValueError(f"stage must be one of {self.stage_names} for this layer, got {stage!r}")
        return self.stage_names.index(stage)

    @torch.no_grad()
    def set_beta(self, value: float, stage: Optional[str] = None) -> None:
        """Set beta (in [0, 1]) of one stage, or of every stage when ``stage`` is None."""
        value = check_beta_value(value)
        index = self._stage_index(stage)
        if index is None:
            self.beta.fill_(value)
            self._beta_host = (self.beta, self.beta._version, value == 0.0)
        else:
            self.beta[index] = value

    def get_beta(self, stage: Optional[str] = None) -> float:
        index = self._stage_index(stage)
        if index is None:
            if len(self.stage_names) != 1:
                raise ValueError(f"this layer has stages {self.stage_names}; name one")
            index = 0
        return float(self.beta[index])

    def _apply(self, fn, recurse=True):
        self._drop_call_caches()
        beta = self.beta
        super()._apply(fn, recurse)
        if self.beta.dtype != torch.float32:
            self.beta = beta.to(device=self.beta.device, dtype=torch.float32)
        return self

    # -- mask ------------------------------------------------------------------------------------
    @torch.no_grad()
    def _current_mask(self) -> torch.Tensor:
        """Bit-packed keep-mask derived from the current weights (the config's rule)."""
        w2d = _unsharded(self.weight).reshape(self.weight.shape[0], -1)
        rows, cols = w2d.shape
        spec = self.config.spec(rows, cols, stored_mask=False)
        threshold, _ = layer_state(w2d, self.beta, spec, None)
        return pack_mask(transforms.keep_mask(w2d, threshold, None, spec))

    @torch.no_grad()
    def refresh_mask(self) -> None:
        """Re-derive a stored mask from the current weights (no-op for online masks)."""
        if self.mask is not None:
            self.mask.copy_(self._current_mask())

    # -- low rank ---------------------------------------------------------------------------------
    def _lowrank_shapes(self, rank: int):
        raise NotImplementedError

    @torch.no_grad()
    def _rederive_vcon_state(self) -> None:
        """After the weight was re-initialized: stored mask and low-rank factors from the new W.

        The factors are written in place, so optimizers holding them keep working.
        """
        if not hasattr(self, "config"):  # nn.Module.__init__ of a subclass, before _init_vcon_state
            return
        self._drop_call_caches()
        self.refresh_mask()
        if getattr(self, "lowrank_u", None) is not None:
            u, v = self.lowrank_u, self.lowrank_v
            self._init_lowrank()
            u.copy_(self.lowrank_u)
            v.copy_(self.lowrank_v)
            self.lowrank_u, self.lowrank_v = u, v

    def effective_weight(self) -> torch.Tensor:
        """The weight this layer computes with now: ``beta W + (1 - beta) C(W)`` (no autograd).

        Low rank: ``beta W + (1 - beta) U V`` (the product of the factors, for inspection).
        """
        with torch.no_grad():
            if getattr(self, "lowrank_u", None) is not None:
                b = self.beta[0]
                lr = (self.lowrank_u.reshape(self.lowrank_u.shape[0], -1) @ self.lowrank_v.reshape(self.rank, -1))
                return (b * self.weight_2d() + (1 - b) * lr).to(self.weight.dtype).reshape(self.weight.shape)
            return blended_weight(self.weight, self.beta, self.config, self.state)

    @torch.no_grad()
    def _init_lowrank(self) -> None:
        w2d = self.weight_2d()
        rows, cols = w2d.shape
        rank = self.config.rank_for(rows, cols)
        u, s, vh = torch.linalg.svd(w2d.detach().to(torch.float64), full_matrices=False)
        if self.config.init == "reference":  # all of S in U, as the authors' code
            left, right = s[:rank], torch.ones_like(s[:rank])
        else:
            left = right = s[:rank].sqrt()
        u_shape, v_shape = self._lowrank_shapes(rank)
        # Contiguous: LAPACK returns column-major factors, and FSDP2 cannot shard such parameters.
        factor_u = (u[:, :rank] * left).reshape(u_shape).to(self.weight.dtype).contiguous()
        factor_v = (right[:, None] * vh[:rank]).reshape(v_shape).to(self.weight.dtype).contiguous()
        self.lowrank_u = nn.Parameter(factor_u, requires_grad=self.weight.requires_grad)
        self.lowrank_v = nn.Parameter(factor_v, requires_grad=self.weight.requires_grad)

    @property
    def rank(self) -> Optional[int]:
        v = getattr(self, "lowrank_v", None)
        return None if v is None else v.shape[0]

    def _vcon_repr(self) -> str:
        betas = ", ".join(f"{n}={b:.4g}" for n, b in zip(self.stage_names, self.beta.tolist()))
        return f"config={self.config}, beta=({betas})"
