"""Helpers shared by the test suite: SQL, processes, servers, a counting proxy.

The round-trip proxy, the DDL log's SQL and the URL helpers come from
:mod:`harness`, which the bench uses too; they are re-exported here so that
tests find every helper in one place. Nothing here knows about initgate
itself. The fixtures in ``conftest.py`` wrap
these helpers so that tests get cleanup for free; tests may also use them
directly when a fixture's lifetime does not fit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import os
import pwd
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import asyncpg

from harness import ddl_log
from harness.proxy import ProxiedConnection, RoundTripProxy
from harness.urls import Upstream, with_database

__all__ = [
    "MAX_SOCKET_DIR_LENGTH",
    "PG_ROOT_VARIABLE",
    "REPO_ROOT",
    "DatabaseAdmin",
    "DdlEntry",
    "DdlLog",
    "Herd",
    "ProcessResult",
    "ProxiedConnection",
    "RoundTripProxy",
    "SystemPostgres",
    "Upstream",
    "UvicornServer",
    "find_pg_bindir",
    "free_port",
    "live_processes_in_group",
    "short_temp_dir",
    "spawn_python",
    "start_uvicorn",
    "wait_for_http",
    "with_database",
]

REPO_ROOT = Path(__file__).resolve().parent.parent

# Room for "/.s.PGSQL.NNNNN" after a socket directory: sun_path holds 108 bytes
# on Linux including the terminating NUL, so longer directories cannot serve.
MAX_SOCKET_DIR_LENGTH = 107 - len("/.s.PGSQL.65535")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago.

    Another process may take it before the caller binds it; callers that
    start servers retry on "address in use" rather than trusting this.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def short_temp_dir(prefix: str) -> Path:
    """Create a fresh directory directly under /tmp.

    PostgreSQL puts its unix socket in such directories, and pytest's own
    temporary paths are often too long for a socket path.
    """
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# --- SQL against one database ---------------------------------------------


class DatabaseAdmin:
    """Runs SQL against one database, one short connection per call.

    A fresh connection each time keeps the test's own session out of the
    way of the code under test: no open transaction, no held lock, nothing
    left in ``pg_stat_activity`` between calls.
    """

    def __init__(self, url: str) -> None:
        self.url = url

    async def execute(self, sql: str, *args: object) -> str:
        """Run ``sql`` and return the command status (``"CREATE TABLE"``)."""
        conn = await asyncpg.connect(self.url)
        try:
            status: str = await conn.execute(sql, *args)
            return status
        finally:
            await conn.close()

    async def fetch(self, sql: str, *args: object) -> list[asyncpg.Record]:
        """Run ``sql`` and return all rows."""
        conn = await asyncpg.connect(self.url)
        try:
            rows: list[asyncpg.Record] = await conn.fetch(sql, *args)
            return rows
        finally:
            await conn.close()

    async def fetchrow(self, sql: str, *args: object) -> asyncpg.Record | None:
        """Run ``sql`` and return the first row, or None."""
        conn = await asyncpg.connect(self.url)
        try:
            row: asyncpg.Record | None = await conn.fetchrow(sql, *args)
            return row
        finally:
            await conn.close()

    async def fetchval(self, sql: str, *args: object) -> Any:
        """Run ``sql`` and return the first column of the first row."""
        conn = await asyncpg.connect(self.url)
        try:
            return await conn.fetchval(sql, *args)
        finally:
            await conn.close()


# --- DDL log ----------------------------------------------------------------

DDL_LOG_TABLE = "test_ddl_log"


@dataclasses.dataclass(frozen=True)
class DdlEntry:
    """One DDL command as the event trigger saw it."""

    command_tag: str
    object_type: str | None
    object_identity: str | None
    backend_pid: int
    logged_at: datetime.datetime


class DdlLog:
    """Reads what the ``ddl_command_end`` event trigger recorded.

    Object identities are spelled the way PostgreSQL prints them
    (``public.init_runs``); a name without a schema means ``public``.
    """

    def __init__(self, admin: DatabaseAdmin) -> None:
        self.admin = admin

    async def install(self) -> None:
        """Create the log table, its function and the event trigger.

        Raises:
            asyncpg.InsufficientPrivilegeError: the role is not a superuser.
        """
        await self.admin.execute(ddl_log.setup_sql(DDL_LOG_TABLE))

    async def entries(self) -> list[DdlEntry]:
        """Return every logged command, oldest first."""
        rows = await self.admin.fetch(
            "SELECT command_tag, object_type, object_identity, backend_pid,"
            f" logged_at FROM public.{DDL_LOG_TABLE} ORDER BY id"
        )
        return [DdlEntry(**dict(row)) for row in rows]

    async def count(self, command_tag: str, identity: str | None = None) -> int:
        """Count logged commands with this tag, for one object or for any.

        Args:
            command_tag: As PostgreSQL reports it, e.g. ``"CREATE TABLE"``.
            identity: The object, e.g. ``"init_runs"`` or ``"app.items"``;
                None counts the tag for every object.
        """
        if identity is not None and "." not in identity:
            identity = f"public.{identity}"
        count: int = await self.admin.fetchval(
            f"SELECT count(*) FROM public.{DDL_LOG_TABLE}"
            " WHERE command_tag = $1 AND ($2::text IS NULL OR object_identity = $2)",
            command_tag,
            identity,
        )
        return count


# --- Racing Python processes -------------------------------------------------

# Runs in each child: import what the caller wants out of the race, say ready,
# then block until the parent closes the go pipe. Closing (EOF) wakes every
# child at once, which writing bytes to a shared pipe would not guarantee.
_HERD_BOOTSTRAP = """\
import importlib, os, runpy, sys
for _name in filter(None, os.environ["INITGATE_TEST_HERD_PRELOAD"].split(",")):
    importlib.import_module(_name)
