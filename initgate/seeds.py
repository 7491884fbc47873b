"""Seed steps: a registry of named, versioned async functions.

A seed step runs once per (name, version): bumping the version makes it run
once more. Each step runs in its own transaction on the holder's connection,
and its ``init_steps`` row is written in that same transaction, so a step's
effects and the record that it ran commit together or not at all.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Awaitable, Callable, Iterator

from sqlalchemy.ext.asyncio import AsyncConnection

from initgate.errors import ConfigurationError

__all__ = ["SeedFunction", "SeedRegistry", "SeedStep"]

SeedFunction = Callable[[AsyncConnection], Awaitable[None]]
"""A seed body: gets the holder's connection inside an open transaction."""


@dataclasses.dataclass(frozen=True)
class SeedStep:
    """One registered seed step."""

    name: str
    version: str
    function: SeedFunction


class SeedRegistry:
    """Seed steps in registration order, which is the order they run in."""

    def __init__(self) -> None:
        self._steps: dict[str, SeedStep] = {}

    def add(self, name: str, version: int | str, function: SeedFunction) -> SeedStep:
        """Register a step.

        Raises:
            ConfigurationError: The name is empty or taken, the version is
                empty, or the function is not ``async def``.
        """
        if not isinstance(name, str) or not name.strip():
            raise ConfigurationError(f"seed step name: expected text, got {name!r}")
        if name in self._steps:
            raise ConfigurationError(
                f"two seed steps are named {name!r}: "
                f"{_where(self._steps[name].function)} and {_where(function)}; "
                "give each a unique name"
            )
        if isinstance(version, bool) or not isinstance(version, int | str):
            raise ConfigurationError(
                f"seed step {name!r}: expected an int or str version, got {version!r}"
            )
        if not str(version).strip():
            raise ConfigurationError(f"seed step {name!r}: the version is empty")
        if not inspect.iscoroutinefunction(function):
            raise ConfigurationError(
                f"seed step {name!r}: expected an async function, got {function!r}"
            )
        step = SeedStep(name, str(version), function)
        self._steps[name] = step
        return step

    def __iter__(self) -> Iterator[SeedStep]:
        return iter(self._steps.values())

    def __len__(self) -> int:
        return len(self._steps)


def _where(function: object) -> str:
    # A wrapper (a sync step adapted to async) points at what it wraps.
    code = getattr(inspect.unwrap(function), "__code__", None)  # type: ignore[arg-type]
    if code is None:
        return repr(function)
    return f"{code.co_filename}:{code.co_firstlineno}"
