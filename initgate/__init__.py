"""initgate: run migrations and seed steps exactly once across every worker.

Every worker enters the gate in its lifespan; the worker that takes a
PostgreSQL advisory lock runs Alembic and the seed steps, recording the run in
``init_runs``; the others wait, then serve.

The public names below are imported on first use, not with the package: the
``initgate`` command's ``--help`` and its ledger commands need neither Alembic
nor FastAPI, and importing them costs more than a second of CPU per process.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
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
    from initgate.lifespan import InitGate
    from initgate.settings import Settings, async_database_url, mask_url
    from initgate.states import RunStatus, StepKind, StepStatus

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

# The module that defines each public name; it must agree with the imports
# above, which are what type checkers and editors read.
_HOMES = {
    "ConfigurationError": "initgate.errors",
    "DatabaseAheadError": "initgate.errors",
    "DatabaseUnavailableError": "initgate.errors",
    "FailFastError": "initgate.errors",
    "InitFailedError": "initgate.errors",
    "InitGateError": "initgate.errors",
    "UnsupportedConnectionError": "initgate.errors",
    "WaitTimeoutError": "initgate.errors",
    "Gate": "initgate.gate",
    "GateResult": "initgate.gate",
    "Outcome": "initgate.gate",
    "Phase": "initgate.gate",
    "RunStatus": "initgate.states",
    "StepKind": "initgate.states",
    "StepStatus": "initgate.states",
    "InitGate": "initgate.lifespan",
    "Settings": "initgate.settings",
    "async_database_url": "initgate.settings",
    "mask_url": "initgate.settings",
}


def _resolve(name: str) -> Any:
    """Import the public name ``name`` from its module and keep it here.

    Raises:
        AttributeError: ``name`` is not a public name of initgate (nor a
            submodule imported already, which Python finds without this).
    """
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'initgate' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    # Bound as a module global, the name is found without this hook next time.
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if not TYPE_CHECKING:
    # Hidden from type checkers: with a module __getattr__ in sight, mypy
    # would type any misspelt name imported from initgate as Any instead of
    # reporting it.
    __getattr__ = _resolve