_ready = int(os.environ["INITGATE_TEST_HERD_READY_FD"])
os.write(_ready, b"r")
os.close(_ready)
_go = int(os.environ["INITGATE_TEST_HERD_GO_FD"])
while os.read(_go, 1):
    pass
os.close(_go)
_path = os.environ["INITGATE_TEST_HERD_SCRIPT"]
sys.argv = [_path]
runpy.run_path(_path, run_name="__main__")
"""


@dataclasses.dataclass(frozen=True)
class ProcessResult:
    """How one herd process ended.

    Attributes:
        index: The process's ``INITGATE_TEST_HERD_INDEX``.
        returncode: Exit status; negative means killed by that signal.
        stdout: Everything it wrote to standard output.
        stderr: Everything it wrote to standard error.
        timed_out: It was still running at the deadline and was killed.
    """

    index: int
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool

    def describe(self) -> str:
        """Return a report for an assertion message."""
        state = "timed out" if self.timed_out else f"exit {self.returncode}"
        return (
            f"--- process {self.index}: {state}\n"
            f"stdout:\n{self.stdout}\nstderr:\n{self.stderr}"
        )


def passed_reports(results: Sequence[ProcessResult]) -> list[dict[str, Any]]:
    """The JSON object each process printed last, once every one exited 0.

    Fails the test, showing each process that did not, otherwise.
    """
    failed = [r.describe() for r in results if r.returncode != 0]
    assert not failed, "\n".join(failed)
    return [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]


def run_python(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``python *args`` from the repository root; its output, as text.

    Args:
        env: The whole environment of the process; default this one's.
    """
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO_ROOT,
        env=None if env is None else dict(env),
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


class Herd:
    """N Python processes waiting at one gate; made by :func:`spawn_python`."""

    def __init__(
        self, processes: list[subprocess.Popen[bytes]], go_fd: int, workdir: Path
    ) -> None:
        self.processes = processes
        self.workdir = workdir
        self.released_at: float | None = None
        self._go_fd: int | None = go_fd

    def __enter__(self) -> Herd:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.kill()

    def release(self) -> None:
        """Let every process run its code, all at the same instant."""
        if self._go_fd is None:
            raise RuntimeError("Herd.release() called twice")
        self.released_at = time.time()
        os.close(self._go_fd)
        self._go_fd = None

    def wait_all(self, timeout: float) -> list[ProcessResult]:
        """Wait for every process, killing those still running at the deadline.

        Args:
            timeout: Seconds from now for all of them together.

        Returns:
            One result per process, in index order.

        Raises:
            RuntimeError: :meth:`release` was not called, so none would end.
        """
        if self.released_at is None:
            raise RuntimeError("Herd.wait_all() before release(): nothing can end")
        deadline = time.monotonic() + timeout
        timed_out: set[int] = set()
        for index, process in enumerate(self.processes):
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out.add(index)
                _kill_group(process)
        return [
            ProcessResult(
                index=index,
                returncode=process.returncode,
                stdout=self._output(index, "out"),
                stderr=self._output(index, "err"),
                timed_out=index in timed_out,
            )
            for index, process in enumerate(self.processes)
        ]

    def kill(self) -> None:
        """Kill whatever is still running (and its children); idempotent."""
        if self._go_fd is not None:
            os.close(self._go_fd)
            self._go_fd = None
        for process in self.processes:
            if process.poll() is None:
                _kill_group(process)

    def _output(self, index: int, stream: str) -> str:
        return (self.workdir / f"herd-{index}.{stream}").read_text(errors="replace")


