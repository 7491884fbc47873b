"""initgate.ops without a database: reading gate sessions' application_name."""

from __future__ import annotations

from initgate import Settings
from initgate.gate import Gate
from initgate.ops import is_gate_session_of, parse_application_name
from initgate.seeds import SeedRegistry


def gate_name(namespace: str) -> str:
    settings = Settings(
        database_url="postgresql://app@db/app", alembic_config=None, namespace=namespace
    )
    return Gate(settings, SeedRegistry()).application_name()


def test_a_gate_sessions_name_gives_namespace_host_and_pid() -> None:
    parsed = parse_application_name("initgate:app:public:web-2:41")

    assert parsed == ("app:public", "web-2", 41)
    assert parse_application_name("initgate-cli:status") is None
    assert parse_application_name("initgate:app:public:web-2:x") is None
    assert parse_application_name("psql") is None


def test_waiters_are_matched_even_when_a_long_namespace_was_cut() -> None:
    long = "tenant-" + "x" * 80 + ":public"
    name = gate_name(long)

    assert len(name.encode()) == 63
    assert is_gate_session_of(name, long)
    assert not is_gate_session_of(name, "tenant-y:public")
    assert is_gate_session_of(gate_name("app:public"), "app:public")
    # A short name that is only a prefix is another namespace, not a cut one.
    assert not is_gate_session_of(gate_name("app"), "app:public")
