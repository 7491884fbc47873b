"""Alembic: the code's head revisions, and an upgrade on a given connection."""

from __future__ import annotations

import ast
import dataclasses
import datetime as dt
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from alembic.runtime.environment import EnvironmentContext
from alembic.script import ScriptDirectory
from alembic.util import CommandError
from sqlalchemy import Connection

from initgate.errors import ConfigurationError

__all__ = [
    "AppliedRevision",
    "ChangedRevision",
    "Migrations",
    "PendingRevision",
    "UpgradeFailedError",
    "UpgradeReport",
    "file_checksum",
]

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AppliedRevision:
    """One revision Alembic applied, with when it ran."""

    revision: str
    doc: str | None
    started_at: dt.datetime
    finished_at: dt.datetime
    checksum: str | None = None
    """sha256 of the revision file as it was when applied."""


@dataclasses.dataclass(frozen=True)
class ChangedRevision:
    """A revision whose file differs from the one that was applied."""

    revision: str
    path: str
    recorded: str
    """sha256 recorded when the revision was applied."""
    current: str | None
    """sha256 of the file now; None when it cannot be read."""


@dataclasses.dataclass(frozen=True)
class PendingRevision:
    """A revision the code has and the database has not applied yet."""

    revision: str
    doc: str | None
    path: str


def file_checksum(path: str | Path | None) -> str | None:
    """sha256 (hex) of a revision file's bytes; None when it cannot be read."""
    if path is None:
        return None
    try:
        return hashlib.sha256(Path(path).read_bytes()).hexdigest()
    except OSError:
        return None


