"""``python -m initgate``: the same as the ``initgate`` command."""

from __future__ import annotations

from initgate.cli import main

main()
