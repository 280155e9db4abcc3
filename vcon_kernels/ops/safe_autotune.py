"""An autotuner that never fails a launch because one of its configs does not compile.

Triton's ``Autotuner`` catches only ``OutOfResources``, ``CompileTimeAssertionFailure`` and
``PTXASError`` while benchmarking; an MLIR pass failure (``RuntimeError: PassManager::run
failed``, seen for some tile configs of some Triton versions) propagates and fails the whole
call, and a config left alone after pruning is launched without any check at all.
:class:`SafeAutotuner` compiles each pruned config first (the same compile the launch would do:
it lands in the JIT cache) and drops the ones that raise, with one warning per config naming
it and the error. Only when no config compiles does the launch fail, naming all of them.

Example usage::

    tuned = safe_autotune(configs=[...], key=["M_KEY"], prune_configs_by={...})(kernel)
    tuned[grid](**kwargs)
"""

from __future__ import annotations

import warnings

import triton

_warned: set = set()


def jit_compile_check(fn, args: dict, config) -> None:
    """Compile ``fn`` for ``config`` on the current device without launching it (raises on failure)."""
    fn.run(grid=(1,), warmup=True, **args, **config.all_kwargs())


class SafeAutotuner(triton.runtime.Autotuner):
    """``triton.runtime.Autotuner`` whose ``prune_configs`` drops configs that fail to compile."""

    # Replaceable for tests on machines without a GPU (``aot_compile.compile_for`` stands in).
    compile_check = staticmethod(jit_compile_check)

    def prune_configs(self, kwargs):
        configs = super().prune_configs(kwargs)
        args = {**(self.nargs or {}), **kwargs}
        kept, errors = [], []
        for config in configs:
            try:
                self.compile_check(self.fn, args, config)
            except Exception as exc:  # noqa: BLE001  (any compiler error: skip this config)
                errors.append(f"{config}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
                tag = (self.fn.__name__, str(config), type(exc).__name__)
                if tag not in _warned:
                    _warned.add(tag)
                    warnings.warn(f"{self.fn.__name__}: skipping autotune config {config}, it does not compile "
                                  f"({type(exc).__name__}: {str(exc)[:300]})", RuntimeWarning, stacklevel=2)
                continue
            kept.append(config)
        if not kept:
            raise RuntimeError(f"{self.fn.__name__}: none of the {len(configs)} autotune configs compiles: "
                               + "; ".join(errors))
        return kept


def short_tune_bench(kernel_call, quantiles):
    """Shorter than Triton's default (25 ms warm-up + 100 ms per config): tuning runs once per key."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=25, quantiles=quantiles)


def safe_autotune(configs, key, prune_configs_by=None, do_bench=None):
    """``triton.autotune`` with :class:`SafeAutotuner` (the arguments this package uses)."""
    def decorator(fn):
        return SafeAutotuner(fn, fn.arg_names, configs, key, None, None, prune_configs_by=prune_configs_by,
                             do_bench=do_bench)
    return decorator
