"""Settings: environment variables, validation messages, password masking."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import make_url, text
from sqlalchemy.ext.asyncio import AsyncConnection

from initgate import (
    ConfigurationError,
    InitFailedError,
    InitGate,
    Outcome,
    Settings,
    async_database_url,
    mask_url,
)
from tests.helpers import DatabaseAdmin
from tests.project import Project, Revision, make_gate

CANARY = "canary-Pw-7f3a9"


def test_database_url_falls_back_to_plain_database_url(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/plain")
    assert Settings.from_env().url.database == "plain"
    monkeypatch.setenv("INITGATE_DATABASE_URL", "postgresql://u@h/prefixed")
    assert Settings.from_env().url.database == "prefixed"


def test_settings_come_from_prefixed_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/app")
    monkeypatch.setenv("INITGATE_WAIT_TIMEOUT", "12.5")
    monkeypatch.setenv("INITGATE_SCHEMA", "ops")
    monkeypatch.setenv("INITGATE_ALEMBIC_CONFIG", "")
    settings = Settings.from_env()
    assert settings.wait_timeout == 12.5
    assert settings.ledger_schema == "ops"
    assert settings.alembic_config is None
    assert settings.effective_namespace == "app:ops"


def test_missing_url_names_the_variables() -> None:
    with pytest.raises(ConfigurationError, match="set DATABASE_URL"):
        Settings.from_env()


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("INITGATE_WAIT_TIMEOUT", "soon", "INITGATE_WAIT_TIMEOUT"),
        ("INITGATE_WAIT_TIMEOUT", "-1", "greater than 0"),
        ("INITGATE_MAX_ATTEMPTS", "0", "INITGATE_MAX_ATTEMPTS"),
        ("INITGATE_SCHEMA", 'ops"; DROP TABLE x; --', "plain SQL identifier"),
        ("INITGATE_NAMESPACE", "a\nb", "printable"),
        ("INITGATE_DRIVER", "psycopg2", "'asyncpg' or 'psycopg'"),
    ],
)
def test_invalid_values_are_named_in_one_line(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://u:{CANARY}@h/app")
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env()
    message = str(raised.value)
    assert expected in message
    assert CANARY not in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        (f"mysql://root:{CANARY}@db/app", "scheme 'mysql'"),
        (f"postgresql://root:{CANARY}@db", "names no database"),
        (f"postgresql://root:{CANARY}@db:notaport/app", "not a valid URL"),
        ("not a url at all", "not a valid URL"),
    ],
)
def test_bad_urls_are_rejected_without_echoing_the_password(
    url: str, expected: str
) -> None:
    with pytest.raises(ConfigurationError, match=expected) as raised:
        Settings.from_env(database_url=url)
    assert CANARY not in str(raised.value)


def test_keyword_settings_are_named_by_their_variable() -> None:
    with pytest.raises(ConfigurationError, match="INITGATE_SCHEMA: expected"):
        Settings.from_env(database_url="postgresql://u@h/db", ledger_schema="a b")


def test_masking_hides_passwords_even_in_urls_that_do_not_parse() -> None:
    assert CANARY not in mask_url(f"postgresql://u:{CANARY}@h:5432/db")
    assert CANARY not in mask_url(f"postgresql://u:{CANARY}@h:port/db")
    settings = Settings(database_url=f"postgresql://u:{CANARY}@h/db")
    assert CANARY not in repr(settings)
    assert CANARY not in settings.masked_url


def test_async_database_url_picks_asyncpg_and_keeps_unix_sockets() -> None:
    url = async_database_url("postgresql://postgres:@/app?host=/tmp/pg")
    assert url.drivername == "postgresql+asyncpg"
    assert url.query == {"host": "/tmp/pg"}


async def test_hostile_namespace_is_stored_verbatim(
    database_url: str, tmp_path: Path, db: DatabaseAdmin
) -> None:
    namespace = "shop'; DROP TABLE init_runs; -- \"$$\\"
    project = Project(tmp_path / "p").add(Revision.sql("r1", "CREATE TABLE t (i int)"))

    first = await make_gate(database_url, project, namespace=namespace).run()
    second = await make_gate(database_url, project, namespace=namespace).run()

    assert (first.outcome, second.outcome) == (Outcome.RAN, Outcome.UP_TO_DATE)
    assert await db.fetchval("SELECT namespace FROM init_runs") == namespace


async def test_password_never_reaches_messages_logs_or_rows(
    database_url: str,
    db: DatabaseAdmin,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The test servers trust local connections, so any password is accepted:
    # the canary travels every path a real one would.
    with_password = (
        make_url(database_url)
        .set(password=CANARY)
        .render_as_string(hide_password=False)
    )
    gate = InitGate(Settings(database_url=with_password, alembic_config=None))

    @gate.seed("leaky", version=1)
    async def leaky(conn: AsyncConnection) -> None:
        await conn.execute(text("SELECT 1"))
        raise RuntimeError(f"could not load data via {with_password}")

    with caplog.at_level(logging.DEBUG), pytest.raises(InitFailedError) as raised:
        await gate.run()

    assert CANARY not in str(raised.value)
    assert all(CANARY not in r.getMessage() for r in caplog.records)
    rows = await db.fetch("SELECT * FROM init_runs")
    steps = await db.fetch("SELECT * FROM init_steps")
    stored = " ".join(str(v) for row in [*rows, *steps] for v in row.values())
    assert "could not load data" in stored
    assert CANARY not in stored


def test_gate_url_is_what_initgate_connects_to(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DATABASE_URL", f"postgresql://app:{CANARY}@pooler:6432/alias")
    assert Settings.from_env().url.host == "pooler"

    monkeypatch.setenv(
        "INITGATE_GATE_DATABASE_URL", f"postgresql://gate:{CANARY}x@db:5432/app"
    )
    settings = Settings.from_env()

    assert (settings.url.host, settings.url.port) == ("db", 5432)
    # The lock and the ledger live in the real database, not the alias.
    assert settings.effective_namespace == "app:public"
    assert CANARY not in settings.masked_url
    assert CANARY not in settings.scrub(f"failed: {CANARY} and {CANARY}x")


def test_bad_gate_url_is_named_by_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("DATABASE_URL", "postgresql://u@h/app")
    monkeypatch.setenv("INITGATE_GATE_DATABASE_URL", f"mysql://u:{CANARY}@h/app")
    with pytest.raises(ConfigurationError) as raised:
        Settings.from_env()
    assert str(raised.value).startswith("INITGATE_GATE_DATABASE_URL: ")
    assert CANARY not in str(raised.value)

    monkeypatch.setenv("INITGATE_GATE_DATABASE_URL", "")
    assert Settings.from_env().url.host == "h"


@pytest.mark.parametrize(
    ("url", "setting", "preferred", "expected"),
    [
        ("postgresql://h/app", None, "psycopg", "psycopg"),
        ("postgresql://h/app", None, "asyncpg", "asyncpg"),
        ("postgresql+psycopg://h/app", None, "asyncpg", "psycopg"),
        ("postgresql+asyncpg://h/app", None, "psycopg", "asyncpg"),
        ("postgresql+psycopg://h/app", "asyncpg", "psycopg", "asyncpg"),
    ],
)
def test_the_gate_driver_is_the_setting_else_the_urls_else_the_entry_points(
    url: str, setting: str | None, preferred: str, expected: str
) -> None:
    settings = Settings(database_url=url, driver=setting)

    assert settings.gate_driver(preferred) == expected
