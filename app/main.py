"""The demo service's FastAPI app: ``uvicorn app.main:app --workers 4``.

At startup every worker passes through the init gate first (migrations, then
the seed steps, run by whichever worker takes the lock), and only then builds
its own engine; ``GET /health/ready`` answers 200 once the gate has passed.
"""

from __future__ import annotations

from typing import Annotated, Any

import sqlalchemy as sa
from fastapi import Depends, FastAPI, HTTPException, Query
from sqlalchemy.ext.asyncio import AsyncConnection

from app import seeds  # noqa: F401  (the import registers the seed steps)
from app.db import countries, currencies, database, languages
from app.gate import gate
from app.models import Country, Currency, Language

__all__ = ["app"]

# The gate's lifespan runs first, so the app's own engine is only built in a
# worker whose database is known to be migrated and seeded.
app = FastAPI(
    title="initgate demo: reference data",
    summary="ISO countries, currencies and languages, migrated and seeded once.",
    lifespan=gate.lifespan_with(database.lifespan),
)
app.include_router(gate.router)

Connection = Annotated[AsyncConnection, Depends(database.connect)]
NameFilter = Annotated[
    str | None,
    Query(max_length=100, description="Case-insensitive part of the name."),
]


async def _one(conn: AsyncConnection, query: sa.Select[Any], what: str) -> Any:
    """The single row the query selects.

    Raises:
        HTTPException: 404 naming ``what`` when there is no such row.
    """
    row = (await conn.execute(query)).first()
    if row is None:
        raise HTTPException(status_code=404, detail=f"no {what}")
    return row


@app.get("/countries", tags=["countries"])
async def list_countries(conn: Connection, q: NameFilter = None) -> list[Country]:
    """All countries by name, or those whose name contains ``q``."""
    query = sa.select(countries).order_by(countries.c.name)
    if q:
        # autoescape: a "%" or "_" typed by the caller matches only itself.
        query = query.where(countries.c.name.icontains(q, autoescape=True))
    return [Country.model_validate(row) for row in await conn.execute(query)]


@app.get("/countries/{alpha_2}", tags=["countries"])
async def get_country(conn: Connection, alpha_2: str) -> Country:
    """One country by its two-letter code, in either case; 404 if unknown."""
    code = alpha_2.upper()
    query = sa.select(countries).where(countries.c.alpha_2 == code)
    return Country.model_validate(await _one(conn, query, f"country {code!r}"))


@app.get("/currencies", tags=["currencies"])
async def list_currencies(conn: Connection, q: NameFilter = None) -> list[Currency]:
    """All currencies by code, or those whose name contains ``q``."""
    query = sa.select(currencies).order_by(currencies.c.alpha_3)
    if q:
        query = query.where(currencies.c.name.icontains(q, autoescape=True))
    return [Currency.model_validate(row) for row in await conn.execute(query)]


@app.get("/currencies/{code}", tags=["currencies"])
async def get_currency(conn: Connection, code: str) -> Currency:
    """One currency by its three-letter code, in either case; 404 if unknown."""
    code = code.upper()
    query = sa.select(currencies).where(currencies.c.alpha_3 == code)
    return Currency.model_validate(await _one(conn, query, f"currency {code!r}"))


@app.get("/languages", tags=["languages"])
async def list_languages(
    conn: Connection,
    q: NameFilter = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> list[Language]:
    """Languages by code, or those whose name contains ``q``, a page at a time.

    There are about 8,000; ``limit`` and ``offset`` page through them.
    """
    query = (
        sa.select(languages).order_by(languages.c.alpha_3).limit(limit).offset(offset)
    )
    if q:
        query = query.where(languages.c.name.icontains(q, autoescape=True))
    return [Language.model_validate(row) for row in await conn.execute(query)]


@app.get("/init/runs", tags=["init"])
async def list_init_runs(
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
) -> list[dict[str, Any]]:
    """The gate's ledger, newest run first, each run with its steps."""
    return await gate.history(limit=limit)
