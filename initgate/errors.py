"""Every exception initgate raises.

The hierarchy::

    InitGateError
    ├── ConfigurationError        bad settings, alembic.ini, seed registry
    ├── DatabaseUnavailableError  could not connect before the connect deadline
    ├── InitFailedError           a migration or seed step failed in this worker
    │   └── FailFastError         the target failed too often; not retried here
    ├── WaitTimeoutError          another worker held the lock for too long
    │   └── LockHeldError         an operator command found the lock taken
    ├── DatabaseAheadError        the database has revisions this code lacks
    └── UnsupportedConnectionError  session locks cannot hold (transaction pooler)

Messages say what happened, with which value, and what to do next. They never
contain a password: settings mask DSNs before they reach any message.
"""

from __future__ import annotations

__all__ = [
    "ConfigurationError",
    "DatabaseAheadError",
    "DatabaseUnavailableError",
    "FailFastError",
    "InitFailedError",
    "InitGateError",
    "LockHeldError",
    "UnsupportedConnectionError",
    "WaitTimeoutError",
]


class InitGateError(Exception):
    """Base class of every error raised by initgate."""


class ConfigurationError(InitGateError):
    """The settings, the Alembic configuration or the seed registry are invalid."""


class DatabaseUnavailableError(InitGateError):
    """PostgreSQL did not accept a connection before the connect deadline."""


class InitFailedError(InitGateError):
    """A migration or seed step failed; the run is recorded as ``failed``.

    Attributes:
        run_id: The ``init_runs.id`` of the failed run, when one was recorded.
    """

    def __init__(self, message: str, run_id: int | None = None) -> None:
        super().__init__(message)
        self.run_id = run_id


class FailFastError(InitFailedError):
    """Init for this target already failed ``max_attempts`` times in a row.

    Raised without running anything, quoting the recorded error, so that a
    deterministic failure is not re-run by every worker in turn. Deploy a fix
    (which changes the target) or lift the state with ``initgate retry``.
    """


class WaitTimeoutError(InitGateError):
    """Waited ``wait_timeout`` seconds while another worker held the lock."""


class LockHeldError(WaitTimeoutError):
    """A command that must hold the init lock found it held, and did not wait.

    ``initgate retry`` raises it rather than lifting the fail-fast state
    under a holder that is running init at that moment.
    """


class DatabaseAheadError(InitGateError):
    """``alembic_version`` names a revision that this code does not know.

    Usually an older release booting against a database a newer release has
    migrated. Set ``INITGATE_ALLOW_UNKNOWN_REVISIONS=true`` to start anyway.
    """


class UnsupportedConnectionError(InitGateError):
    """The connection cannot keep a session-level advisory lock.

    A pooler in transaction mode (PgBouncer ``pool_mode=transaction``) hands
    each transaction to another server session, so the lock would not hold.
    """
