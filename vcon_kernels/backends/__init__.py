"""Backend selection: which implementation runs a ``torch.ops.vcon`` op for a device.

Default choice, per call, from the device of the weight:

* ``cuda``: the Triton backend when Triton can run, else plain torch;
* ``cpu``: the C++ extension when it is built, else plain torch;
* anything else: plain torch.

Override with the environment variable ``VCON_BACKEND=torch|cpp|triton`` or, scoped,
``with vk.backends.use("torch"): ...`` (or a plain call, see :class:`use`). Forcing ``triton`` on CPU tensors is how the
kernel tests run under ``TRITON_INTERPRET=1``. Asking for a backend that cannot run is
an error, never a silent fallback. When the preferred backend of a device cannot run
(the C++ extension was not built, Triton is missing), ``select`` uses plain torch and
warns once, naming the reason.
"""

from __future__ import annotations

import importlib
import os
import threading
import warnings

from .torch_backend import TorchBackend

BACKEND_NAMES = ("torch", "cpp", "triton")
_MODULES = {"cpp": ("cpp_backend", "CppBackend"), "triton": ("triton_backend", "TritonBackend")}
_instances: dict = {"torch": TorchBackend()}
_load_errors: dict = {}
_fallback_warned: set = set()
_local = threading.local()


def _load(name: str):
    """The backend instance, or None if it cannot run here (reason kept in ``_load_errors``)."""
    if name in _instances:
        return _instances[name]
    if name in _load_errors:
        return None
    module_name, class_name = _MODULES[name]
    try:
        module = importlib.import_module(f"{__name__}.{module_name}")
        backend = getattr(module, class_name)()
        if not backend.is_available():
            raise RuntimeError(getattr(backend, "unavailable_reason", f"{name} backend is not available"))
    except (ImportError, RuntimeError) as exc:
        _load_errors[name] = f"{type(exc).__name__}: {exc}"
        return None
    _instances[name] = backend
    return backend


def _check_name(name: str) -> None:
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")


def get(name: str):
    """The named backend; raises ``RuntimeError`` with the reason if it cannot run here."""
    _check_name(name)
    backend = _load(name)
    if backend is None:
        raise RuntimeError(f"vcon_kernels backend {name!r} is not available: {_load_errors.get(name)}")
    return backend


def available() -> dict:
    """{name: True or the reason it is unavailable}."""
    return {n: True if _load(n) is not None else _load_errors.get(n, "unavailable") for n in BACKEND_NAMES}


# os.environ's own dict (encoded keys): a lookup there costs ~0.1 us against ~1 us for
# os.environ.get, which matters on the per-call path of small layers (cpu_linear_node).
_ENVIRON = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey("VCON_BACKEND") if hasattr(os.environ, "encodekey") else None


def _env_backend() -> str | None:
    if _ENVIRON is not None and _ENV_KEY is not None:
        raw = _ENVIRON.get(_ENV_KEY)
        return os.environ.decodevalue(raw) if raw else None
    return os.environ.get("VCON_BACKEND")


def forced() -> str | None:
    override = getattr(_local, "override", None)
    if override is not None:
        return override
    env = _env_backend()
    if env:
        _check_name(env)
        return env
    return None


def _cpu_backend_name() -> str:
    """The name of the backend that ``select("cpu")`` returns, without building the instance."""
    return forced() or ("cpp" if _load("cpp") is not None else "torch")


def cpu_linear_node():
    """``_C.linear_autograd`` (the C++ layer with its autograd node) when the C++ backend is the
    one ``select("cpu")`` picks, else None. The layers' eager training path calls it directly."""
    if _cpu_backend_name() != "cpp":
        return None
    return _instances["cpp"].linear_node if "cpp" in _instances else None


def select(device_type: str):
    """The backend for tensors on ``device_type`` ("cpu", "cuda", ...)."""
    name = forced()
    if name is not None:
        return get(name)
    preferred = {"cuda": "triton", "cpu": "cpp"}.get(device_type)
    if preferred is not None:
        backend = _load(preferred)
        if backend is not None:
            return backend
        _warn_fallback(preferred, device_type)
    return _instances["torch"]


def _warn_fallback(name: str, device_type: str) -> None:
    if name in _fallback_warned:
        return
    _fallback_warned.add(name)
    warnings.warn(
        f"vcon_kernels: the {name!r} backend for {device_type} tensors is unavailable ({_load_errors.get(name)}); "
        "using the plain-torch backend (same results, slower)",
        stacklevel=3,
    )


class use:
    """Force a backend for this thread: ``with vk.backends.use("torch"): ...`` or a plain call.

    As a plain call, ``vk.backends.use("torch")`` forces the backend until
    ``vk.backends.use(None)`` (back to the per-device default); in a ``with`` block the
    previous choice comes back at the end of the block. Layers record the forced backend at
    forward time and run their backward with it, also when autograd runs the backward on
    another thread.
    """

    def __init__(self, name: str | None):
        if name is not None:
            _check_name(name)
            get(name)
        self.name = name
        self.previous = getattr(_local, "override", None)
        _local.override = name

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        _local.override = self.previous
        return False


__all__ = ["BACKEND_NAMES", "TorchBackend", "available", "cpu_linear_node", "forced", "get", "select", "use"]
