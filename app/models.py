"""Response bodies of the service's endpoints."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["Country", "Currency", "Language"]


class _Record(BaseModel):
    # Rows from SQLAlchemy Core are read by attribute, like ORM objects.
    model_config = ConfigDict(from_attributes=True, frozen=True)


class Country(_Record):
    """An ISO 3166-1 country."""

    alpha_2: str
    alpha_3: str
    numeric: str
    name: str
    official_name: str | None


class Currency(_Record):
    """An ISO 4217 currency."""

    alpha_3: str
    numeric: str
    name: str


class Language(_Record):
    """An ISO 639-3 language; ``alpha_2`` is its ISO 639-1 code, if it has one."""

    alpha_3: str
    alpha_2: str | None
    name: str
