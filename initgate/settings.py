"""Settings from the environment, validated once at start; DSN masking.

Every setting is read from an ``INITGATE_``-prefixed environment variable; the
database URL falls back to the plain ``DATABASE_URL`` most platforms set.
"""

from __future__ import annotations

import os
import re
import urllib.parse
from pathlib import Path
from typing import Any, Literal

import sqlalchemy
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from initgate.errors import ConfigurationError

__all__ = ["Settings", "async_database_url", "mask_url"]

_POSTGRES_DRIVERS = {
    "postgres",
    "postgresql",
    "postgresql+asyncpg",
    "postgresql+psycopg",
    "postgresql+psycopg2",
}
_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_$]{0,62}$")


def _parse_url(raw: str) -> sqlalchemy.URL:
    """Parse a PostgreSQL URL, raising ConfigurationError without echoing it."""
    try:
        url = sqlalchemy.make_url(raw)
    except Exception:
        raise ConfigurationError(
            "the database URL is not a valid URL; expected "
            "postgresql://user:password@host:port/database"
        ) from None
    if url.drivername not in _POSTGRES_DRIVERS:
        raise ConfigurationError(
            f"the database URL uses scheme {url.drivername!r}; expected "
            "postgresql:// (initgate picks its driver itself; see INITGATE_DRIVER)"
        )
    if not url.database:
        raise ConfigurationError(
            f"the database URL {mask_url(url)} names no database; "
            "add one after the host, e.g. postgresql://host:5432/app"
        )
    return url


def mask_url(url: str | sqlalchemy.URL) -> str:
    """Render a URL with its password replaced by ``***``.

    Accepts a string that may not parse; then everything between ``://`` and
    the last ``@`` is masked, so not even a malformed URL leaks its secret.
    """
    if isinstance(url, sqlalchemy.URL):
        return url.render_as_string(hide_password=True)
    try:
        return sqlalchemy.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return re.sub(r"(://)[^/]*@", r"\1***@", url)


def async_database_url(url: str | None = None) -> sqlalchemy.URL:
    """Turn a plain ``postgresql://`` URL into one for SQLAlchemy with asyncpg.

    Args:
        url: The URL; when None, ``INITGATE_DATABASE_URL`` or else
            ``DATABASE_URL`` from the environment.

    Raises:
        ConfigurationError: No URL is set, or it is not a PostgreSQL URL.
    """
    if url is None:
        url = os.environ.get("INITGATE_DATABASE_URL") or os.environ.get("DATABASE_URL")
    if not url:
        raise ConfigurationError(
            "no database URL: set DATABASE_URL (or INITGATE_DATABASE_URL)"
        )
    return _parse_url(url).set(drivername="postgresql+asyncpg")