def spawn_python(
    code_or_path: str | Path,
    *,
    n: int,
    workdir: Path,
    env: Mapping[str, str] | None = None,
    preload: Sequence[str] = (),
    ready_timeout: float = 60.0,
) -> Herd:
    """Start ``n`` Python processes that wait to be released together.

    Each runs ``sys.executable`` from the repository root with the root on
    ``PYTHONPATH``, imports the modules in ``preload`` (so that import time
    stays out of the race), signals that it is ready and blocks. This
    function returns once all are ready; :meth:`Herd.release` then lets them
    run the script at the same instant. Each child sees its number in
    ``INITGATE_TEST_HERD_INDEX``. Output goes to ``herd-<i>.out`` and
    ``herd-<i>.err`` in ``workdir``.

    Args:
        code_or_path: Python source (``str``) or a script to run (``Path``).
        n: How many processes.
        workdir: Directory for the script copy and the output files.
        env: Variables added to this process's environment.
        preload: Modules to import before signalling ready.
        ready_timeout: Seconds to wait for all of them to be ready.

    Raises:
        RuntimeError: A process died or was too slow before becoming ready;
            all of them have been killed, and the message has its stderr.
    """
    if isinstance(code_or_path, Path):
        script = code_or_path.resolve()
    else:
        script = workdir / "herd_script.py"
        script.write_text(code_or_path)

    go_read, go_write = os.pipe()
    ready_read, ready_write = os.pipe()
    base_env = _child_env(env)
    base_env.update(
        INITGATE_TEST_HERD_PRELOAD=",".join(preload),
        INITGATE_TEST_HERD_READY_FD=str(ready_write),
        INITGATE_TEST_HERD_GO_FD=str(go_read),
        INITGATE_TEST_HERD_SCRIPT=str(script),
    )
    processes: list[subprocess.Popen[bytes]] = []
    herd = Herd(processes, go_write, workdir)
    try:
        for index in range(n):
            with (
                open(workdir / f"herd-{index}.out", "wb") as out,
                open(workdir / f"herd-{index}.err", "wb") as err,
            ):
                processes.append(
                    subprocess.Popen(
                        [sys.executable, "-c", _HERD_BOOTSTRAP],
                        cwd=REPO_ROOT,
                        env={**base_env, "INITGATE_TEST_HERD_INDEX": str(index)},
                        stdin=subprocess.DEVNULL,
                        stdout=out,
                        stderr=err,
                        pass_fds=(go_read, ready_write),
                        start_new_session=True,
                    )
                )
    except BaseException:
        herd.kill()
        raise
    finally:
        # Only the children hold these ends now: the ready pipe reaches EOF
        # when the last child has closed its copy or died.
        os.close(go_read)
        os.close(ready_write)

    try:
        _await_ready(ready_read, herd, ready_timeout)
    except BaseException:
        herd.kill()
        raise
    finally:
        os.close(ready_read)
    return herd


def _await_ready(fd: int, herd: Herd, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    ready = 0
    died = False
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while ready < len(herd.processes) and time.monotonic() < deadline:
            # Short selects, so that one child dying is noticed at once even
            # while the others keep the pipe open.
            if selector.select(0.1):
                chunk = os.read(fd, 64)
                ready += len(chunk)
                if not chunk:
                    break  # Every child has closed its end.
            if any(p.poll() is not None for p in herd.processes):
                died = True
                break
    if ready < len(herd.processes) or died:
        herd.kill()
        for process in herd.processes:
            process.wait(timeout=10)
        errors = "\n".join(
            f"process {i}: {herd._output(i, 'err')[-2000:]}"
            for i in range(len(herd.processes))
        )
        raise RuntimeError(
            f"only {ready} of {len(herd.processes)} herd processes got ready"
            f" within {timeout} s; their stderr:\n{errors}"
        )


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")])
    )
    env.setdefault("PYTHONUNBUFFERED", "1")
    env.update(extra or {})
    return env


