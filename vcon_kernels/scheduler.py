"""VCONScheduler: writes beta into every VCON layer, once per optimizer step.

After ``t`` calls of ``step()``, a stage whose transition window is ``[start, end)``
(``Q = end - start`` steps) has progress ``p = clamp((t - start) / Q, 0, 1)`` and

=========  =======================================================================
schedule   beta
=========  =======================================================================
linear     ``1 - p`` (the paper's ``max(1 - t/Q, 0)`` for start = 0)
cosine     ``(1 + cos(pi p)) / 2``
exp        ``(exp(-5 p) - exp(-5)) / (1 - exp(-5))``: fast early fade, exactly 0 at p = 1
step       a staircase of 4 levels: ``1 - floor(4 p) / 4``
callable   ``f(t - start)`` for ``t >= start`` (1 before), checked to be in [0, 1]
=========  =======================================================================

Stages are named by the configs: ``"prune"``, ``"quantize"``, ``"lowrank"``. ``steps`` is
either one int (every stage fades over ``[start, start + steps)``) or a dict per stage of
an int ``Q`` (window ``[start, start + Q)``) or a ``(begin, end)`` pair, e.g.
``steps={"prune": 1000, "quantize": (1000, 2000)}``. ``schedule`` may likewise be one
name/callable or a dict per stage.

Besides beta, the scheduler tells layers whose pruning mask refreshes every ``k`` steps
(``Prune(update=k)``) when to re-derive it: after step ``t`` with ``t % k == 0``.

Call ``step()`` once per optimizer step (not per micro-batch under gradient
accumulation). ``state_dict()`` / ``load_state_dict()`` resume the exact beta sequence.

Example usage::

    sched = vk.VCONScheduler(model, steps=1000, schedule="linear")
    for batch in loader:
        loss(model(batch)).backward(); opt.step(); opt.zero_grad(); sched.step()
"""

from __future__ import annotations

import math
from typing import Callable
from typing import Union

from torch import nn

from .configs import prune_stage
from .convert import vcon_layers
from .functional import check_beta_value

SCHEDULES = ("linear", "cosine", "exp", "step")
_EXP_RATE = 5.0
_STEP_LEVELS = 4


def _progress_beta(name: str, p: float) -> float:
    if name == "linear":
        return 1.0 - p
    if name == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * p))
    if name == "exp":
        return (math.exp(-_EXP_RATE * p) - math.exp(-_EXP_RATE)) / (1.0 - math.exp(-_EXP_RATE))
    return 1.0 - math.floor(_STEP_LEVELS * p) / _STEP_LEVELS


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


class VCONScheduler:
    """Drives the beta of every VCON layer in ``model`` (see the module docstring)."""

    def __init__(self, model: nn.Module, steps: Union[int, dict], schedule: Union[str, Callable, dict] = "linear",
                 start: int = 0):
        self.layers = [layer for _, layer in vcon_layers(model)]
        if not self.layers:
            raise ValueError("VCONScheduler: the model has no VCON layers; call vk.convert(model, config) first")
        if not _is_int(start) or start < 0:
            raise ValueError(f"start must be an int >= 0, got {start!r}")
        self.stages = sorted({s for layer in self.layers for s in layer.stage_names}, key=self._stage_order)
        self.windows = self._parse_steps(steps, start)
        self.schedules = self._parse_schedule(schedule)
        self.t = 0
        self._refresh_every = self._mask_refresh_periods()
        self._write()

    @staticmethod
    def _stage_order(stage: str) -> int:
        return ("prune", "quantize", "lowrank").index(stage)

    def _parse_steps(self, steps, start):
        def window(value, stage):
            if _is_int(value):
                if value <= 0:
                    raise ValueError(f"steps for stage {stage!r} must be > 0, got {value}")
                return (start, start + value)
            if isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value):
                begin, end = value
                if begin < 0 or end <= begin:
                    raise ValueError(
                        f"steps for stage {stage!r} must be (begin, end) with 0 <= begin < end, got {value}"
                    )
                return (begin, end)
            raise ValueError(f"steps for stage {stage!r} must be an int > 0 or a (begin, end) pair, got {value!r}")

        if isinstance(steps, dict):
            unknown = set(steps) - set(self.stages)
            missing = set(self.stages) - set(steps)
            if unknown or missing:
                raise ValueError(
                    f"steps keys must be exactly the model's stages {self.stages}; "
                    f"unknown: {sorted(unknown)}, missing: {sorted(missing)}"
                )
            return {stage: window(steps[stage], stage) for stage in self.stages}
        return {stage: window(steps, stage) for stage in self.stages}

    def _parse_schedule(self, schedule):
        def check(value, stage):
            if callable(value):
                return value
            if value not in SCHEDULES:
                raise ValueError(
                    f"schedule for stage {stage!r} must be one of {SCHEDULES} or a callable, got {value!r}"
                )
            return value

        if isinstance(schedule, dict):
            unknown = set(schedule) - set(self.stages)
            if unknown:
                raise ValueError(f"schedule has stages {sorted(unknown)} that the model does not have ({self.stages})")
            return {stage: check(schedule.get(stage, "linear"), stage) for stage in self.stages}
        return {stage: check(schedule, stage) for stage in self.stages}

    def _mask_refresh_periods(self):
        periods = []
        for layer in self.layers:
            prune = prune_stage(layer.config)
            if prune is not None and _is_int(prune.update):
                periods.append((layer, prune.update))
        return periods

    def beta_at(self, t: int, stage: str) -> float:
        """The beta of ``stage`` after ``t`` calls of ``step()``."""
        begin, end = self.windows[stage]
        schedule = self.schedules[stage]
        if t <= begin:
            return 1.0
        if callable(schedule):
            return check_beta_value(schedule(t - begin), f"schedule({stage!r})({t - begin})")
        p = min((t - begin) / (end - begin), 1.0)
        return min(max(_progress_beta(schedule, p), 0.0), 1.0)

    @property
    def betas(self) -> dict:
        """{stage: current beta}."""
        return {stage: self.beta_at(self.t, stage) for stage in self.stages}

    def _write(self) -> None:
        betas = self.betas
        for layer in self.layers:
            for stage in layer.stage_names:
                layer.set_beta(betas[stage], stage)
            # Read by vk.finalize's error only (how far the schedule got), never by the forward.
            layer.scheduled_steps = (self.t, max(end for _, end in self.windows.values()))

    def step(self) -> None:
        """Advance one optimizer step: write the new betas and refresh periodic masks."""
        self.t += 1
        self._write()
        for layer, every in self._refresh_every:
            if self.t % every == 0:
                layer.refresh_mask()

    @property
    def finished(self) -> bool:
        """True once every stage has reached beta = 0."""
        return all(b == 0.0 for b in self.betas.values())

    def state_dict(self) -> dict:
        return {"t": self.t, "windows": {k: list(v) for k, v in self.windows.items()}}

    def load_state_dict(self, state: dict) -> None:
        windows = {k: tuple(v) for k, v in state.get("windows", {}).items()}
        if windows and windows != self.windows:
            raise ValueError(f"scheduler state has windows {windows}, this scheduler has {self.windows}")
        self.t = int(state["t"])
        self._write()
