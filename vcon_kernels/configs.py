"""Compression configs: *what* a VCON layer turns into.

Each config validates its arguments in the constructor, so a bad value raises at
``vk.Prune(...)`` and not at the first forward. Shape-dependent checks (N:M groups,
quantization groups and ranks that must fit the layer) run in ``check_layer`` when a
layer is built, before any module is touched.

Example usage::

    import vcon_kernels as vk
    cfg = vk.Compose(vk.Prune(sparsity=0.5, granularity="row"), vk.Quantize(bits=4))
    model = vk.convert(model, cfg)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from dataclasses import field
from typing import Optional
from typing import Union

from .spec import PRUNE_MASK
from .spec import PRUNE_NM
from .spec import PRUNE_NONE
from .spec import PRUNE_THRESHOLD
from .spec import TransformSpec

GRAD_MODES = ("ste", "exact")
PRUNE_GRANULARITIES = ("layer", "row", "nm")
DEFAULT_GROUP_SIZE = 128
QUANT_BITS = (1, 2, 4, 8)
QUANT_GRANULARITIES = ("channel", "group", "tensor")


def _check_grad(grad):
    if grad not in GRAD_MODES:
        raise ValueError(f"grad must be one of {GRAD_MODES}, got {grad!r}")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class VCONConfig:
    """Base class of every compression config.

    ``stage_names`` lists the transitions the config brings, in the order they are
    applied; each has its own ``beta`` in the layer and its own schedule.
    """

    grad: str

    @property
    def stage_names(self) -> tuple[str, ...]:
        raise NotImplementedError

    @property
    def is_lowrank(self) -> bool:
        return False

    def check_layer(self, out_features: int, in_features: int, where: str = "layer") -> None:
        """Raise ``ValueError`` if this config cannot apply to an (N, K) weight."""

    def spec(self, out_features: int, in_features: int, stored_mask: bool = False) -> TransformSpec:
        raise NotImplementedError


@dataclass(frozen=True)
class Prune(VCONConfig):
    """Magnitude pruning: g uses ``W * M`` with a 0/1 mask ``M``.

    Args:
        sparsity: fraction of weights removed, in [0, 1). Required for ``"layer"`` and
            ``"row"``; for ``"nm"`` it is ``1 - n/m`` and may be omitted.
        granularity: ``"layer"`` keeps the ``round(numel * (1 - sparsity))`` largest |W|
            of the whole matrix, ``"row"`` keeps ``round(K * (1 - sparsity))`` per output
            row, ``"nm"`` keeps the ``n`` largest |W| of every ``m`` consecutive inputs
            (ties: the lower index wins).
        update: ``"step"`` re-derives the mask from the current weights at every call
            (as in the reference code; nothing is stored), ``"once"`` freezes it at
            conversion, an int ``k`` refreshes it every ``k`` scheduler steps. Frozen
            masks are stored bit-packed in the layer's ``state_dict``.
        grad: ``"ste"`` (dW = dY^T X) or ``"exact"`` (dW = (beta + (1-beta) M) dY^T X).

    Example usage::

        vk.Prune(sparsity=0.9)                                  # per layer, online mask
        vk.Prune(granularity="nm", n=2, m=4, update="once")     # frozen 2:4 mask
    """

    sparsity: Optional[float] = None
    granularity: str = "layer"
    n: int = 2
    m: int = 4
    update: Union[str, int] = "step"
    grad: str = "ste"

    def __post_init__(self):
        if self.granularity not in PRUNE_GRANULARITIES:
            raise ValueError(f"granularity must be one of {PRUNE_GRANULARITIES}, got {self.granularity!r}")
        if self.granularity == "nm":
            if not (_is_int(self.n) and _is_int(self.m)) or self.n < 1 or self.m < 2 or self.n >= self.m:
                raise ValueError(f"N:M pruning needs integers 1 <= n < m, got n={self.n!r}, m={self.m!r}")
            if self.m > 256:
                raise ValueError(f"m must be at most 256, got m={self.m}")
            implied = 1.0 - self.n / self.m
            if self.sparsity is not None and abs(self.sparsity - implied) > 1e-9:
                raise ValueError(
                    f"sparsity={self.sparsity!r} contradicts n={self.n}, m={self.m} (which keep "
                    f"sparsity {implied:g}); omit sparsity for granularity='nm'"
                )
            object.__setattr__(self, "sparsity", implied)
        else:
            if self.sparsity is None:
                raise ValueError(f"sparsity is required for granularity={self.granularity!r} (a float in [0, 1))")
            if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)):
                raise TypeError(f"sparsity must be a float in [0, 1), got {type(self.sparsity).__name__}")
            if not (0.0 <= float(self.sparsity) < 1.0) or math.isnan(self.sparsity):
                raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
            object.__setattr__(self, "sparsity", float(self.sparsity))
        if not (self.update in ("step", "once") or (_is_int(self.update) and self.update >= 1)):
            raise ValueError(
                f"update must be 'step', 'once' or a positive int k (refresh every k steps), got {self.update!r}"
            )
        _check_grad(self.grad)

    @property
    def stage_names(self):
        return ("prune",)

    @property
    def stores_mask(self) -> bool:
        return self.update != "step"

    def check_layer(self, out_features, in_features, where="layer"):
        if self.granularity == "nm" and in_features % self.m != 0:
            raise ValueError(
                f"{where}: N:M pruning needs m={self.m} to divide the input dim {in_features} (no padding is done)"
            )

    def prune_fields(self, stored_mask: bool) -> dict:
        if stored_mask:
            kind = PRUNE_MASK
        elif self.granularity == "nm":
            kind = PRUNE_NM
        else:
            kind = PRUNE_THRESHOLD
        return dict(
            prune=kind,
            sparsity=self.sparsity,
            per_row=self.granularity == "row",
            nm_n=self.n if self.granularity == "nm" else 0,
            nm_m=self.m if self.granularity == "nm" else 0,
        )

    def spec(self, out_features, in_features, stored_mask=False):
        return TransformSpec(**self.prune_fields(stored_mask), exact=self.grad == "exact")


@dataclass(frozen=True)
class Quantize(VCONConfig):
    """Symmetric fake quantization: g uses ``Q(W)``.

    ``bits`` in {8, 4, 2}: ``s = max|W| / qmax`` per group, ``Q(W) = s * clamp(round(W / s),
    qmin, qmax)`` with ``qmax = 2^(bits-1) - 1``, ``qmin = -2^(bits-1)`` and round half to
    even. ``bits=1`` is binary: ``Q(W) = s * sign(W)`` with ``s`` the mean |W| over the
    group's non-zero entries (the L2-optimal scale; equal to mean|W| when nothing is
    pruned). Scales are kept in fp32 and follow the weights at every call.

    Args:
        granularity: ``"channel"`` (one scale per output row), ``"group"`` (one per
            ``group_size`` consecutive inputs of a row) or ``"tensor"`` (one per layer, as
            in the reference binary code).
        group_size: only with ``granularity="group"`` (default 128 there); passing it with
            another granularity raises instead of being ignored.
        grad: ``"ste"`` or ``"exact"``; with online absmax scales nothing is ever clamped,
            so both give dW = dY^T X here (see README).

    Example usage::

        vk.Quantize(bits=4, granularity="group", group_size=64)
        vk.Quantize(bits=1, granularity="tensor")               # the paper's binary weights
    """

    bits: int = 8
    granularity: str = "channel"
    group_size: Optional[int] = None
    grad: str = "ste"

    def __post_init__(self):
        if not _is_int(self.bits) or self.bits not in QUANT_BITS:
            raise ValueError(f"bits must be one of {QUANT_BITS}, got {self.bits!r}")
        if self.granularity not in QUANT_GRANULARITIES:
            raise ValueError(f"granularity must be one of {QUANT_GRANULARITIES}, got {self.granularity!r}")
        if self.group_size is not None and self.granularity != "group":
            # Quantize(bits=4, group_size=32) once quantized per channel without a word: refuse it.
            raise ValueError(
                f"group_size={self.group_size!r} applies only to granularity='group' (got "
                f"granularity={self.granularity!r}); pass granularity='group', or omit group_size"
            )
        if self.granularity == "group":
            if self.group_size is None:
                object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)
            if not _is_int(self.group_size) or self.group_size < 1:
                raise ValueError(f"group_size must be a positive int, got {self.group_size!r}")
        _check_grad(self.grad)

    @property
    def stage_names(self):
        return ("quantize",)

    def check_layer(self, out_features, in_features, where="layer"):
        if self.granularity == "group" and in_features % self.group_size != 0:
            raise ValueError(
                f"{where}: group_size={self.group_size} must divide the input dim {in_features} "
                f"(use granularity='channel' or another group_size)"
            )

    def group_for(self, in_features: int) -> int:
        return {"channel": in_features, "group": self.group_size, "tensor": 0}[self.granularity]

    def spec(self, out_features, in_features, stored_mask=False):
        # exact=False for either grad: with online absmax scales R = 1 everywhere, so the exact
        # coefficient beta + (1 - beta) R is 1 and the kernels would spend a pass over W multiplying
        # dW by it. (Composed with pruning the prune coefficient remains; Compose.spec keeps exact.)
        return TransformSpec(bits=self.bits, group_size=self.group_for(in_features), exact=False)


# How LowRank shares the singular values between its factors (see LowRank's docstring).
LOWRANK_INITS = ("split", "reference")


@dataclass(frozen=True)
class LowRank(VCONConfig):
    """Low-rank factorization: ``g(x) = (x V^T) U^T`` with U (N, r), V (r, K).

    U and V are initialised from the truncated SVD of W with all of S in the output
    factor: ``U = U_r diag(S_r)``, ``V = V_r^T`` (so ``U V`` is the best rank-r
    approximation), as the authors' code does. Give exactly one of ``rank``
    (1 <= rank <= min(N, K)) or ``rank_ratio`` in (0, 1] (rank = max(1, round(ratio *
    min(N, K)))).

    Gradients: dU = (1-beta) dY^T t, dV = (1-beta) (dY U)^T x with t = x V^T; dW = dY^T x
    with ``grad="ste"`` and beta * dY^T x with ``grad="exact"``. Once beta = 0 the dense path is
    stopped in both modes, as in the authors' reference: dW = 0 (W no longer affects the output;
    on CPU the dW GEMM is skipped). A zero gradient, not None, so DDP and FSDP see every
    parameter; AdamW's weight decay and momentum still move W, which only matters if beta is
    raised again (freeze it with ``layer.weight.requires_grad_(False)`` to skip the optimizer too).

    ``init``: how the singular values are shared between the factors. ``"reference"``
    (default): all of S in the output factor, as above. ``"split"``: ``sqrt(S_r)`` in each,
    ``U = U_r sqrt(S_r)``, ``V = sqrt(S_r) V_r^T`` (both factors at the same scale; the
    default before 2026-12-07). The product is the same, but AdamW's updates are not
    invariant to the split, so training differs: "reference" was ahead for one-shot and for
    VCON on all three tasks of experiments/RESULTS.md (digits MLP, MiniLM, Lite0; 3-5 seeds
    each). ``LowRank(..., grad="exact")`` is the setting that reproduces the reference
    algorithm (its dense weight gets ``beta G``).

    Example usage::

        vk.LowRank(rank=16)
        vk.LowRank(rank_ratio=0.25)
        vk.LowRank(rank=16, grad="exact")                     # the authors' reference algorithm
        vk.LowRank(rank=16, init="split")                     # sqrt(S) in each factor
    """

    rank: Optional[int] = None
    rank_ratio: Optional[float] = None
    grad: str = "ste"
    init: str = "reference"

    def __post_init__(self):
        if (self.rank is None) == (self.rank_ratio is None):
            raise ValueError("give exactly one of rank (an int >= 1) or rank_ratio (a float in (0, 1])")
        if self.rank is not None and (not _is_int(self.rank) or self.rank < 1):
            raise ValueError(f"rank must be an int >= 1, got {self.rank!r}")
        if self.rank_ratio is not None:
            r = self.rank_ratio
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not (0.0 < r <= 1.0):
                raise ValueError(f"rank_ratio must be a float in (0, 1], got {r!r}")
        _check_grad(self.grad)
        if self.init not in LOWRANK_INITS:
            raise ValueError(f"init must be one of {', '.join(map(repr, LOWRANK_INITS))}, got {self.init!r}")

    @property
    def stage_names(self):
        return ("lowrank",)

    @property
    def is_lowrank(self):
        return True

    def rank_for(self, out_features: int, in_features: int) -> int:
        if self.rank is not None:
            return self.rank
        return max(1, round(self.rank_ratio * min(out_features, in_features)))

    def check_layer(self, out_features, in_features, where="layer"):
        r = self.rank_for(out_features, in_features)
        if r > min(out_features, in_features):
            raise ValueError(
                f"{where}: rank={r} must be at most min(N, K) = min({out_features}, {in_features})"
            )

    def spec(self, out_features, in_features, stored_mask=False):
        return TransformSpec(lowrank=True, exact=self.grad == "exact")


@dataclass(frozen=True, init=False)
class Compose(VCONConfig):
    """Several compressions at once, applied in the given order, each with its own beta.

    Supported: ``Compose(Prune(...), Quantize(...))``. Stage 1 blends ``W1 = beta_p W +
    (1-beta_p) P(W)``; stage 2 quantizes that: ``W_eff = beta_q W1 + (1-beta_q) Q(W1)``. At
    beta_p = beta_q = 0 the layer computes with ``Q(P(W))``. Both stages must use the
    same ``grad`` mode.

    Example usage::

        cfg = vk.Compose(vk.Prune(sparsity=0.5), vk.Quantize(bits=8))
        sched = vk.VCONScheduler(model, steps={"prune": 1000, "quantize": (1000, 2000)})
    """

    stages: tuple = field(default=())

    def __init__(self, *stages):
        if len(stages) == 1 and isinstance(stages[0], (list, tuple)):
            stages = tuple(stages[0])
        kinds = tuple(type(s) for s in stages)
        if kinds != (Prune, Quantize):
            names = ", ".join(k.__name__ for k in kinds) or "nothing"
            raise ValueError(
                f"Compose supports exactly (Prune, Quantize), in that order; got ({names}). "
                "Low rank cannot be composed yet."
            )
        if stages[0].grad != stages[1].grad:
            raise ValueError(
                f"Compose stages must share a grad mode; got prune grad={stages[0].grad!r}, "
                f"quantize grad={stages[1].grad!r}"
            )
        object.__setattr__(self, "stages", tuple(stages))

    @property
    def grad(self):
        return self.stages[0].grad

    @property
    def stage_names(self):
        return ("prune", "quantize")

    @property
    def prune(self) -> Prune:
        return self.stages[0]

    @property
    def quantize(self) -> Quantize:
        return self.stages[1]

    @property
    def stores_mask(self) -> bool:
        return self.prune.stores_mask

    def check_layer(self, out_features, in_features, where="layer"):
        for stage in self.stages:
            stage.check_layer(out_features, in_features, where)

    def spec(self, out_features, in_features, stored_mask=False):
        return TransformSpec(
            **self.prune.prune_fields(stored_mask),
            bits=self.quantize.bits,
            group_size=self.quantize.group_for(in_features),
            exact=self.grad == "exact",
        )


def prune_stage(config: VCONConfig) -> Optional[Prune]:
    """The Prune part of a config, if any."""
    if isinstance(config, Prune):
        return config
    if isinstance(config, Compose):
        return config.prune
    return None


__all__ = ["VCONConfig", "Prune", "Quantize", "LowRank", "Compose", "prune_stage", "PRUNE_NONE"]
