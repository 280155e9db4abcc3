"""Equal-budget comparisons of VCON with one-shot and gradual compression on real tasks.

The harness behind ``vcon compress`` and the scripts in the top-level ``experiments/``
folder (which holds the results and the commands; this package holds the code).

* ``methods.py``: the method interface and VCON; ``baselines.py``: one-shot and gradual.
* ``runner.py``: the dense fine-tune (cached), the compression runs, timings and sizes.
* ``memory.py``: peak memory (CUDA allocator stats, or sampled RSS on the CPU).
* ``report.py``: the comparison table, CSV/JSON files and the accuracy/beta plot.
"""

from .baselines import Gradual
from .baselines import OneShot
from .methods import METHOD_NAMES
from .methods import VCON
from .methods import make_method
from .runner import TrainSettings
from .runner import compress_run
from .runner import dense_model
from .runner import finetune
from .runner import settings_for

__all__ = ["METHOD_NAMES", "Gradual", "OneShot", "TrainSettings", "VCON", "compress_run", "dense_model", "finetune",
           "make_method", "settings_for"]
