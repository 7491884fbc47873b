"""Entry point: ``python -m bench`` (see :mod:`bench.cli`)."""

from __future__ import annotations

import sys

from bench.cli import main

# The guard matters: multiprocessing re-imports the main module in the fork
# server's children, and that import must not start another bench.
if __name__ == "__main__":
    sys.exit(main())
