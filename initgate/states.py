"""The states a run and a step of ``init_runs`` / ``init_steps`` can be in.

Apart from the ledger, with no dependency, so that the command line can
offer them as choices without importing SQLAlchemy or a driver. The SQL check
constraints are built from these enums (see :mod:`initgate.ledger`).
"""

from __future__ import annotations

import enum

__all__ = ["RunStatus", "StepKind", "StepStatus"]


class RunStatus(enum.StrEnum):
    """The life of one ``init_runs`` row."""

    RUNNING = "running"
    """A holder is working on it, or died while it did (until the next holder)."""
    SUCCEEDED = "succeeded"
    """Every pending migration and seed step was applied and committed."""
    FAILED = "failed"
    """A step raised; ``error`` and ``traceback`` say which and why."""
    ABANDONED = "abandoned"
    """Its holder's session ended mid-run; the next holder marked it so."""
    RETRY = "retry"
    """Not an init attempt: an operator's ``initgate retry``, which lifts the
    fail-fast state. Failures before it no longer count towards
    ``max_attempts``; it starts and finishes at the same instant."""


class StepKind(enum.StrEnum):
    """What an ``init_steps`` row records."""

    MIGRATION = "migration"
    """One Alembic revision; ``name`` is the revision id."""
    SEED = "seed"
    """One seed step; ``name`` and ``version`` are as registered."""


class StepStatus(enum.StrEnum):
    """Outcome of one step."""

    SUCCEEDED = "succeeded"
    """Applied and committed."""
    FAILED = "failed"
    """Raised; rolled back (a seed step) or left the revision unapplied."""
