"""``VCONCallback``: drives a ``vk.VCONScheduler`` from a ``transformers.Trainer``.

The Trainer calls ``on_step_end`` once per *optimizer* step (after gradient
accumulation), and ``on_substep_end`` for the other micro-batches; the callback steps the
scheduler in ``on_step_end`` only, so beta follows ``state.global_step`` whatever the
accumulation. It keeps the scheduler at ``global_step`` rather than counting calls, so a
run resumed from a checkpoint (``trainer.train(resume_from_checkpoint=...)``) continues
the beta sequence where it stopped. Each Trainer log line gets ``vcon_beta`` (or
``vcon_beta_<stage>`` per stage for prune + quantize), in the logs passed to later
callbacks and in ``trainer.state.log_history``.

Example usage::

    sched = vk.VCONScheduler(model, steps=500)
    trainer = Trainer(model, args, train_dataset=ds, callbacks=[VCONCallback(sched)])
    trainer.train()
    model = vk.finalize(model)
"""

from __future__ import annotations

import warnings

from ...convert import transition_report
from ...scheduler import VCONScheduler
from ..deps import require

_transformers = require("transformers", "vcon_kernels.integrations.hf")


class VCONCallback(_transformers.TrainerCallback):
    """Steps ``scheduler`` on optimizer steps and logs beta (see the module docstring).

    Attributes:
        history: ``[(global_step, {stage: beta})]``, one entry per optimizer step (beta used
            by the *next* step), starting with the value at the start of training.
    """

    def __init__(self, scheduler: VCONScheduler):
        if not isinstance(scheduler, VCONScheduler):
            raise TypeError(f"VCONCallback needs a vk.VCONScheduler, got {type(scheduler).__name__}")
        self.scheduler = scheduler
        self.history = []

    def _log_keys(self) -> dict:
        betas = self.scheduler.betas
        if len(betas) == 1:
            return {"vcon_beta": next(iter(betas.values()))}
        return {f"vcon_beta_{stage}": beta for stage, beta in betas.items()}

    def _sync(self, global_step: int) -> None:
        if global_step < self.scheduler.t:
            raise RuntimeError(
                f"the scheduler is at step {self.scheduler.t} but the Trainer at {global_step}; "
                "use a fresh VCONScheduler for a new training run"
            )
        while self.scheduler.t < global_step:
            self.scheduler.step()

    def on_train_begin(self, args, state, control, **kwargs):
        if state.global_step and self.scheduler.t == 0:  # resumed from a checkpoint: jump to its step
            self.scheduler.load_state_dict({"t": state.global_step})
        self._sync(state.global_step)
        self.history.append((state.global_step, dict(self.scheduler.betas)))

    def on_step_end(self, args, state, control, **kwargs):
        self._sync(state.global_step)
        self.history.append((state.global_step, dict(self.scheduler.betas)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        keys = self._log_keys()
        if logs is not None:
            logs.update(keys)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(keys)

    def on_train_end(self, args, state, control, **kwargs):
        # A run that ends mid-transition is otherwise silent until vk.finalize refuses it.
        report = transition_report([(f"layer {i}", layer) for i, layer in enumerate(self.scheduler.layers)])
        if report is not None:
            warnings.warn(
                f"VCONCallback: training ended at step {state.global_step} with {report}; vk.finalize will refuse "
                "until beta reaches 0 (train longer, shorten VCONScheduler(steps=...), or finalize(force=True))",
                stacklevel=2,
            )


__all__ = ["VCONCallback"]
