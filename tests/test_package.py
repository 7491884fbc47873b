"""The ``initgate`` package: its public names, imported on first use."""

from __future__ import annotations

import importlib

import pytest

import initgate
from tests.helpers import run_python


@pytest.mark.parametrize("name", sorted(set(initgate.__all__) - {"__version__"}))
def test_every_public_name_is_its_modules_own_object(name: str) -> None:
    value = getattr(initgate, name)

    home = importlib.import_module(value.__module__)
    assert getattr(home, name) is value


def test_every_public_name_is_listed_by_dir() -> None:
    assert set(initgate.__all__) <= set(dir(initgate))


def test_an_unknown_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'NoSuchName'"):
        initgate.NoSuchName  # type: ignore[attr-defined]  # noqa: B018


def test_import_alone_loads_no_dependency() -> None:
    script = (
        "import sys, initgate\n"
        "print(sorted(name for name in sys.modules if name.startswith("
        "('sqlalchemy', 'alembic', 'fastapi', 'asyncpg', 'pydantic'))))\n"
    )

    result = run_python("-c", script, timeout=60)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