class Settings(BaseSettings):
    """What the gate needs to know; see the README's configuration table.

    Build it with keyword arguments, or with :meth:`from_env` to read the
    environment and turn validation failures into one ConfigurationError.
    """

    model_config = SettingsConfigDict(
        env_prefix="INITGATE_", extra="ignore", populate_by_name=True
    )

    database_url: SecretStr = Field(
        validation_alias=AliasChoices("INITGATE_DATABASE_URL", "DATABASE_URL")
    )
    """PostgreSQL URL (``postgresql://``); the password is kept secret."""

    gate_database_url: SecretStr | None = Field(
        None, validation_alias=AliasChoices("INITGATE_GATE_DATABASE_URL")
    )
    """A URL for initgate's own sessions only: the gate, its CLI and history.

    Needed when ``database_url`` goes through a pooler in transaction mode
    (PgBouncer ``pool_mode=transaction``), where a session-level lock cannot
    hold: point this at PostgreSQL itself (or at a session-mode pool) and let
    the app's traffic use the pooler. Default: ``database_url``.
    """

    alembic_config: Path | None = Path("alembic.ini")
    """Path of ``alembic.ini``; empty disables migrations (seed steps only)."""

    namespace: str | None = None
    """Names the init domain; default ``<database>:<schema>``."""

    ledger_schema: str = Field(
        "public", validation_alias=AliasChoices("INITGATE_SCHEMA")
    )
    """Schema that holds ``init_runs`` and ``init_steps``."""

    version_table: str = "alembic_version"
    """Alembic's version table, as Alembic's ``env.py`` configures it."""

    wait_timeout: float = Field(300.0, gt=0)
    """Seconds a waiter waits for the holder before it gives up."""

    connect_timeout: float = Field(60.0, gt=0)
    """Seconds to keep retrying the first connection (server starting up)."""

    poll_interval: float = Field(1.0, gt=0, le=60)
    """Seconds between try-locks while waiting; bounds takeover after a crash."""

    max_attempts: int = Field(3, ge=1)
    """Failed runs in a row for one target after which workers fail fast."""

    allow_unknown_revisions: bool = False
    """Start even when the database has revisions this code does not know."""

    allow_session_pooler: bool = False
    """The gate's URL goes through a pooler in session mode (PgBouncer
    ``pool_mode=session``), which keeps the lock; any pooler is refused
    without it, as no check can tell the modes apart for certain."""

    connection_check_interval: int = Field(1000, ge=0)
    """Milliseconds; PostgreSQL checks the holder's client is alive this often
    during a statement (0 disables), so a killed holder frees the lock fast."""

    code_version: str | None = None
    """Free text stored with each run, e.g. the release or git commit."""

    long_wait_warning: float = Field(30.0, gt=0)
    """Seconds of waiting after which a waiter logs a WARNING, and again."""

    driver: Literal["asyncpg", "psycopg"] | None = None
    """Driver of the gate's session. Default: psycopg for a
    ``postgresql+psycopg://`` URL, else what the entry point prefers
    (asyncpg for :class:`~initgate.InitGate`, psycopg for
    :class:`~initgate.sync.SyncInitGate`)."""

    @field_validator("alembic_config", mode="before")
    @classmethod
    def _empty_means_none(cls, value: Any) -> Any:
        return None if value in ("", None) else value

    @field_validator("ledger_schema")
    @classmethod
    def _check_schema(cls, value: str) -> str:
        if not _IDENTIFIER.match(value):
            raise ValueError(
                "expected a plain SQL identifier (letters, digits, _), "
                f"at most 63 characters, got {value!r}"
            )
        return value

    @field_validator("namespace")
    @classmethod
    def _check_namespace(cls, value: str | None) -> str | None:
        if value is not None and not (0 < len(value) <= 200 and value.isprintable()):
            raise ValueError(
                "expected 1 to 200 printable characters, got "
                f"{len(value)} characters: {value[:40]!r}"
            )
        return value

    @field_validator("database_url")
    @classmethod
    def _check_url(cls, value: SecretStr) -> SecretStr:
        _parse_url(value.get_secret_value())
        return value

    @field_validator("gate_database_url")
    @classmethod
    def _check_gate_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None:
            try:
                _parse_url(value.get_secret_value())
            except ConfigurationError as exc:
                problem = str(exc).replace("the database URL", "the URL", 1)
                raise ConfigurationError(
                    f"INITGATE_GATE_DATABASE_URL: {problem}"
                ) from None
        return value

    @field_validator("gate_database_url", mode="before")
    @classmethod
    def _empty_url_means_none(cls, value: Any) -> Any:
        return None if value in ("", None) else value

    @classmethod
    def from_env(cls, **overrides: Any) -> Settings:
        """Read the environment, with keyword arguments taking precedence.

        Raises:
            ConfigurationError: A setting is missing or invalid; the message
                names each bad variable and never echoes a value.
        """
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc)) from None

    @property
    def url(self) -> sqlalchemy.URL:
        """The URL initgate connects to, parsed (password included: do not log).

        ``gate_database_url`` when set, else ``database_url``.
        """
        chosen = self.gate_database_url or self.database_url
        return _parse_url(chosen.get_secret_value())

    def gate_driver(self, preferred: str) -> str:
        """The driver the gate's session uses.

        :attr:`driver` when set, else the one the URL names
        (``postgresql+psycopg://``, ``postgresql+asyncpg://``), else
        ``preferred``, the entry point's choice.
        """
        if self.driver is not None:
            return self.driver
        named = self.url.drivername.partition("+")[2]
        return named if named in ("asyncpg", "psycopg") else preferred

    @property
    def masked_url(self) -> str:
        """:attr:`url` with its password masked, for messages and logs."""
        return mask_url(self.url)

    @property
    def effective_namespace(self) -> str:
        """The namespace given, or ``<database>:<ledger schema>``.

        The database is that of :attr:`url`, where the lock and the ledger
        live: a pooler's alias for it in ``database_url`` does not count, so
        moving the app's traffic onto a pooler keeps the namespace.
        """
        return self.namespace or f"{self.url.database}:{self.ledger_schema}"

    def scrub(self, text: str) -> str:
        """Remove passwords from free text (errors, tracebacks) before storing."""
        for secret in (self.database_url, self.gate_database_url):
            password = (
                _parse_url(secret.get_secret_value()).password if secret else None
            )
            if password:
                # Also as a URL carries it: percent-encoded, either way.
                for form in {
                    str(password),
                    urllib.parse.quote(str(password), safe=""),
                    urllib.parse.quote_plus(str(password), safe=""),
                }:
                    text = text.replace(form, "***")
        return text


def _describe(exc: ValidationError) -> str:
    """One line per bad setting, naming the variable, never the value."""
    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]).upper() if error["loc"] else "SETTINGS"
        if "DATABASE_URL" in field and error["type"] == "missing":
            problems.append(
                "no database URL: set DATABASE_URL or INITGATE_DATABASE_URL"
            )
            continue
        field = {"LEDGER_SCHEMA": "SCHEMA"}.get(field, field)
        variable = field if field.startswith("INITGATE_") else "INITGATE_" + field
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{variable}: {message}")
    return "invalid initgate settings: " + "; ".join(problems)
