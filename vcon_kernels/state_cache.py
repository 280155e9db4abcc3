"""Per-layer state (threshold, scales) computed once per weight update, not once per call.

A layer's threshold and quantization scales depend only on its weight W, its beta and its
stored mask, which change once per optimizer step; the forward needs them at every call:
every gradient-accumulation micro-batch and every activation-checkpoint recompute. In
training calls (module in train mode, grad mode on) each layer keeps the last state with a
key saying which W / beta / mask it was computed from, and recomputes only when the key
changes. Eval and no-grad calls always recompute: that is where weights get edited through
``.data`` (PEFT's ``merge_and_unload``, zeroth-order updates), which no key can see. The key is

    (optimizer generation, id(W), W._version, W.data_ptr(), beta._version, mask._version)

* ``W._version`` moves on every in-place change made through autograd's view of W: optimizer
  steps, ``with torch.no_grad(): w.mul_(2)``, ``load_state_dict``, ``nn.init``, DDP's
  broadcasts. ``data_ptr`` / ``id`` change when W is replaced (``.to()``, ``.data = ...``).
* The **optimizer generation** is a counter that every ``torch.optim.Optimizer.step`` advances
  (a global post-step hook, registered once): FSDP2 writes each all-gather into the same
  unsharded parameter while preserving its version counter, so versions alone would keep
  last step's state there; the generation makes every optimizer step a new key for every
  layer.
* Loading a state dict into a layer, ``module.to(...)`` and ``reset_parameters`` drop its state.

Not seen: writes through ``W.data`` (``w.data.add_(...)`` has its own version counter) made
between two training calls with no optimizer step in between (edits right after a step, such
as weight clipping, are seen: the step starts a new generation). After such an edit call
:func:`refresh` (or
``vk.refresh_state(model)``); ``VCON_STATE_CACHE=0`` (or :func:`enable` ``(False)``) turns the
cache off everywhere. Under ``torch.compile`` the compiled graph computes the state itself.

Example usage::

    import vcon_kernels as vk
    for micro in range(4):                  # one state computation per layer for the 4 calls
        loss(model(x[micro])).backward()
    opt.step()                              # new generation: the next forward recomputes
    with torch.no_grad():
        model[0].weight.data.mul_(0.5)      # invisible to versions:
    vk.refresh_state(model)                 # say so
"""

from __future__ import annotations

import os

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

_generation = 0
_enabled = os.environ.get("VCON_STATE_CACHE", "1") != "0"
_hook_handle = None
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _advance(*_args, **_kwargs) -> None:
    global _generation
    _generation += 1


def generation() -> int:
    """The optimizer generation: advanced by every optimizer step (and by :func:`refresh_all`)."""
    return _generation


def install_optimizer_hook() -> None:
    """Register the global optimizer post-step hook once (idempotent)."""
    global _hook_handle
    if _hook_handle is None:
        _hook_handle = register_optimizer_step_post_hook(_advance)


def enabled() -> bool:
    return _enabled


def enable(flag: bool = True) -> None:
    """Turn the state cache on or off for every layer (off: state computed at every call)."""
    global _enabled
    if not isinstance(flag, bool):
        raise TypeError(f"enable: flag must be a bool, got {type(flag).__name__}")
    _enabled = flag


def refresh_all() -> None:
    """Drop every layer's cached state (the next call of each layer recomputes it)."""
    _advance()


def refresh(module: torch.nn.Module) -> None:
    """Drop the cached state of every VCON layer in ``module`` (itself included)."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"refresh: module must be an nn.Module, got {type(module).__name__}")
    for m in module.modules():
        if hasattr(m, "_vcon_state_cache"):
            m._vcon_state_cache = None


def _version(t) -> int:
    return -1 if t is None else t._version


def key(weight: torch.Tensor, beta: torch.Tensor, mask) -> tuple | None:
    """The cache key of a layer's state, or None when it cannot be trusted (cache off, inference tensors)."""
    if not _enabled or type(weight) not in _PLAIN or weight.is_inference() or beta.is_inference():
        return None  # a tensor subclass (DTensor) or an inference tensor has no trustworthy version
    return (_generation, id(weight), weight._version, weight.data_ptr(), beta._version, _version(mask))


__all__ = ["enable", "enabled", "generation", "install_optimizer_hook", "key", "refresh", "refresh_all"]
