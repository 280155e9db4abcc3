"""Demo tasks for ``vcon compress``: a pretrained model, real data, and which layers to compress.

=================  ==================================================================  =====================
name               what                                                                needs
=================  ==================================================================  =====================
``minilm-rt``      all-MiniLM-L6-v2 fine-tuned on Rotten Tomatoes sentiment (default)  pip wheels (see deps)
``lite0-fmnist``   EfficientNet-Lite0 (ImageNet) fine-tuned on Fashion-MNIST           pip wheels + Debian
``digits-mlp``     a 4-layer MLP on scikit-learn digits (seconds; for tests)          scikit-learn
=================  ==================================================================  =====================

Example usage::

    from vcon_kernels.tasks import get_task
    task = get_task("minilm-rt", train_size=1000)
"""

from __future__ import annotations

from ..integrations.deps import MissingDependency
from .base import Task
from .digits_mlp import DigitsMLP
from .lite0_fmnist import Lite0FMNIST
from .minilm_rt import MiniLMRT

TASKS = {cls.name: cls for cls in (MiniLMRT, Lite0FMNIST, DigitsMLP)}
DEFAULT_TASK = MiniLMRT.name


def get_task(name: str, device: str = "cpu", **options) -> Task:
    """An (unloaded) task by name; unknown names raise with the list of known ones."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
    return TASKS[name](device=device, **options)


__all__ = ["DEFAULT_TASK", "MissingDependency", "TASKS", "Task", "get_task"]
