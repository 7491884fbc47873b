"""Seed steps: the reference data the service serves, loaded from pycountry.

Each step inserts every row with a plain INSERT and no ``ON CONFLICT`` clause.
That is on purpose: the gate promises to run a step once per version, and a
second run has to fail loudly on the primary key rather than pass unnoticed.
Bump a step's ``version`` to have the gate run it again (after making its body
able to cope with the rows already there).

Importing this module registers the steps on :data:`app.gate.gate`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import pycountry
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db import countries, currencies, languages
from app.gate import gate

__all__ = ["seed_countries", "seed_currencies", "seed_languages"]

Row = dict[str, str | None]

# Rows per INSERT round trip; languages has about 8,000 rows.
_BATCH_SIZE = 1000


def _trace(step: str) -> None:
    """Append ``"<step> <pid>"`` to the file named by ``APP_SEED_TRACE_FILE``.

    This counts how often a step's body really ran, seen from outside the
    gate's own bookkeeping: tests read the file to check that across all the
    workers each step ran exactly once, which the ``init_runs`` ledger cannot
    prove about itself. Unset (the default), it does nothing.
    """
    path = os.environ.get("APP_SEED_TRACE_FILE")
    if not path:
        return

    # A blocking write in async code, but of one short line at startup. In
    # append mode each flush of one line lands whole at the end of the file,
    # even with several worker processes writing at once.
    with open(path, "a", encoding="utf-8") as trace:
        trace.write(f"{step} {os.getpid()}\n")
        trace.flush()


def _batches(rows: Iterable[Row]) -> Iterator[list[Row]]:
    """Split rows into lists of at most ``_BATCH_SIZE``."""
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) == _BATCH_SIZE:
            yield batch
            batch = []
    if batch:
        yield batch


async def _insert_all(
    conn: AsyncConnection, table: sa.Table, rows: Iterable[Row]
) -> None:
    """Insert the rows in batches, each one executemany round trip."""
    for batch in _batches(rows):
        await conn.execute(table.insert(), batch)


@gate.seed("countries", version=1)
async def seed_countries(conn: AsyncConnection) -> None:
    """Insert every ISO 3166-1 country."""
    _trace("countries")
    rows = (
        {
            "alpha_2": country.alpha_2,
            "alpha_3": country.alpha_3,
            "numeric": country.numeric,
            "name": country.name,
            # Only about two thirds of the countries have an official name.
            "official_name": getattr(country, "official_name", None),
        }
        for country in pycountry.countries
    )
    await _insert_all(conn, countries, rows)


@gate.seed("currencies", version=1)
async def seed_currencies(conn: AsyncConnection) -> None:
    """Insert every ISO 4217 currency."""
    _trace("currencies")
    rows = (
        {
            "alpha_3": currency.alpha_3,
            "numeric": currency.numeric,
            "name": currency.name,
        }
        for currency in pycountry.currencies
    )
    await _insert_all(conn, currencies, rows)


@gate.seed("languages", version=1)
async def seed_languages(conn: AsyncConnection) -> None:
    """Insert every ISO 639-3 language."""
    _trace("languages")
    rows = (
        {
            "alpha_3": language.alpha_3,
            "alpha_2": getattr(language, "alpha_2", None),
            "name": language.name,
        }
        for language in pycountry.languages
    )
    await _insert_all(conn, languages, rows)
