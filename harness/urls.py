"""PostgreSQL URLs: point one at another database, read where it connects."""

from __future__ import annotations

import dataclasses
from urllib.parse import SplitResult, parse_qsl, quote, unquote, urlsplit, urlunsplit

__all__ = ["Upstream", "with_database"]


def with_database(url: str, database: str) -> str:
    """Return ``url`` pointing at ``database``, as a plain ``postgresql://`` URL.

    A driver suffix (``postgresql+asyncpg``) is dropped, an empty password is
    left out, and the query (for example ``host=/socket/dir``) is kept.
    """
    parts = urlsplit(url)
    return urlunsplit(
        ("postgresql", _netloc(parts), "/" + quote(database), parts.query, "")
    )


def _netloc(parts: SplitResult) -> str:
    credentials = ""
    if parts.username:
        credentials = quote(unquote(parts.username), safe="")
        if parts.password:
            credentials += ":" + quote(unquote(parts.password), safe="")
        credentials += "@"
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    port = f":{parts.port}" if parts.port else ""
    return f"{credentials}{host}{port}"


@dataclasses.dataclass(frozen=True)
class Upstream:
    """Where a PostgreSQL server listens, and who to log in as."""

    user: str
    password: str | None
    unix_socket: str | None
    host: str | None
    port: int

    @classmethod
    def from_url(cls, url: str) -> Upstream:
        """Read the address from a libpq-style URL (``?host=`` wins over netloc)."""
        parts = urlsplit(url)
        query = dict(parse_qsl(parts.query))
        host = query.get("host") or parts.hostname or "localhost"
        port = int(query.get("port") or parts.port or 5432)
        user = unquote(parts.username or query.get("user") or "postgres")
        password = unquote(parts.password) if parts.password else None
        if host.startswith("/"):
            return cls(user, password, f"{host}/.s.PGSQL.{port}", None, port)
        return cls(user, password, None, host, port)
