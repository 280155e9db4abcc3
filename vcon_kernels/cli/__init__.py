"""The ``vcon`` command line (also ``python -m vcon_kernels``).

Example usage::

    vcon compress                                    # the default demo: MiniLM-L6 on Rotten Tomatoes, prune 90%
    vcon compress --method quantize --bits 1 --seeds 0,1,2
    vcon compress --task lite0-fmnist --method lowrank --rank-ratio 0.0417
"""

from __future__ import annotations

import sys
from typing import Optional

from ..integrations.deps import MissingDependency
from .args import build_parser
from .args import check_args


def main(argv: Optional[list] = None) -> int:
    """Entry point of the ``vcon`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    args.argv = argv
    check_args(parser, args)
    try:
        from .compress import run_compress

        return run_compress(args, parser)
    except MissingDependency as exc:
        print(f"vcon: error: {exc}", file=sys.stderr)
        return 3


__all__ = ["main"]
