"""The baselines VCON is compared with: one-shot compression and gradual (iterative) compression.

**One-shot** (``OneShot``): the model is compressed at step 0 (beta = 0 in every layer)
and fine-tuned for the whole budget. The layers are the same VCON layers, so the forward,
the gradient mode and the mask policy are exactly those of the VCON run; only the beta
schedule differs.

**Gradual** (``Gradual``): the compression itself grows during the transition window
[0, Q) instead of fading in a blend.

* Pruning (per layer / per row): the cubic sparsity ramp of Zhu & Gupta, "To prune, or
  not to prune" (2017): at pruning steps ``t_k`` (every ``prune_every`` steps, 10 per
  window by default) the target sparsity becomes
  ``s_k = s_f (1 - (1 - (t_k - t_0) / Q)^3)``, and the masks are re-derived from the
  current magnitudes. The layers compute with the pruned weight (beta = 0) throughout;
  only the sparsity moves.
* Quantization, low rank and N:M pruning: there is no continuous knob to ramp. The bit
  width only takes the values 8/4/2/1 (int4 would be a single 8 -> 4 jump) and a rank
  schedule would re-factorize every layer at every change. The iterative scheme used is
  **layer-by-layer compression**: the layers switch to their compressed form one at a
  time, in depth order (input to output), evenly spread over the window, so the network
  as a whole moves gradually while each layer switches abruptly. This is how classic
  low-rank work compresses deep networks (Jaderberg et al. 2014; Zhang et al. 2015,
  "Accelerating very deep convolutional networks": one layer at a time, fine-tuning in
  between) and the layer-granular form of incremental quantization (Zhou et al. 2017,
  INQ, which quantizes growing weight groups and retrains the rest). It also isolates
  what VCON adds: both move gradually, but VCON blends *inside* every layer.
* Prune + quantize: the sparsity ramp over the first half of the window, then
  quantization layer by layer over the second half.

The gradual pruning ramp rewrites each layer's ``config`` attribute (a frozen
``vk.Prune`` with a new ``sparsity``); VCON layers read their config at every call,
and stored masks are refreshed with ``layer.refresh_mask()``.

Example usage::

    method = Gradual(vk.Prune(sparsity=0.9), transition=100)
    model = method.attach(model)
    for step in range(200):
        ...; optimizer.step(); method.step()     # sparsity 0 -> 0.9 by step 100
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional

import vcon_kernels as vk

from .methods import Method


def prune_part(config: vk.VCONConfig) -> Optional[vk.Prune]:
    if isinstance(config, vk.Prune):
        return config
    if isinstance(config, vk.Compose):
        return config.prune
    return None


def cubic_sparsity(t: int, begin: int, end: int, final: float, every: int) -> float:
    """Zhu & Gupta's sparsity after ``t`` steps: updated at ``begin + k * every`` (and at ``end``)."""
    if t <= begin:
        return 0.0
    last_update = min(begin + ((t - begin) // every) * every, end)
    if t >= end:
        last_update = end
    p = (last_update - begin) / (end - begin)
    return final * (1.0 - (1.0 - p) ** 3)


def layers_compressed(t: int, begin: int, end: int, n_layers: int) -> int:
    """How many layers the layer-by-layer scheme has switched after ``t`` steps (all of them at ``end``)."""
    if t <= begin:
        return 0
    return min(n_layers, math.ceil(n_layers * (t - begin) / (end - begin)))


class OneShot(Method):
    """Compress at step 0, then fine-tune (beta = 0 in every layer from the start)."""

    name = "oneshot"

    def attach(self, model, filter_fn=None):
        # The baselines keep each BatchNorm as it is (split_batchnorm=False): they never blend two
        # paths, and a plain model is what "compress, then fine-tune" means.
        model = vk.convert(model, self.config, filter_fn=filter_fn, split_batchnorm=False)
        # A scheduler that writes beta = 0 at every step keeps refreshing Prune(update=k) masks
        # exactly as in the VCON run. It writes beta = 1 at t = 0 (its convention), hence set_beta.
        self.scheduler = vk.VCONScheduler(model, steps=1, schedule=lambda t: 0.0)
        for _, layer in vk.vcon_layers(model):
            layer.set_beta(0.0)
        return model

    def step(self):
        super().step()
        self.scheduler.step()

    def progress(self):
        return 0.0

    def describe(self):
        return "one-shot: compressed at step 0, then fine-tuned"


class Gradual(Method):
    """Gradual compression over the window (see the module docstring)."""

    name = "gradual"

    def __init__(self, config, transition, schedule="linear", prune_every: Optional[int] = None):
        super().__init__(config, transition, schedule)
        self.prune = prune_part(config)
        self.ramp = self.prune is not None and self.prune.granularity != "nm"
        if self.ramp:
            begin, end = self.windows["prune"]
            self.prune_every = int(prune_every or max(1, round((end - begin) / 10)))
            if self.prune_every < 1:
                raise ValueError(f"prune_every must be >= 1, got {prune_every}")
        self.layerwise = [s for s in self.windows if not (self.ramp and s == "prune")]

    def _config_with(self, sparsity: float) -> vk.VCONConfig:
        prune = dataclasses.replace(self.prune, sparsity=sparsity)
        return prune if isinstance(self.config, vk.Prune) else vk.Compose(prune, self.config.quantize)

    def attach(self, model, filter_fn=None):
        start = self._config_with(0.0) if self.ramp else self.config
        model = vk.convert(model, start, filter_fn=filter_fn, split_batchnorm=False)  # as OneShot
        self.layers = [layer for _, layer in vk.vcon_layers(model)]
        self.sparsity = 0.0
        if self.ramp:
            for layer in self.layers:
                layer.set_beta(0.0, "prune")  # the pruned weight is used at once; its sparsity ramps
        return model

    def _set_sparsity(self, sparsity: float) -> None:
        config = self._config_with(sparsity)
        for layer in self.layers:
            layer.config = config
            layer.refresh_mask()  # no-op for online masks (re-derived at every call anyway)
        self.sparsity = sparsity

    def step(self):
        super().step()
        t = self.t
        if self.ramp:
            begin, end = self.windows["prune"]
            target = cubic_sparsity(t, begin, end, self.prune.sparsity, self.prune_every)
            if target != self.sparsity:
                self._set_sparsity(target)
        for stage in self.layerwise:
            begin, end = self.windows[stage]
            for layer in self.layers[:layers_compressed(t, begin, end, len(self.layers))]:
                layer.set_beta(0.0, stage)
        if self.prune is not None and isinstance(self.prune.update, int) and not isinstance(self.prune.update, bool) \
                and t % self.prune.update == 0:
            for layer in self.layers:
                layer.refresh_mask()

    def progress(self):
        parts = []
        for stage, (begin, end) in self.windows.items():
            if self.ramp and stage == "prune":
                parts.append(1.0 - self.sparsity / self.prune.sparsity if self.prune.sparsity > 0 else 0.0)
            else:
                parts.append(1.0 - layers_compressed(self.t, begin, end, len(self.layers)) / len(self.layers))
        return sum(parts) / len(parts)

    def describe(self):
        parts = []
        if self.ramp:
            parts.append(f"cubic sparsity ramp (Zhu & Gupta), updated every {self.prune_every} steps")
        if self.layerwise:
            parts.append(f"layer-by-layer {'+'.join(self.layerwise)}")
        return f"gradual: {', then '.join(parts)} over {self.transition} steps"


__all__ = ["Gradual", "OneShot", "cubic_sparsity", "layers_compressed", "prune_part"]
