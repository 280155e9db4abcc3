"""Convert a Hugging Face model's layers by module-name patterns.

Patterns are shell-style globs (``fnmatch``) matched against qualified module names such
as ``bert.encoder.layer.3.attention.self.query``. ``include`` selects layers, ``exclude``
removes some of them again; the task heads (classifier, LM head, score, QA outputs, pooler)
are excluded by default because they are small and the most sensitive to compression.
``config`` is one ``vk`` config for every selected layer or a dict ``{pattern: config or
None}`` whose first matching pattern decides (None keeps the layer dense).

Example usage::

    from vcon_kernels.integrations import hf
    hf.convert(model, vk.Prune(sparsity=0.9), include=["*encoder.layer.*"])
    hf.convert(model, {"*attention*": vk.Quantize(bits=4), "*intermediate*": vk.Prune(sparsity=0.5)})
"""

from __future__ import annotations

import fnmatch
from typing import Sequence
from typing import Union

from torch import nn

from ...configs import VCONConfig
from ...convert import convert as vk_convert

DEFAULT_EXCLUDE = ("*classifier*", "*lm_head*", "*score*", "*qa_outputs*", "*pooler*")
CONVERTIBLE = (nn.Linear, nn.Conv2d)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _as_patterns(value, what: str) -> tuple:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    value = tuple(value)
    if not all(isinstance(p, str) for p in value):
        raise TypeError(f"{what} must be a glob pattern or a list of glob patterns (str)")
    return value


def matching_layers(model: nn.Module, include=("*",), exclude=DEFAULT_EXCLUDE) -> list:
    """Names of the ``nn.Linear`` / ``nn.Conv2d`` layers the patterns select (for a dry run)."""
    include, exclude = _as_patterns(include, "include"), _as_patterns(exclude, "exclude")
    return [name for name, m in model.named_modules()
            if type(m) in CONVERTIBLE and _matches(name, include) and not _matches(name, exclude)]


def convert(model: nn.Module, config: Union[VCONConfig, dict], include=("*",), exclude=DEFAULT_EXCLUDE) -> nn.Module:
    """``vk.convert`` restricted to the layers the patterns select; returns the model (converted in place)."""
    selected = set(matching_layers(model, include, exclude))
    if not selected:
        linears = [n for n, m in model.named_modules() if type(m) in CONVERTIBLE][:5]
        raise ValueError(
            f"no nn.Linear/nn.Conv2d layer matches include={list(_as_patterns(include, 'include'))} minus "
            f"exclude={list(_as_patterns(exclude, 'exclude'))}; layer names look like: {', '.join(linears)}"
        )
    if isinstance(config, dict):
        rules = list(config.items())
        for pattern, cfg in rules:
            if not isinstance(pattern, str) or not (cfg is None or isinstance(cfg, VCONConfig)):
                raise TypeError("config dict must map glob patterns (str) to vk configs or None")

        def choose(module, name):
            if name not in selected:
                return None
            return next((cfg for pattern, cfg in rules if fnmatch.fnmatchcase(name, pattern)), None)

        return vk_convert(model, choose)
    if not isinstance(config, VCONConfig):
        raise TypeError(f"config must be a vk config or a dict {{pattern: config}}, got {type(config).__name__}")
    return vk_convert(model, config, filter_fn=lambda module, name: name in selected)


__all__ = ["DEFAULT_EXCLUDE", "convert", "matching_layers"]