def _kill_group(process: subprocess.Popen[bytes], grace: float = 0.0) -> None:
    """SIGTERM the process group, then SIGKILL it after ``grace`` seconds."""
    if grace > 0:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    # SIGKILL the group even after a clean exit of the leader: children it
    # forked (uvicorn workers, say) may still be alive in the group.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def live_processes_in_group(pgid: int) -> list[int]:
    """Return the pids in process group ``pgid`` that are not zombies.

    Zombies are left out because they are already dead: an orphan in this
    group is reaped by whatever init the machine has, possibly late.
    Reads ``/proc``, so it works on Linux only.
    """
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # Gone between listing and reading.
        # The command name is in parentheses and may contain spaces, so the
        # fields are counted from the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry.name))
    return pids


# --- uvicorn -----------------------------------------------------------------


class UvicornServer:
    """A uvicorn process group started by :func:`start_uvicorn`."""

    def __init__(
        self, process: subprocess.Popen[bytes], port: int, log_path: Path
    ) -> None:
        self.process = process
        self.port = port
        self.log_path = log_path

    def __enter__(self) -> UvicornServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def url(self, path: str = "/") -> str:
        """Return ``http://127.0.0.1:<port><path>``."""
        return f"http://127.0.0.1:{self.port}{path}"

    def log(self) -> str:
        """Return everything uvicorn and the app wrote so far (stdout+stderr)."""
        return self.log_path.read_text(errors="replace")

    def wait_until_ok(self, path: str = "/", timeout: float = 60.0) -> bytes:
        """Poll ``path`` until it answers 200; return the body.

        Raises:
            AssertionError: Timeout, or uvicorn exited; the message has the log.
        """
        return wait_for_http(self.url(path), timeout=timeout, server=self)

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the group, SIGKILL it after ``grace`` s; return the exit code.

        Idempotent. The exit code is the master's, or None if it was never
        started.
        """
        _kill_group(self.process, grace=grace)
        return self.process.returncode


def start_uvicorn(
    *,
    workers: int,
    log_dir: Path,
    port: int | None = None,
    env: Mapping[str, str] | None = None,
    app: str = "app.main:app",
    extra_args: Sequence[str] = (),
) -> UvicornServer:
    """Start ``uvicorn <app> --workers N`` from the repository root.

    It runs in its own process group (so stopping it also stops the
    workers), with this environment plus ``env``, and writes its output to
    ``<log_dir>/uvicorn-<port>.log``. Returns at once: use
    :meth:`UvicornServer.wait_until_ok` to wait for it to serve.
    """
    port = port or free_port()
    log_path = log_dir / f"uvicorn-{port}.log"
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        app,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        str(workers),
        *extra_args,
    ]
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command,
            cwd=REPO_ROOT,
            env=_child_env(env),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return UvicornServer(process, port, log_path)


def wait_for_http(
    url: str, *, timeout: float = 60.0, server: UvicornServer | None = None
) -> bytes:
    """Poll ``url`` until it answers 200 and return the body.

    Args:
        url: What to GET.
        timeout: Seconds to keep trying.
        server: If given, stop early when its process has exited, and put
            its log in the failure message.

    Raises:
        AssertionError: No 200 in time, or the server exited first.
    """
    # An empty ProxyHandler: a proxy from the environment must not be asked
    # for a loopback address.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    deadline = time.monotonic() + timeout
    last = "no attempt"
    while time.monotonic() < deadline:
        if server is not None and server.process.poll() is not None:
            last = f"uvicorn exited with {server.process.returncode}"
            break
        try:
            with opener.open(url, timeout=5) as response:
                body: bytes = response.read()
                if response.status == 200:
                    return body
                last = f"HTTP {response.status}"
        except urllib.error.HTTPError as error:
            last = f"HTTP {error.code}: {error.read()[:500]!r}"
        except (OSError, urllib.error.URLError) as error:
            last = repr(error)
        time.sleep(0.1)
    log = f"\n--- uvicorn log:\n{server.log()[-5000:]}" if server is not None else ""
    raise AssertionError(f"GET {url}: no 200 within {timeout} s ({last}){log}")


# --- PostgreSQL from the machine's binaries ---------------------------------


PG_ROOT_VARIABLE = "INITGATE_TEST_PG_ROOT"
"""A directory of ``<major>/bin`` server builds, as ``.ci/fetch-postgres`` makes."""


def find_pg_bindir(major: str) -> Path | None:
    """Find the server binaries of PostgreSQL ``major`` on this machine.

    Looks at ``$INITGATE_TEST_PG_ROOT/<major>/bin`` when that variable is set,
    then at Debian's ``/usr/lib/postgresql/<major>/bin``, then at what
    ``pg_config --bindir`` reports if ``pg_config --version`` is that major.
    """
    root = os.environ.get(PG_ROOT_VARIABLE)
    if root and (Path(root) / major / "bin" / "initdb").exists():
        return Path(root) / major / "bin"
    debian = Path(f"/usr/lib/postgresql/{major}/bin")
    if (debian / "initdb").exists():
        return debian
    pg_config = shutil.which("pg_config")
    if pg_config is None:
        return None
    version = subprocess.run(
        [pg_config, "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    if len(version) < 2 or version[1].split(".")[0] != major:
        return None
    bindir = subprocess.run(
        [pg_config, "--bindir"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return Path(bindir) if (Path(bindir) / "initdb").exists() else None


class SystemPostgres:
    """A throwaway PostgreSQL server built from the machine's own binaries.

    It listens on 127.0.0.1 only, on a free TCP port, with trust auth and no
    unix socket. As root, ``initdb`` and the server run as the system user
    ``postgres``, because ``initdb`` refuses to run as root.

    Example::

        server = SystemPostgres(find_pg_bindir("15"))
        server.start()
        try:
            ...  # server.admin_url
        finally:
            server.stop()
    """

    def __init__(self, bindir: Path, base_dir: Path | None = None) -> None:
        self.bindir = bindir
        self.base_dir = base_dir or short_temp_dir("igpg")
        self.data_dir = self.base_dir / "data"
        self.log_path = self.base_dir / "server.log"
        self.port: int | None = None
        self._owner = _server_owner()

    @property
    def admin_url(self) -> str:
        """The superuser's URL for the ``postgres`` database."""
        if self.port is None:
            raise RuntimeError("SystemPostgres.admin_url before start()")
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def start(self, attempts: int = 3) -> None:
        """Run initdb and start the server; returns when it accepts connections.

        Raises:
            RuntimeError: The server did not start; the message has its log.
        """
        if self._owner is not None:
            os.chown(self.base_dir, self._owner.pw_uid, self._owner.pw_gid)
        self._run(
            "initdb",
            "-D",
            str(self.data_dir),
            "--auth=trust",
            "--username=postgres",
            "--encoding=UTF8",
            "--locale=C",
            "--no-sync",
        )
        for _ in range(attempts):
            port = free_port()
            self._configure(port)
            try:
                self._run(
                    "pg_ctl",
                    "start",
                    "-D",
                    str(self.data_dir),
                    "-l",
                    str(self.log_path),
                    "-w",
                    "-t",
                    "60",
                )
            except RuntimeError:
                # The usual cause is losing the port to another process.
                continue
            self.port = port
            return
        raise RuntimeError(
            f"PostgreSQL from {self.bindir} did not start after {attempts} tries;"
            f" its log:\n{self._log_tail()}"
        )

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its directory."""
        if self.port is not None:
            with contextlib.suppress(RuntimeError):
                self._run(
                    "pg_ctl", "stop", "-D", str(self.data_dir), "-m", "fast", "-w"
                )
            self.port = None
        shutil.rmtree(self.base_dir, ignore_errors=True)

    def _configure(self, port: int) -> None:
        # postgresql.conf takes the last value of a setting, so appending
        # again on a retry replaces the port chosen before.
        with open(self.data_dir / "postgresql.conf", "a") as conf:
            conf.write(
                "\nlisten_addresses = '127.0.0.1'\n"
                f"port = {port}\n"
                "unix_socket_directories = ''\n"
            )

    def _run(self, program: str, *args: str) -> None:
        owner = self._owner
        result = subprocess.run(
            [str(self.bindir / program), *args],
            cwd=self.base_dir,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            user=owner.pw_uid if owner else None,
            group=owner.pw_gid if owner else None,
            extra_groups=[] if owner else None,
            timeout=120,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"{program} failed with {result.returncode}:\n{result.stdout}"
                f"{result.stderr}\n{self._log_tail()}"
            )

    def _log_tail(self) -> str:
        if not self.log_path.exists():
            return "(no server log)"
        return self.log_path.read_text(errors="replace")[-3000:]


def _server_owner() -> pwd.struct_passwd | None:
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError(
            "running as root, but there is no system user 'postgres' to run"
            " initdb as; install the PostgreSQL server package or create it"
        ) from None
