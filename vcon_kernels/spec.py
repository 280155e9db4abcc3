"""TransformSpec: the flat, hashable description of a blended weight that kernels see.

Configs (``configs.py``) are for users; a ``TransformSpec`` is what crosses the
``torch.library`` boundary, flattened into plain ints/floats/bools so that every backend
(plain torch, C++, Triton) receives exactly the same description.

The blended weight of a layer, for a weight W of shape (N, K), is defined as follows.
Every backend must compute it this way, in fp32 (fp64 for fp64 weights):

* prune stage (``prune != PRUNE_NONE``), keep-mask M from the kind below::

      W1 = where(M, W, beta_p * W)

* quantize stage (``bits != 0``), applied to W1 (W1 = W without a prune stage), with the
  scale ``s`` of W1's group (``group_size`` consecutive inputs of a row; 0 = whole
  tensor)::

      bits in {2, 4, 8}: Q = clamp(round_half_even(W1 / s'), qmin, qmax) * s
                         s = max|W1| / qmax, s' = s if s > 0 else 1
      bits == 1:         Q = s * sign(W1),  s = sum|W1| / max(count(W1 != 0), 1)
      W_eff = beta_q * W1 + (1 - beta_q) * Q

* low rank (``lowrank``): no weight transform; the layer adds ``(1-beta) (x V^T) U^T``
  to ``beta x W^T``.

``beta`` is an fp32 tensor with one entry per stage: ``[beta_p, beta_q]`` for
prune+quantize, ``[beta]`` otherwise.

Keep-mask kinds:

* ``PRUNE_THRESHOLD``: ``M = |W| >= t`` with ``t`` the kept-count-th largest |W| of the
  layer (``per_row=False``, one threshold) or of each row (``per_row=True``). Kept
  counts are ``round(numel * (1 - sparsity))`` / ``round(K * (1 - sparsity))``; a count
  of 0 gives ``t = +inf``. Ties at the threshold are all kept. ``t`` is in the compute
  dtype (fp32, fp64 for fp64 weights), so it equals one of the |W| exactly.
* ``PRUNE_NM``: in each group of ``nm_m`` consecutive inputs keep the ``nm_n`` largest
  |W|; element i of a group has rank ``#{j: |w_j| > |w_i|} + #{j < i: |w_j| == |w_i|}``
  and is kept when its rank is < ``nm_n`` (exactly ``nm_n`` kept, lower index wins ties).
* ``PRUNE_MASK``: a stored bit-packed mask (uint8, (N, ceil(K/8)), bit k%8 of byte k//8).

Gradient (``exact``): with STE (``exact=False``) dW = G = dY^T X. With ``exact=True``,
dW = G * (prune coef) * (quant coef) where prune coef = ``where(M, 1, beta_p)`` and quant
coef = ``beta_q + (1 - beta_q) * R``, R = ``qmin <= round(W1/s') <= qmax`` (1 for binary);
for low rank dW = beta * G. Low rank at beta = 0 has dW = 0 in both modes (the dense path is
stopped once it no longer affects the output).
"""

from __future__ import annotations

from dataclasses import dataclass

PRUNE_NONE = 0
PRUNE_THRESHOLD = 1
PRUNE_NM = 2
PRUNE_MASK = 3


@dataclass(frozen=True)
class TransformSpec:
    prune: int = PRUNE_NONE
    sparsity: float = 0.0
    per_row: bool = False
    nm_n: int = 0
    nm_m: int = 0
    bits: int = 0
    group_size: int = 0
    exact: bool = False
    lowrank: bool = False

    @property
    def has_prune(self) -> bool:
        return self.prune != PRUNE_NONE

    @property
    def has_quant(self) -> bool:
        return self.bits != 0

    @property
    def num_stages(self) -> int:
        return 2 if (self.has_prune and self.has_quant) else 1

    @property
    def quant_beta_index(self) -> int:
        return 1 if self.has_prune else 0

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1 if self.bits > 1 else 1

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) if self.bits > 1 else -1

    def as_args(self) -> tuple:
        """The flat argument tuple used by every ``torch.ops.vcon`` op (same order as fields)."""
        return (
            int(self.prune),
            float(self.sparsity),
            bool(self.per_row),
            int(self.nm_n),
            int(self.nm_m),
            int(self.bits),
            int(self.group_size),
            bool(self.exact),
            bool(self.lowrank),
        )

    @classmethod
    def from_args(cls, *args) -> TransformSpec:
        return cls(*args)

    def threshold_shape(self, out_features: int) -> tuple:
        """Shape of the threshold tensor that ``compute_state`` returns."""
        if self.prune != PRUNE_THRESHOLD:
            return (0,)
        return (out_features,) if self.per_row else (1,)

    def scales_shape(self, out_features: int, in_features: int) -> tuple:
        """Shape of the fp32 scales that ``compute_state`` returns: (rows, groups per row)."""
        if not self.has_quant:
            return (0, 0)
        if self.group_size == 0:
            return (1, 1)
        return (out_features, in_features // self.group_size)
