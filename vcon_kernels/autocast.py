"""Autocast kernels for the ``torch.ops.vcon`` ops: cast the activation, never the weights.

``torch.autocast`` casts both operands of ``F.linear`` to bf16/fp16, so an ``nn.Linear``
under autocast makes a low-precision copy of its weight on every call (and keeps it for
backward). A VCON layer can do better, because it builds its weight anyway: the layer ops
(``vcon::linear``, ``vcon::conv2d``) cast only their input ``x`` here, and the backends
derive thresholds and scales from the fp32 master weight and round the *blended* weight to
``x.dtype`` where they build it (C++ workspace, Triton tile, torch temporary).

Every op also runs its implementation with autocast switched off, so autocast never
reaches into an op's own GEMMs (which would return a dtype the fake implementation does not
promise, and break the backward). This is what ``torch.library.register_autocast`` does,
with the cast restricted to the activation argument.

Example::

    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = vcon_layer(x)        # y is bf16; vcon_layer.weight stays fp32 and gets fp32 grads
"""

from __future__ import annotations

from typing import Sequence

import torch

# Autocast dispatch keys of the devices the backends run on (a key missing from an older
# torch build is skipped).
_AUTOCAST_KEYS = {"cpu": "AutocastCPU", "cuda": "AutocastCUDA"}
_libraries: dict = {}


def autocast_dtype(device_type: str) -> torch.dtype:
    """The dtype ``torch.autocast`` computes in for ``device_type`` (bf16 or fp16)."""
    getter = getattr(torch, "get_autocast_dtype", None)
    if getter is not None:
        return getter(device_type)
    return torch.get_autocast_cpu_dtype() if device_type == "cpu" else torch.get_autocast_gpu_dtype()


def is_autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except TypeError:  # torch < 2.4: no device argument
        if device_type == "cpu":
            return torch.is_autocast_cpu_enabled()
        return device_type == "cuda" and torch.is_autocast_enabled()


def eligible(t, device_type: str) -> bool:
    """Whether autocast would cast ``t`` (as aten's ``is_eligible``: float, not fp64, on the device)."""
    return (
        isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
        and t.device.type == device_type
    )


def autocast_input(x: torch.Tensor) -> torch.Tensor:
    """``x`` as the layer ops' autocast kernel casts it: to the autocast dtype when autocast is on."""
    device_type = x.device.type
    if is_autocast_on(device_type) and eligible(x, device_type):
        dtype = autocast_dtype(device_type)
        if x.dtype != dtype:
            return x.to(dtype)
    return x


_ALL_AUTOCAST = None


def autocast_off():
    """A guard that switches every autocast key off (what the ops' autocast kernels do around the op).

    Entered only when autocast is on somewhere: without it the keys are not in the dispatch set.
    """
    global _ALL_AUTOCAST
    if _ALL_AUTOCAST is None:
        keys = [getattr(torch._C.DispatchKey, k) for k in _AUTOCAST_KEYS.values() if hasattr(torch._C.DispatchKey, k)]
        keyset = torch._C.DispatchKeySet(keys[0])
        for key in keys[1:]:
            keyset = keyset | torch._C.DispatchKeySet(key)
        _ALL_AUTOCAST = keyset
    return torch._C._ExcludeDispatchKeyGuard(_ALL_AUTOCAST)


def any_autocast_on() -> bool:
    return any(is_autocast_on(d) for d in _AUTOCAST_KEYS)


def _library(namespace: str) -> torch.library.Library:
    if namespace not in _libraries:
        _libraries[namespace] = torch.library.Library(namespace, "FRAGMENT")
    return _libraries[namespace]


def _make_kernel(op, device_type: str, cast_args: Sequence[int], excluded):
    def kernel(_keyset, *args):
        if cast_args:
            dtype = autocast_dtype(device_type)
            args = list(args)
            for i in cast_args:
                if eligible(args[i], device_type) and args[i].dtype != dtype:
                    args[i] = args[i].to(dtype)
        with torch._C._ExcludeDispatchKeyGuard(excluded):
            return op(*args)

    return kernel


def register_autocast(qualname: str, cast_args: Sequence[int]) -> None:
    """Register the autocast kernel of ``qualname`` ("ns::op") on every known autocast key."""
    namespace, name = qualname.split("::")
    op = getattr(getattr(torch.ops, namespace), name).default
    for device_type, key_name in _AUTOCAST_KEYS.items():
        key = getattr(torch._C.DispatchKey, key_name, None)
        if key is None:
            continue
        excluded = torch._C.DispatchKeySet(key)
        kernel = _make_kernel(op, device_type, tuple(cast_args), excluded)
        _library(namespace).impl(name, kernel, key_name, with_keyset=True)


__all__ = ["any_autocast_on", "autocast_dtype", "autocast_input", "autocast_off", "eligible", "is_autocast_on",
           "register_autocast"]
