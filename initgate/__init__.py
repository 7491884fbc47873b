"""initgate: run migrations and seed steps exactly once across every worker.

Every worker enters the gate in its lifespan; the worker that takes a
PostgreSQL advisory lock runs Alembic and the seed steps, recording the run in
``init_runs``; the others wait, then serve.
"""

from __future__ import annotations

from initgate.errors import (
    ConfigurationError,
    DatabaseAheadError,
    DatabaseUnavailableError,
    FailFastError,
    InitFailedError,
    InitGateError,
    UnsupportedConnectionError,
    WaitTimeoutError,
)
from initgate.gate import Gate, GateResult, Outcome, Phase
from initgate.ledger import RunStatus, StepKind, StepStatus
from initgate.lifespan import InitGate
from initgate.settings import Settings, async_database_url, mask_url

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "DatabaseAheadError",
    "DatabaseUnavailableError",
    "FailFastError",
    "Gate",
    "GateResult",
    "InitFailedError",
    "InitGate",
    "InitGateError",
    "Outcome",
    "Phase",
    "RunStatus",
    "Settings",
    "StepKind",
    "StepStatus",
    "UnsupportedConnectionError",
    "WaitTimeoutError",
    "__version__",
    "async_database_url",
    "mask_url",
]
