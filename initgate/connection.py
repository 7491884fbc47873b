"""Opening the gate's connections, with retries and clear errors.

asyncpg by default, psycopg 3 when asked (see :mod:`initgate.drivers`).
Permanent failures (wrong password, missing database, a URL the driver cannot
use) become ConfigurationError at once. Transient ones (the server starting,
restarting, out of connection slots, not reachable yet) are retried with
exponential backoff and jitter until the deadline, then become
DatabaseUnavailableError. No message shows a password.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import tenacity

from initgate.drivers import (
    AsyncpgSession,
    Driver,
    PsycopgSession,
    Session,
    errors,
)
from initgate.errors import ConfigurationError, DatabaseUnavailableError
from initgate.settings import Settings

__all__ = ["TRANSIENT_ERRORS", "connect", "describe_error"]

logger = logging.getLogger(__name__)

TRANSIENT_ERRORS = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
)
"""Errors after which connecting again may succeed."""


def describe_error(exc: BaseException, settings: Settings) -> str:
    """``Type: message`` on one line, with the password scrubbed."""
    message = " ".join(str(exc).split()) or type(exc).__name__
    return settings.scrub(f"{type(exc).__name__}: {message}")


async def connect(
    settings: Settings,
    server_settings: dict[str, str] | None = None,
    *,
    deadline: float | None = None,
    driver: Driver = Driver.ASYNCPG,
) -> Any:
    """Open a session to the settings' database.

    Args:
        settings: Where to connect.
        server_settings: Session parameters sent in the startup packet, so
            they cost no round trip.
        deadline: Seconds to keep retrying transient errors; default
            ``settings.connect_timeout``.
        driver: asyncpg (an :class:`AsyncpgSession`) or psycopg (a
            :class:`PsycopgSession`).

    Raises:
        ConfigurationError: Credentials, database name or URL are wrong.
        DatabaseUnavailableError: Still failing when the deadline passed.
    """
    deadline = settings.connect_timeout if deadline is None else deadline
    dsn = settings.url.set(drivername="postgresql").render_as_string(
        hide_password=False
    )

    def log_retry(state: tenacity.RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        logger.info(
            "database %s not reachable yet (attempt %d: %s); retrying",
            settings.masked_url,
            state.attempt_number,
            describe_error(exc, settings) if exc else "?",
        )

    if driver is Driver.PSYCOPG:
        open_once = _psycopg_connect_once
        transient = TRANSIENT_ERRORS + _psycopg_transient_errors()
    else:
        open_once = _connect_once
        transient = TRANSIENT_ERRORS
    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(transient),
        wait=_within(deadline, tenacity.wait_random_exponential(0.05, max=2.0)),
        stop=tenacity.stop_after_delay(deadline),
        before_sleep=log_retry,
        reraise=True,
    )
    try:
        async for attempt in retrying:
            with attempt:
                return await open_once(
                    settings, dsn, dict(server_settings or {}), deadline
                )
    except transient as exc:
        raise DatabaseUnavailableError(
            f"could not connect to {settings.masked_url} within {deadline:g} s: "
            f"{describe_error(exc, settings)}; check that PostgreSQL is up and "
            "reachable, or raise INITGATE_CONNECT_TIMEOUT"
        ) from None
    raise AssertionError("unreachable: tenacity either returns or raises")


def _within(deadline: float, wait: tenacity.wait.wait_base) -> Any:
    """``wait``, cut short so that the last attempt starts at the deadline.

    Without the cut, the backoff's last sleep (up to 2 s) would carry the
    failure that far past ``INITGATE_CONNECT_TIMEOUT``.
    """

    def capped(state: tenacity.RetryCallState) -> float:
        remaining = deadline - (state.seconds_since_start or 0.0)
        return max(0.0, min(wait(state), remaining))

    return capped


async def _connect_once(
    settings: Settings, dsn: str, server_settings: dict[str, str], deadline: float
) -> Any:
    try:
        return await asyncpg.connect(
            dsn,
            server_settings=server_settings,
            timeout=min(deadline, 10.0),
            connection_class=AsyncpgSession,
        )
    except asyncpg.UndefinedObjectError:
        # PostgreSQL before 14 has no client_connection_check_interval; go
        # on without it (a killed holder then keeps the lock until its
        # statement ends).
        if server_settings.pop("client_connection_check_interval", None):
            logger.info(
                "server has no client_connection_check_interval (PostgreSQL "
                "< 14); a killed holder frees the lock only when its "
                "statement ends"
            )
            return await _connect_once(settings, dsn, server_settings, deadline)
        raise
    except asyncpg.ProtocolViolationError as exc:
        if "unsupported startup parameter" not in str(exc):
            raise
        return await _connect_pooled(
            settings, dsn, server_settings, deadline, open_once=_connect_once
        )
    except (
        asyncpg.InvalidPasswordError,
        asyncpg.InvalidAuthorizationSpecificationError,
        asyncpg.InvalidCatalogNameError,
    ) as exc:
        raise ConfigurationError(
            f"{settings.masked_url}: {describe_error(exc, settings)}"
        ) from None
    except (ValueError, asyncpg.InterfaceError) as exc:
        raise ConfigurationError(
            f"cannot use the database URL {settings.masked_url}: "
            f"{describe_error(exc, settings)}"
        ) from None


# What PgBouncer keeps per client and so accepts in a startup packet; it
# closes the connection on any other parameter.
_POOLER_STARTUP_PARAMETERS = frozenset(
    {
        "application_name",
        "client_encoding",
        "datestyle",
        "standard_conforming_strings",
        "timezone",
    }
)


OpenOnce = Callable[[Settings, str, dict[str, str], float], Awaitable[Session]]


async def _connect_pooled(
    settings: Settings,
    dsn: str,
    server_settings: dict[str, str],
    deadline: float,
    *,
    open_once: OpenOnce,
    kept: frozenset[str] = _POOLER_STARTUP_PARAMETERS,
) -> Session:
    """Connect through a pooler that refused startup parameters; SET them.

    Logs in with the parameters in ``kept`` only, through ``open_once``.
    The SET costs one round trip per connection, only on this path.
    """
    startup = {
        name: value for name, value in server_settings.items() if name.lower() in kept
    }
    later = {k: v for k, v in server_settings.items() if k not in startup}
    logger.info(
        "%s refused the startup parameters %s, as a connection pooler such "
        "as PgBouncer does; setting them after login instead",
        settings.masked_url,
        ", ".join(sorted(later)),
    )
    conn = await open_once(settings, dsn, startup, deadline)
    try:
        await _set_all(conn, later)
    except BaseException:
        await conn.close()
        raise
    return conn


async def _set_all(conn: Any, values: dict[str, str]) -> None:
    if not values:
        return
    sql = "; ".join(
        f"SET {name} = '{value.replace(chr(39), chr(39) * 2)}'"
        for name, value in values.items()
    )
    try:
        await conn.execute(sql)
    except errors("42704"):  # undefined_object
        # As at login: PostgreSQL before 14 lacks this one setting.
        if values.pop("client_connection_check_interval", None) is None:
            raise
        await _set_all(conn, values)


# -- psycopg ------------------------------------------------------------------


def _psycopg_transient_errors() -> tuple[type[Exception], ...]:
    try:
        import psycopg
    except ImportError:
        raise ConfigurationError(
            "the gate's driver is psycopg (SyncInitGate's default, or "
            "INITGATE_DRIVER), and psycopg 3 is not installed: pip install "
            "'initgate[psycopg]', or set INITGATE_DRIVER=asyncpg"
        ) from None
    return (psycopg.OperationalError,)


# libpq reports a failed login as text only, without its SQLSTATE, so these
# phrases of PostgreSQL's (English) messages are what tells a wrong
# password from a server that is still starting. A message in another
# language is retried until the deadline, then reported.
_PERMANENT_LOGIN_FAILURES = (
    "password authentication failed",
    "authentication failed for user",
    "no pg_hba.conf entry",
    "does not exist",
    "password is required",
    "permission denied for database",
)


async def _psycopg_connect_once(
    settings: Settings, dsn: str, server_settings: dict[str, str], deadline: float
) -> Session:
    import psycopg

    startup = dict(server_settings)
    application_name = startup.pop("application_name", None)
    kwargs: dict[str, Any] = {"connect_timeout": max(1, round(min(deadline, 10.0)))}
    if application_name is not None:
        kwargs["application_name"] = application_name
    if startup:
        kwargs["options"] = " ".join(
            f"-c {name}={_escape_option(value)}" for name, value in startup.items()
        )
    try:
        return await PsycopgSession.connect(dsn, **kwargs)
    except psycopg.OperationalError as exc:
        message = str(exc)
        check = "client_connection_check_interval"
        if check in message and check in server_settings:
            # PostgreSQL before 14, as for asyncpg above.
            logger.info(
                "server has no client_connection_check_interval (PostgreSQL "
                "< 14); a killed holder frees the lock only when its "
                "statement ends"
            )
            fewer = {k: v for k, v in server_settings.items() if k != check}
            return await _psycopg_connect_once(settings, dsn, fewer, deadline)
        if "unsupported startup parameter" in message and startup:
            # All but application_name went in `options`, which PgBouncer
            # refuses as a whole.
            return await _connect_pooled(
                settings,
                dsn,
                server_settings,
                deadline,
                open_once=_psycopg_connect_once,
                kept=frozenset({"application_name"}),
            )
        if any(phrase in message for phrase in _PERMANENT_LOGIN_FAILURES):
            raise ConfigurationError(
                f"{settings.masked_url}: {describe_error(exc, settings)}"
            ) from None
        raise
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(
            f"cannot use the database URL {settings.masked_url}: "
            f"{describe_error(exc, settings)}"
        ) from None


def _escape_option(value: str) -> str:
    # libpq's options: arguments split at spaces; a backslash escapes one.
    return value.replace("\\", "\\\\").replace(" ", "\\ ")
