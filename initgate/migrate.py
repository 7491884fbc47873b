"""Alembic: the code's head revisions, and an upgrade on a given connection."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection

from initgate.errors import ConfigurationError

__all__ = ["AppliedRevision", "Migrations", "UpgradeFailedError", "UpgradeReport"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AppliedRevision:
    """One revision Alembic applied, with when it ran."""

    revision: str
    doc: str | None
    started_at: dt.datetime
    finished_at: dt.datetime


@dataclasses.dataclass
class UpgradeReport:
    """What one ``upgrade heads`` did."""

    applied: list[AppliedRevision] = dataclasses.field(default_factory=list)
    """Revisions in the order they were applied (committed or not)."""
    on_gate_connection: bool = True
    """False when ``env.py`` ignored the connection handed in and made its own."""
    planned: list[str] = dataclasses.field(default_factory=list)
    """Revisions the upgrade set out to apply, in order."""

    @property
    def failed_revision(self) -> str | None:
        """After a failed upgrade: the planned revision that did not complete."""
        if len(self.applied) < len(self.planned):
            return self.planned[len(self.applied)]
        return None


class UpgradeFailedError(Exception):
    """Alembic raised; ``report`` says what was applied before that."""

    def __init__(self, report: UpgradeReport) -> None:
        super().__init__(f"upgrade failed at {report.failed_revision}")
        self.report = report


class Migrations:
    """An Alembic project: its script directory and its heads.

    Loading the script directory imports every revision file, which costs far
    more than a round trip on a large project; it happens once per process.
    """

    def __init__(self, config_path: Path) -> None:
        """Load ``alembic.ini`` and its script directory.

        Raises:
            ConfigurationError: The file or its script location is missing.
        """
        if not config_path.is_file():
            raise ConfigurationError(
                f"alembic config {str(config_path)!r} does not exist (cwd "
                f"{str(Path.cwd())!r}); set INITGATE_ALEMBIC_CONFIG to its path, "
                "or to an empty value for seed steps only"
            )
        self.config_path = config_path
        self._script: ScriptDirectory | None = None
        self._heads: tuple[str, ...] | None = None

    def config(self) -> Config:
        """A fresh Alembic Config; each upgrade gets its own attributes."""
        return Config(str(self.config_path))

    @property
    def script(self) -> ScriptDirectory:
        """The script directory, loaded on first use."""
        if self._script is None:
            try:
                self._script = ScriptDirectory.from_config(self.config())
            except CommandError as exc:
                raise ConfigurationError(
                    f"alembic config {str(self.config_path)!r}: {exc}"
                ) from None
        return self._script

    def heads(self) -> tuple[str, ...]:
        """The code's head revisions, sorted; cached on disk between processes.

        Importing every revision file costs far more than the warm check's
        round trip (about 45 ms for 200 files, 0.5 s without bytecode), so
        the heads are kept in ``__pycache__/initgate-heads.json`` beside the
        revisions, keyed by the name, size and mtime of every revision file.
        A cache that cannot be written (read-only image) is simply skipped.

        Raises:
            ConfigurationError: A revision file does not load.
        """
        if self._heads is None:
            fingerprint, cache = self._fingerprint()
            cached = _read_cache(cache, fingerprint)
            if cached is None:
                cached = self._load_heads()
                _write_cache(cache, fingerprint, cached)
            self._heads = cached
        return self._heads

    def _fingerprint(self) -> tuple[str, Path]:
        digest = hashlib.sha256(str(self.config_path.resolve()).encode())
        configured = self.config().get_version_locations_list()
        locations = [Path(p) for p in configured or [self.script.versions]]
        for location in locations:
            digest.update(b"\0dir\0" + str(location.resolve()).encode())
            files = sorted(location.rglob("*.py")) if location.is_dir() else []
            for path in files:
                if "__pycache__" in path.parts:
                    continue
                stat = path.stat()
                entry = (
                    f"{path.relative_to(location)}:{stat.st_size}:{stat.st_mtime_ns}"
                )
                digest.update(b"\0" + entry.encode())
        cache = (locations[0] if locations else Path(self.script.dir)) / "__pycache__"
        return digest.hexdigest(), cache / "initgate-heads.json"

    def _load_heads(self) -> tuple[str, ...]:
        try:
            return tuple(sorted(self.script.get_heads()))
        except ConfigurationError:
            raise
        except Exception as exc:
            raise ConfigurationError(
                f"alembic revisions under {self.script.dir!r} do not load: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def ancestors(self, revisions: set[str]) -> set[str]:
        """``revisions`` and every revision below them."""
        if not revisions:
            return set()
        return {
            r.revision
            for r in self.script.iterate_revisions(tuple(sorted(revisions)), "base")
        }

    def unknown(self, revisions: list[str]) -> list[str]:
        """The revisions in ``revisions`` that this code has no file for."""
        missing = []
        for revision in revisions:
            try:
                found = self.script.get_revision(revision)
            except CommandError:
                found = None
            if found is None:
                missing.append(revision)
        return missing

    def upgrade(self, connection: Connection) -> UpgradeReport:
        """Run ``upgrade heads`` through ``env.py`` on ``connection``.

        ``connection`` must have no transaction open: Alembic begins and
        commits its own, and ``autocommit_block()`` needs a clean slate.
        The connection goes to ``env.py`` as ``config.attributes["connection"]``.
        """
        config = self.config()
        config.attributes["connection"] = connection
        report = UpgradeReport()
        script = self.script
        last_mark = _now()

        def on_version_apply(*, step: Any, **_: Any) -> None:
            nonlocal last_mark
            finished = _now()
            revision = step.up_revision_id or ",".join(step.up_revision_ids)
            doc = step.up_revision.doc if step.up_revision is not None else None
            report.applied.append(AppliedRevision(revision, doc, last_mark, finished))
            logger.info("applied revision %s (%s)", revision, doc)
            last_mark = finished

        def upgrade_fn(rev: Any, context: Any) -> Any:
            # What alembic.command.upgrade passes for "heads"; kept the same
            # so that env.py sees exactly the usual upgrade.
            steps = script._upgrade_revs("heads", rev)
            report.planned = [step.revision.revision for step in steps]
            return steps

        environment = EnvironmentContext(
            config, script, fn=upgrade_fn, destination_rev="heads"
        )
        configure = environment.configure

        def configure_with_recorder(*args: Any, **kwargs: Any) -> None:
            # Notes which connection env.py used, and adds the step recorder
            # to whatever callbacks env.py passes itself.
            if kwargs.get("connection") is not connection:
                report.on_gate_connection = False
            callbacks = list(kwargs.pop("on_version_apply", ()) or ())
            kwargs["on_version_apply"] = [*callbacks, on_version_apply]
            configure(*args, **kwargs)

        # An attribute on the instance, not a subclass: Alembic publishes
        # the instance's attributes as the alembic.context module that
        # env.py imports, and registers that proxy for EnvironmentContext
        # itself only.
        environment.configure = configure_with_recorder  # type: ignore[method-assign]
        try:
            with environment:
                script.run_env()
        except Exception as exc:
            raise UpgradeFailedError(report) from exc
        return report


def _read_cache(path: Path, fingerprint: str) -> tuple[str, ...] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("fingerprint") != fingerprint:
        return None
    heads = data.get("heads")
    if not isinstance(heads, list) or not all(isinstance(h, str) for h in heads):
        return None
    return tuple(heads)


def _write_cache(path: Path, fingerprint: str, heads: tuple[str, ...]) -> None:
    # Written to a temporary name and renamed: workers starting together
    # never read a half-written file.
    try:
        path.parent.mkdir(exist_ok=True)
        temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        temporary.write_text(json.dumps({"fingerprint": fingerprint, "heads": heads}))
        os.replace(temporary, path)
    except OSError as exc:
        logger.debug("heads cache %s not written: %s", path, exc)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)