@dataclasses.dataclass
class UpgradeReport:
    """What one ``upgrade heads`` did."""

    applied: list[AppliedRevision] = dataclasses.field(default_factory=list)
    """Revisions in the order they were applied (committed or not)."""
    on_gate_connection: bool = True
    """False when ``env.py`` ignored the connection handed in and made its own."""
    recorded: set[str] = dataclasses.field(default_factory=set)
    """Revisions whose step row ``on_applied`` wrote in their own transaction."""
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
        self._read_only_config: Config | None = None

    def config(self) -> Config:
        """A fresh Alembic Config; each upgrade gets its own attributes."""
        return Config(str(self.config_path))

    @property
    def script(self) -> ScriptDirectory:
        """The script directory, loaded on first use."""
        if self._script is None:
            try:
                self._script = ScriptDirectory.from_config(self._config_to_read())
            except CommandError as exc:
                raise ConfigurationError(
                    f"alembic config {str(self.config_path)!r}: {exc}"
                ) from None
        return self._script

    def _config_to_read(self) -> Config:
        # One parse of alembic.ini for the script directory and the heads;
        # an upgrade gets a fresh Config of its own (it sets attributes).
        if self._read_only_config is None:
            self._read_only_config = self.config()
        return self._read_only_config

    def heads(self) -> tuple[str, ...]:
        """The code's head revisions, sorted; cached on disk between processes.

        Importing every revision file costs far more than the warm check's
        round trip (about 45 ms for 200 files, 0.5 s without bytecode), so
        the heads are kept in ``__pycache__/initgate-heads.json`` beside the
        revisions, keyed by the name, size and mtime of every revision file.
        A cache that cannot be written (read-only image) is simply skipped.
        Without a cache they are read from the files' source, which imports
        nothing; only a file that does not assign its ids as plain literals
        makes the gate import the revisions, as Alembic does.

        Raises:
            ConfigurationError: A revision file does not load.
        """
        if self._heads is None:
            fingerprint, cache = self._fingerprint()
            cached = _read_cache(cache, fingerprint)
            if cached is None:
                cached = self._heads_from_source()
                if cached is None:
                    cached = self._load_heads()
                _write_cache(cache, fingerprint, cached)
            self._heads = cached
        return self._heads

    def _version_locations(self) -> list[Path]:
        configured = self._config_to_read().get_version_locations_list()
        return [Path(p) for p in configured or [self.script.versions]]

    def _fingerprint(self) -> tuple[str, Path]:
        digest = hashlib.sha256(str(self.config_path.resolve()).encode())
        locations = self._version_locations()
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

    def _heads_from_source(self) -> tuple[str, ...] | None:
        """The heads as Alembic finds them, from the files' text, importing none.

        A head is a revision that no other names as its ``down_revision``
        (``depends_on`` does not count, as in Alembic). Returns None, for the
        caller to import the revisions instead, when a file does not assign
        ``revision`` and ``down_revision`` plain literals at its top level,
        when two files claim one id, or in Alembic's sourceless mode.
        """
        script = self.script
        if getattr(script, "sourceless", False):
            return None
        recursive = getattr(script, "recursive_version_locations", False)
        revisions: set[str] = set()
        down: set[str] = set()
        for location in self._version_locations():
            if not location.is_dir():
                continue
            files = location.rglob("*.py") if recursive else location.glob("*.py")
            for path in sorted(files):
                if "__pycache__" in path.parts or not _REVISION_FILE.match(path.name):
                    continue
                ids = _literal_ids(path)
                if ids is None or ids[0] in revisions:
                    return None
                revisions.add(ids[0])
                down.update(ids[1])
        return tuple(sorted(revisions - down))

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

    def pending(self, current: list[str]) -> list[PendingRevision]:
        """The revisions ``upgrade heads`` would apply to ``current``, in order.

        Raises:
            ConfigurationError: ``current`` names a revision the code lacks,
                or the revisions do not load.
        """
        try:
            # The same plan alembic.command.upgrade makes for "heads".
            heads_now: Any = tuple(current)
            steps = self.script._upgrade_revs("heads", heads_now)
        except CommandError as exc:
            raise ConfigurationError(
                f"alembic revisions under {self.script.dir!r}: {exc}"
            ) from None
        return [
            PendingRevision(
                step.revision.revision, step.revision.doc, step.revision.path
            )
            for step in steps
        ]

    def revision_path(self, revision: str) -> str | None:
        """The file of ``revision``; None when the code has no such revision."""
        try:
            found = self.script.get_revision(revision)
        except CommandError:
            return None
        return found.path if found is not None else None

    def changed_since_applied(
        self, recorded: Mapping[str, str]
    ) -> list[ChangedRevision]:
        """The revisions whose file's sha256 is no longer the one recorded.

        Args:
            recorded: Checksum by revision id, as the ledger has them.
                Revisions the code has no file for are left out: that is
                a database ahead of the code, reported elsewhere.
        """
        changed = []
        for revision, checksum in sorted(recorded.items()):
            path = self.revision_path(revision)
            if path is None:
                continue
            current = file_checksum(path)
            if current != checksum:
                changed.append(ChangedRevision(revision, path, checksum, current))
        return changed

    def offline_sql(self, current: list[str]) -> str:
        """The SQL ``upgrade heads`` would run from ``current``, unexecuted.

        Alembic's offline mode (``alembic upgrade --sql``), through env.py,
        which must support it (``context.is_offline_mode()``).

        Raises:
            ConfigurationError: Several current heads (offline mode starts
                from one revision), or env.py failed in offline mode.
        """
        if len(current) > 1:
            raise ConfigurationError(
                f"the database is at {len(current)} heads ({', '.join(current)}); "
                "Alembic's offline mode starts from one revision"
            )
        buffer = io.StringIO()
        config = Config(str(self.config_path), output_buffer=buffer, stdout=buffer)
        # Alembic's cookbook flag for env.py run from code: keep the
        # caller's logging (fileConfig would print INFO lines on stderr).
        config.attributes["configure_logger"] = False
        destination = f"{current[0]}:heads" if current else "heads"
        try:
            command.upgrade(config, destination, sql=True)
        except Exception as exc:
            raise ConfigurationError(
                f"alembic offline mode (upgrade {destination} --sql) failed in "
                f"the env.py of {str(self.config_path)!r}: {type(exc).__name__}: "
                f"{exc}; initgate plan needs an env.py that supports "
                "context.is_offline_mode()"
            ) from None
        return buffer.getvalue()

    def upgrade(
        self,
        connection: Connection,
        on_applied: Callable[[Connection, AppliedRevision], None] | None = None,
    ) -> UpgradeReport:
        """Run ``upgrade heads`` through ``env.py`` on ``connection``.

        ``connection`` must have no transaction open: Alembic begins and
        commits its own, and ``autocommit_block()`` needs a clean slate.
        The connection goes to ``env.py`` as ``config.attributes["connection"]``.

        Args:
            connection: The gate's connection.
            on_applied: Called after each revision, inside that revision's
                transaction, when env.py migrates on ``connection``; what it
                writes commits or rolls back with the revision itself.
        """
        config = self.config()
        config.attributes["connection"] = connection
        report = UpgradeReport()
        script = self.script
        last_mark = _now()

        def on_version_apply(*, ctx: Any, step: Any, **_: Any) -> None:
            nonlocal last_mark
            finished = _now()
            revision = step.up_revision_id or ",".join(step.up_revision_ids)
            script_file = step.up_revision
            doc = script_file.doc if script_file is not None else None
            checksum = file_checksum(script_file.path if script_file else None)
            applied = AppliedRevision(revision, doc, last_mark, finished, checksum)
            report.applied.append(applied)
            if on_applied is not None and ctx.connection is connection:
                on_applied(connection, applied)
                report.recorded.add(revision)
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


# The files Alembic takes for revisions (not __init__, not editor locks).
_REVISION_FILE = re.compile(r"(?!\.\#|__init__)(.*\.py)$")

_UNSET = object()


def _literal_ids(path: Path) -> tuple[str, tuple[str, ...]] | None:
    """``revision`` and ``down_revision`` of a revision file, read with ast.

    None when the file does not parse or does not assign both as literals
    at its top level (a string; None, a string or a tuple of strings).
    """
    try:
        tree = ast.parse(path.read_bytes(), filename=str(path))
    except (OSError, SyntaxError, ValueError):
        return None
    values: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in (
            "revision",
            "down_revision",
        ):
            try:
                values[target.id] = ast.literal_eval(value)
            except (ValueError, TypeError, SyntaxError, RecursionError):
                return None  # Not a literal: only importing tells.
    revision = values.get("revision")
    down = values.get("down_revision", _UNSET)
    if not isinstance(revision, str) or down is _UNSET:
        return None
    if down is None:
        return revision, ()
    if isinstance(down, str):
        return revision, (down,)
    if isinstance(down, tuple | list) and all(isinstance(d, str) for d in down):
        return revision, tuple(down)
    return None


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
