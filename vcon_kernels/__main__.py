"""``python -m vcon_kernels compress ...``: the same as the ``vcon`` console script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
