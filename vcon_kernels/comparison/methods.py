"""How a compression method drives a model during fine-tuning, and the VCON method itself.

A method converts the dense model (``attach``) and is told after every optimizer step
(``step``). All methods of a comparison get the same config, the same layers, the same
optimizer, learning-rate schedule, data order and number of steps; they differ only in
how the compressed form takes over:

=============  ==============================================================================
method         what happens over the transition window [0, Q) of the T fine-tuning steps
=============  ==============================================================================
``vcon``       every layer outputs ``beta f(x) + (1 - beta) g(x)``, beta fading 1 -> 0 over Q
``oneshot``    compressed from step 0 (beta = 0 throughout): compress, then fine-tune
``gradual``    the compression itself grows over Q (see ``baselines.py``)
=============  ==============================================================================

``progress()`` is the value plotted against the step: the beta of VCON, and the matching
"fraction still dense" of the baselines (1 = dense, 0 = fully compressed).

A ``Compose(Prune, Quantize)`` config has two transitions: pruning over the first half
of the window, quantization over the second half, for every method.

Example usage::

    method = make_method("vcon", vk.Prune(sparsity=0.9), transition=100)
    model = method.attach(model, filter_fn)
    for step in range(T):
        ...; optimizer.step(); method.step()
"""

from __future__ import annotations

from typing import Callable
from typing import Optional

from torch import nn

import vcon_kernels as vk

METHOD_NAMES = ("oneshot", "gradual", "vcon")


def stage_windows(config: vk.VCONConfig, transition: int) -> dict:
    """{stage: (begin, end)}: one window [0, Q), or two halves for prune + quantize."""
    if transition < 1:
        raise ValueError(f"the transition must last at least one step, got {transition}")
    stages = config.stage_names
    if len(stages) == 1:
        return {stages[0]: (0, transition)}
    if transition < 2:
        raise ValueError(f"prune + quantize needs a transition of at least 2 steps (one per stage), got {transition}")
    half = transition // 2
    return {stages[0]: (0, half), stages[1]: (half, transition)}


class Method:
    """Base class: see the module docstring."""

    name = "method"

    def __init__(self, config: vk.VCONConfig, transition: int, schedule="linear"):
        self.config = config
        self.transition = int(transition)
        self.schedule = schedule
        self.windows = stage_windows(config, self.transition)
        self.t = 0

    def attach(self, model: nn.Module, filter_fn: Optional[Callable] = None) -> nn.Module:
        raise NotImplementedError

    def step(self) -> None:
        self.t += 1

    def progress(self) -> float:
        raise NotImplementedError

    def describe(self) -> str:
        return self.name


class VCON(Method):
    """Vanishing contributions: ``vk.VCONScheduler`` fades every layer's beta over the window."""

    name = "vcon"

    def __init__(self, config, transition, schedule="linear", split_batchnorm=True):
        super().__init__(config, transition, schedule)
        self.split_batchnorm = split_batchnorm

    def attach(self, model, filter_fn=None):
        model = vk.convert(model, self.config, filter_fn=filter_fn, split_batchnorm=self.split_batchnorm)
        self.scheduler = vk.VCONScheduler(model, steps=self.windows, schedule=self.schedule)
        return model

    def step(self):
        super().step()
        self.scheduler.step()

    def progress(self):
        betas = self.scheduler.betas
        return sum(betas.values()) / len(betas)

    def describe(self):
        name = self.schedule if isinstance(self.schedule, str) else "custom"
        bn = "" if self.split_batchnorm else ", one shared BatchNorm"
        return f"VCON, {name} beta 1 -> 0 over {self.transition} steps{bn}"


def make_method(name: str, config: vk.VCONConfig, transition: int, schedule="linear", prune_every=None,
                split_batchnorm: bool = True) -> Method:
    """A method by name (``oneshot``, ``gradual``, ``vcon``); ``split_batchnorm`` applies to VCON."""
    from .baselines import Gradual
    from .baselines import OneShot

    if name == "vcon":
        return VCON(config, transition, schedule, split_batchnorm=split_batchnorm)
    if name == "oneshot":
        return OneShot(config, transition, schedule)
    if name == "gradual":
        return Gradual(config, transition, schedule, prune_every=prune_every)
    raise ValueError(f"unknown method {name!r}; known: {', '.join(METHOD_NAMES)}")


__all__ = ["METHOD_NAMES", "Method", "VCON", "make_method", "stage_windows"]
