"""The ``initgate`` command: pass the gate once, read its history, try the demo.

::

    initgate run      pass the gate outside the app (init container, pre-start)
    initgate history  the runs recorded in init_runs, as a table or JSON
    initgate demo     PostgreSQL + the demo service with N workers, one init

Exit codes, the same for every command:

====  ==================================================================
0     done: init ran here, was already up to date, or another worker ran it
1     init failed (a step raised, or it failed too often for this code and
      was not tried again); the demo failed; an unexpected error
2     bad configuration or usage: settings, alembic.ini, --app, the URL,
      credentials, an unknown option
3     gave up waiting for another worker that holds the init lock
4     the database did not accept a connection in time
5     the database is at a revision this code does not know
130   interrupted (Ctrl-C)
====  ==================================================================

Errors are one line on stderr, without a traceback, and never show a
password. Everything here is printed through :data:`out` and :data:`err`;
the library itself only logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import enum
import importlib
import json
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import asyncpg
import sqlalchemy
import typer
from rich.console import Console, JustifyMethod
from rich.table import Table
from rich.text import Text

from initgate import demo as demo_service
from initgate import ledger
from initgate.errors import (
    ConfigurationError,
    DatabaseAheadError,
    DatabaseUnavailableError,
    InitGateError,
    UnsupportedConnectionError,
    WaitTimeoutError,
)
from initgate.gate import GateResult, Outcome
from initgate.ledger import RunStatus, StepKind
from initgate.lifespan import InitGate
from initgate.settings import Settings

__all__ = ["ExitCode", "cli", "main"]


class ExitCode(enum.IntEnum):
    """What the process's exit status tells a script or an orchestrator."""

    OK = 0
    """Init is done: ran here, was up to date, or another worker ran it."""
    INIT_FAILED = 1
    """A step failed, init failed too often to retry, or the demo failed."""
    BAD_CONFIGURATION = 2
    """Settings, alembic.ini, --app, credentials or command-line usage."""
    WAIT_TIMEOUT = 3
    """Another worker held the init lock for longer than the wait timeout."""
    DATABASE_UNAVAILABLE = 4
    """No connection to the database before the connect timeout."""
    DATABASE_AHEAD = 5
    """The database has revisions that this code does not know."""
    INTERRUPTED = 130
    """Ctrl-C (SIGINT), by the shell's convention of 128 + the signal."""


_EXIT_CODES_HELP = """
Exit codes: **0** done or up to date; **1** init failed (or failed too often
to be retried); **2** bad configuration or usage; **3** timed out waiting for
the init lock; **4** database unreachable; **5** database ahead of the code;
**130** interrupted.
"""

out = Console(highlight=False)
"""Results (tables, JSON, result lines) and the demo's progress."""
err = Console(stderr=True, highlight=False)
"""Error lines only, so that a script can tell them from results."""

cli = typer.Typer(
    name="initgate",
    help="Run migrations and seed steps exactly once across every worker.",
    epilog=_EXIT_CODES_HELP,
    rich_markup_mode="markdown",
    add_completion=False,
    # Errors are one line, printed by main(); never a traceback.
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


# -- entry point --------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Run the command line; the console script ``initgate`` calls this."""
    try:
        code = cli(args=argv, prog_name="initgate", standalone_mode=False)
    except typer.TyperException as exc:
        # Usage errors (unknown option, bad value): one line instead of
        # click's usage block; the command's --help has the rest.
        context = getattr(exc, "ctx", None)
        where = context.command_path if context is not None else "initgate"
        _print_error(f"{exc.format_message()} (see `{where} --help`)")
        sys.exit(getattr(exc, "exit_code", ExitCode.BAD_CONFIGURATION))
    except typer.Abort:
        _print_error("aborted")
        sys.exit(ExitCode.INTERRUPTED)
    except KeyboardInterrupt:
        _print_error("interrupted")
        sys.exit(ExitCode.INTERRUPTED)
    except Exception as exc:
        _print_error(f"unexpected error: {type(exc).__name__}: {exc}")
        sys.exit(ExitCode.INIT_FAILED)
    sys.exit(code if isinstance(code, int) else ExitCode.OK)


@cli.callback(invoke_without_command=True)
def _root(ctx: typer.Context) -> None:
    """Run migrations and seed steps exactly once across every worker."""
    if ctx.invoked_subcommand is None:
        # Rich prints the help itself and returns an empty string.
        text = ctx.get_help()
        if text:
            typer.echo(text)
        raise typer.Exit(ExitCode.OK)


def exit_code_for(exc: BaseException) -> ExitCode:
    """The exit code that reports ``exc``."""
    if isinstance(exc, DatabaseAheadError):
        return ExitCode.DATABASE_AHEAD
    if isinstance(exc, WaitTimeoutError):
        return ExitCode.WAIT_TIMEOUT
    if isinstance(exc, DatabaseUnavailableError):
        return ExitCode.DATABASE_UNAVAILABLE
    if isinstance(exc, ConfigurationError | UnsupportedConnectionError):
        return ExitCode.BAD_CONFIGURATION
    # InitFailedError (FailFastError too), DemoError, anything unexpected.
    return ExitCode.INIT_FAILED


def _fail(exc: BaseException) -> NoReturn:
    """Print ``exc`` as one error line and exit with the code that reports it."""
    _print_error(str(exc))
    raise typer.Exit(exit_code_for(exc))


def _print_error(message: str) -> None:
    err.print(
        f"initgate: {_one_line(_scrub(message))}",
        style="red",
        markup=False,
        soft_wrap=True,
    )


# A password between "scheme://user:" and "@", in any URL in any text.
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]*:)[^@\s]+@", re.I)


_given_urls: list[str] = []
"""Database URLs given on the command line, whose passwords _scrub masks."""


def _scrub(text: str) -> str:
    """Mask passwords: in URLs, and those of the database URLs configured."""
    text = _URL_PASSWORD.sub(r"\1***@", text)
    urls = [os.environ.get("INITGATE_DATABASE_URL"), os.environ.get("DATABASE_URL")]
    for raw in filter(None, [*urls, *_given_urls]):
        try:
            password = sqlalchemy.make_url(raw).password
        except Exception:
            # An unparsable URL has no password to look for; the pattern
            # above still masks whatever looks like one.
            continue
        if password:
            text = text.replace(str(password), "***")
    return text


def _one_line(text: str) -> str:
    return " ".join(text.split())


# -- initgate run -------------------------------------------------------------

AppOption = Annotated[
    str,
    typer.Option(
        "--app",
        envvar="INITGATE_APP",
        metavar="MODULE:ATTR",
        help="The InitGate object to import, which registers its seed steps.",
    ),
]
VerboseOption = Annotated[
    bool,
    typer.Option("--verbose", "-v", help="Show the gate's INFO log lines on stderr."),
]


@cli.command(epilog=_EXIT_CODES_HELP)
def run(app: AppOption = "app.main:gate", verbose: VerboseOption = False) -> None:
    """Pass the gate once, outside the app: for init containers or pre-start.

    Imports the app's `InitGate` (so its seed steps are registered) from the
    working directory, then migrates and seeds if the database needs it,
    waiting while another process does. Settings come from the environment,
    as in the app (`DATABASE_URL`, `INITGATE_*`). Prints one result line.
    """
    _show_library_logs(verbose)
    try:
        gate = _load_gate(app)
        result = asyncio.run(gate.run())
    except InitGateError as exc:
        _fail(exc)
    out.print(_describe_result(result, gate), markup=False, soft_wrap=True)


def _load_gate(spec: str) -> InitGate:
    """Import ``module:attribute`` and check that it is an InitGate.

    Raises:
        ConfigurationError: It cannot be imported or is something else;
            also whatever ConfigurationError the import itself raises.
    """
    module_name, _, attribute = spec.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(
            f"--app: expected MODULE:ATTRIBUTE such as app.main:gate, got {spec!r}"
        )
    # Like uvicorn's --app-dir: the console script does not put the working
    # directory on sys.path, and the app lives there.
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        target: Any = importlib.import_module(module_name)
    except InitGateError:
        raise
    except ModuleNotFoundError as exc:
        if exc.name and (module_name + ".").startswith(exc.name + "."):
            raise ConfigurationError(
                f"--app {spec}: there is no module {exc.name!r} in {cwd} or on "
                "sys.path; run from the project's directory, or set --app / "
                "INITGATE_APP"
            ) from None
        raise ConfigurationError(
            f"--app {spec}: importing {module_name} failed: {exc}"
        ) from None
    except Exception as exc:
        raise ConfigurationError(
            f"--app {spec}: importing {module_name} failed: {type(exc).__name__}: {exc}"
        ) from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigurationError(
                f"--app {spec}: {module_name} has no attribute {attribute!r}"
            )
        target = getattr(target, part)
    if not isinstance(target, InitGate):
        raise ConfigurationError(
            f"--app {spec}: expected an initgate.InitGate, got {type(target).__name__}"
        )
    return target


def _describe_result(result: GateResult, gate: InitGate) -> str:
    namespace = gate.settings.effective_namespace
    elapsed = _duration(result.elapsed_ms)
    if result.outcome is Outcome.RAN:
        return (
            f"ran in {elapsed}: run {result.run_id} applied "
            f"{_plural(len(result.migrated), 'revision')} and "
            f"{_plural(len(result.seeded), 'seed step')} to {namespace!r}"
        )
    if result.outcome is Outcome.WAITED:
        return (
            f"waited in {elapsed}: another worker ran init of {namespace!r} "
            f"while this one waited {_duration(result.waited_ms)}"
        )
    if result.outcome is Outcome.DATABASE_AHEAD:
        return (
            f"database_ahead in {elapsed}: the database is at revisions this "
            "code does not know; passed without init, as "
            "INITGATE_ALLOW_UNKNOWN_REVISIONS allows"
        )
    return f"up_to_date in {elapsed}: init of {namespace!r} was already done"


def _show_library_logs(verbose: bool) -> None:
    """Send the gate's and Alembic's log lines to stderr.

    By default only warnings (a long wait, a takeover): an error reaches the
    user once, as the command's own error line. ``verbose`` shows it all.
    """
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    if not verbose:
        handler.addFilter(lambda record: record.levelno < logging.ERROR)
    for name in ("initgate", "alembic"):
        logger = logging.getLogger(name)
        logger.addHandler(handler)
        logger.setLevel(logging.INFO if verbose else logging.WARNING)
        logger.propagate = False


# -- initgate history ---------------------------------------------------------

DatabaseUrlOption = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        metavar="URL",
        help="postgresql:// URL; default DATABASE_URL or INITGATE_DATABASE_URL.",
        show_default=False,
    ),
]


@cli.command(epilog=_EXIT_CODES_HELP)
def history(
    limit: Annotated[
        int, typer.Option(min=1, help="Show at most this many runs, newest first.")
    ] = 20,
    status: Annotated[
        list[RunStatus] | None,
        typer.Option(help="Only runs with this status; repeat for several."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON array, runs with steps.")
    ] = False,
    database_url: DatabaseUrlOption = None,
    namespace: Annotated[
        str | None,
        typer.Option(
            help="Init namespace; default INITGATE_NAMESPACE or DATABASE:SCHEMA."
        ),
    ] = None,
    schema: Annotated[
        str | None,
        typer.Option(help="Schema of init_runs; default INITGATE_SCHEMA or public."),
    ] = None,
) -> None:
    """Show the runs recorded in `init_runs`: who ran init, when, what it did.

    Reads the same settings as the gate. As a table on a terminal, as plain
    columns otherwise, or as JSON with `--json` (datetimes in ISO 8601).
    """
    if database_url:
        _given_urls.append(database_url)
    overrides = {
        "database_url": database_url,
        "namespace": namespace,
        # By its variable's name, so that a bad value is reported under it.
        "INITGATE_SCHEMA": schema,
    }
    try:
        settings = Settings.from_env(
            alembic_config=None,
            **{key: value for key, value in overrides.items() if value is not None},
        )
        found = asyncio.run(
            read_history(settings, limit=limit, statuses=tuple(status or ()))
        )
    except InitGateError as exc:
        _fail(exc)
    if as_json:
        typer.echo(json.dumps(found.runs, default=_json_value, indent=2))
    elif not found.has_ledger:
        out.print(
            f"No init history in {settings.masked_url} yet: schema "
            f"{settings.ledger_schema!r} has no init_runs table (no worker has "
            "passed the gate here).",
            markup=False,
            soft_wrap=True,
        )
    elif not found.runs:
        wanted = f" with status {', '.join(status)}" if status else ""
        out.print(
            f"No runs{wanted} for namespace {found.namespace!r}.",
            markup=False,
            soft_wrap=True,
        )
    else:
        print_runs(found.runs, title=f"init runs of {found.namespace!r}")


@dataclasses.dataclass(frozen=True)
class History:
    """What ``init_runs`` holds for a namespace."""

    namespace: str
    has_ledger: bool
    """False when the ledger tables do not exist (yet)."""
    runs: list[dict[str, Any]]
    """Newest first, each with its steps under ``"steps"``."""


async def read_history(
    settings: Settings, *, limit: int = 20, statuses: Sequence[str] = ()
) -> History:
    """Read the namespace's latest runs on a short connection of its own.

    Raises:
        ConfigurationError: The URL, the credentials or the database are wrong.
        DatabaseUnavailableError: The server did not answer in time.
    """
    namespace = settings.effective_namespace
    conn = await _connect(settings)
    try:
        has_ledger = await conn.fetchval(
            "SELECT to_regclass($1) IS NOT NULL",
            f"{ledger.quote_ident(settings.ledger_schema)}.init_runs",
        )
        runs = []
        if has_ledger:
            runs = await ledger.fetch_runs(
                conn,
                settings.ledger_schema,
                namespace,
                limit=limit,
                statuses=statuses,
            )
    finally:
        await conn.close()
    return History(namespace, bool(has_ledger), runs)


async def _connect(settings: Settings) -> Any:
    """One connection attempt, errors turned into initgate's own."""
    dsn = settings.url.set(drivername="postgresql").render_as_string(
        hide_password=False
    )
    try:
        return await asyncpg.connect(dsn, timeout=min(settings.connect_timeout, 10))
    except (
        asyncpg.InvalidPasswordError,
        asyncpg.InvalidAuthorizationSpecificationError,
        asyncpg.InvalidCatalogNameError,
    ) as exc:
        raise ConfigurationError(
            f"{settings.masked_url}: {settings.scrub(str(exc))}"
        ) from None
    except (
        OSError,
        TimeoutError,
        asyncpg.CannotConnectNowError,
        asyncpg.TooManyConnectionsError,
    ) as exc:
        reason = settings.scrub(str(exc)) or type(exc).__name__
        raise DatabaseUnavailableError(
            f"could not connect to {settings.masked_url}: {reason}; check that "
            "PostgreSQL is up and reachable"
        ) from None
    except (ValueError, asyncpg.InterfaceError) as exc:
        raise ConfigurationError(
            f"cannot use the database URL {settings.masked_url}: "
            f"{settings.scrub(str(exc))}"
        ) from None


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return str(value)


# -- tables -------------------------------------------------------------------

_COLUMNS = (
    "run",
    "status",
    "host",
    "pid",
    "started",
    "duration",
    "revisions",
    "steps",
)
_STATUS_STYLES = {
    RunStatus.SUCCEEDED: "green",
    RunStatus.FAILED: "red",
    RunStatus.RUNNING: "yellow",
    RunStatus.ABANDONED: "magenta",
}


def print_runs(runs: Sequence[dict[str, Any]], *, title: str) -> None:
    """Print runs as a rich table on a terminal, as plain columns otherwise."""
    with_error = any(run.get("error") for run in runs)
    columns = [*_COLUMNS, "error"] if with_error else list(_COLUMNS)
    rows = [
        _run_cells(run, with_error, arrow="→" if out.is_terminal else "->")
        for run in runs
    ]
    if not out.is_terminal:
        out.print(f"{title}:", markup=False, soft_wrap=True)
        _print_plain(columns, rows)
        return
    table = Table(title=title, title_justify="left")
    for name in columns:
        justify: JustifyMethod = "right" if name in ("run", "pid") else "left"
        table.add_column(name, justify=justify, overflow="fold")
    for run, cells in zip(runs, rows, strict=True):
        texts = [Text(cell) for cell in cells]
        texts[1].stylize(_STATUS_STYLES.get(RunStatus(run["status"]), ""))
        table.add_row(*texts)
    out.print(table)


def _print_plain(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    widths = [
        max(len(cell) for cell in column) for column in zip(columns, *rows, strict=True)
    ]
    for cells in [columns, *rows]:
        line = "  ".join(
            cell.ljust(width) for cell, width in zip(cells, widths, strict=True)
        )
        out.print(line.rstrip(), markup=False, soft_wrap=True)


def _run_cells(run: dict[str, Any], with_error: bool, arrow: str) -> list[str]:
    started: dt.datetime = run["started_at"]
    finished: dt.datetime | None = run["finished_at"]
    if finished is None:
        duration = "running" if run["status"] == RunStatus.RUNNING else "-"
    else:
        duration = _duration((finished - started).total_seconds() * 1000)
    revisions = f"{run['revision_from'] or 'none'} {arrow} {run['revision_to'] or '-'}"
    cells = [
        str(run["id"]),
        str(run["status"]),
        str(run["hostname"]),
        str(run["pid"]),
        started.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
        duration,
        revisions,
        _describe_steps(run["steps"]),
    ]
    if with_error:
        error = _one_line(run.get("error") or "")
        cells.append(error if len(error) <= 80 else error[:79] + "…")
    return cells


def _describe_steps(steps: Sequence[dict[str, Any]]) -> str:
    migrations = sum(1 for step in steps if step["kind"] == StepKind.MIGRATION)
    seeds = sum(1 for step in steps if step["kind"] == StepKind.SEED)
    failed = sum(1 for step in steps if step["status"] == "failed")
    text = f"{_plural(migrations, 'migration')}, {_plural(seeds, 'seed')}"
    return text + (f", {failed} failed" if failed else "")


def _duration(ms: float) -> str:
    if ms < 1000:
        return f"{ms:.0f} ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f} s"
    return f"{ms / 60_000:.0f} min {ms % 60_000 / 1000:.0f} s"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'' if count == 1 else 's'}"


# -- initgate demo ------------------------------------------------------------


@cli.command(epilog=_EXIT_CODES_HELP)
def demo(
    once: Annotated[
        bool, typer.Option("--once", help="Stop everything after one request.")
    ] = False,
    workers: Annotated[
        int, typer.Option(min=1, max=64, help="uvicorn workers that race the gate.")
    ] = 4,
    database_url: Annotated[
        str | None,
        typer.Option(
            "--database-url",
            metavar="URL",
            help="Use this database instead of starting an embedded PostgreSQL.",
            show_default=False,
        ),
    ] = None,
    port: Annotated[
        int, typer.Option(min=1, max=65535, help="Port to serve on (127.0.0.1).")
    ] = 8000,
    data_dir: Annotated[
        Path,
        typer.Option(
            file_okay=False,
            help="For the embedded server's data and the service's log.",
        ),
    ] = Path(".initgate-demo"),
) -> None:
    """Watch N workers race the gate and one of them run init.

    Starts PostgreSQL (embedded, in the data directory, unless
    `--database-url` is given), then the demo service with
    `uvicorn app.main:app --workers N`; shows the init history once every
    worker passed the gate, makes one request, and serves until Ctrl-C.
    Run it from a checkout of initgate (the directory with `alembic.ini`).
    """
    if database_url:
        _given_urls.append(database_url)
    stack = contextlib.ExitStack()
    previous_sigterm = signal.signal(signal.SIGTERM, _interrupt)
    serving = False
    try:
        with stack:
            project = demo_service.find_project()
            url = database_url or _start_embedded(stack, data_dir)
            settings = Settings.from_env(database_url=url, alembic_config=None)
            before = asyncio.run(read_history(settings, limit=1))
            last_run = before.runs[0]["id"] if before.runs else 0

            service = demo_service.DemoService(
                project=project,
                database_url=url,
                workers=workers,
                port=port,
                data_dir=data_dir,
            )
            stack.callback(_stop_service, service)
            boot = _start_service(service)

            found = asyncio.run(read_history(settings, limit=20))
            new_runs = [run for run in found.runs if run["id"] > last_run]
            if found.runs:
                print_runs(found.runs, title=f"init runs of {found.namespace!r}")
            out.print(_explain(boot, new_runs, workers), markup=False, soft_wrap=True)
            _sample_request(service, "/countries/DE")
            if once:
                return
            _print_serving(service)
            serving = True
            code = service.wait()
            raise demo_service.DemoError(
                f"the demo service stopped by itself (exit code {code}); the "
                f"log is {_show_path(service.log_path)}",
                service.log_tail(),
            )
    except demo_service.DemoError as exc:
        if exc.log_tail:
            err.print(exc.log_tail, markup=False, style="dim", soft_wrap=True)
        _fail(exc)
    except InitGateError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        if serving:
            return
        _print_error("interrupted")
        raise typer.Exit(ExitCode.INTERRUPTED) from None
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


def _interrupt(signum: int, frame: Any) -> None:
    # SIGTERM (from `timeout`, a supervisor) stops the demo like Ctrl-C.
    raise KeyboardInterrupt


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM, so that stopping is never cut short."""
    held = (signal.SIGINT, signal.SIGTERM)
    previous = {signum: signal.signal(signum, signal.SIG_IGN) for signum in held}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextlib.contextmanager
def _status(message: str, *, quiet: bool = False) -> Iterator[Any]:
    """A spinner on a terminal; otherwise a plain line, unless ``quiet``."""
    if out.is_terminal:
        with out.status(message) as status:
            yield status
    else:
        if not quiet:
            out.print(f"{message} ...", markup=False, soft_wrap=True)
        yield None


def _start_embedded(stack: contextlib.ExitStack, data_dir: Path) -> str:
    postgres = demo_service.EmbeddedPostgres(data_dir)
    started = time.monotonic()
    with _status(f"Starting PostgreSQL in {_show_path(postgres.pgdata)}"):
        stack.callback(_stop_postgres, postgres)
        postgres.start()
        try:
            created, version = asyncio.run(
                demo_service.ensure_database(
                    postgres.url("postgres"), demo_service.DEMO_DATABASE
                )
            )
        except (OSError, asyncpg.PostgresError) as exc:
            raise demo_service.DemoError(
                f"cannot prepare database {demo_service.DEMO_DATABASE}: {exc}"
            ) from None
    what = "created" if created else "exists, kept"
    out.print(
        f"PostgreSQL {version} ready in {_duration(_ms_since(started))} "
        f"(embedded, data in {_show_path(postgres.pgdata)}); database "
        f"{demo_service.DEMO_DATABASE} {what}",
        markup=False,
        soft_wrap=True,
    )
    return postgres.url(demo_service.DEMO_DATABASE)


def _start_service(service: demo_service.DemoService) -> demo_service.Boot:
    started = time.monotonic()
    workers = service.workers
    message = f"Starting the demo service: uvicorn with {workers} workers"
    with _status(message) as status:
        service.start()

        def progress(boot: demo_service.Boot) -> None:
            if status is not None:
                status.update(f"{message}: {boot.started} of {workers} passed the gate")

        boot = service.wait_until_ready(on_progress=progress)
    out.print(
        f"{_plural(workers, 'worker')} passed the gate and started in "
        f"{_duration(_ms_since(started))} (log: {_show_path(service.log_path)})",
        markup=False,
        soft_wrap=True,
    )
    return boot


def _explain(
    boot: demo_service.Boot, new_runs: Sequence[dict[str, Any]], workers: int
) -> str:
    """One sentence: who ran init, who waited, who found it done."""
    holders = [run for run in new_runs if run["status"] == RunStatus.SUCCEEDED]
    waited = boot.count(Outcome.WAITED)
    up_to_date = boot.count(Outcome.UP_TO_DATE)
    parts = []
    if holders:
        done = "; ".join(_describe_run_steps(run) for run in holders)
        parts.append(
            f"{_plural(len(holders), 'worker')} ran init ({done}) while holding "
            "the lock"
        )
    if waited:
        parts.append(f"{waited} waited for it and skipped init")
    if up_to_date:
        parts.append(
            f"{up_to_date} found init already done and skipped it without "
            "taking the lock"
        )
    rest = workers - len(holders) - waited - up_to_date
    if not holders and up_to_date == workers:
        return (
            f"No worker ran init this time: all {workers} found it already done "
            "and passed without taking the lock."
        )
    if not parts:
        return f"All {workers} workers passed the gate."
    if rest > 0:
        parts.append(f"{rest} passed the gate")
    return "; ".join(parts) + "."


def _describe_run_steps(run: dict[str, Any]) -> str:
    kinds = [step["kind"] for step in run["steps"] if step["status"] == "succeeded"]
    return (
        f"run {run['id']}: {_plural(kinds.count(StepKind.MIGRATION), 'revision')}, "
        f"{_plural(kinds.count(StepKind.SEED), 'seed step')}"
    )


def _sample_request(service: demo_service.DemoService, path: str) -> None:
    response = service.get(path)
    try:
        body = json.dumps(response.json(), ensure_ascii=False)
    except ValueError:
        body = response.text[:200]
    out.print(
        f"GET {path} -> {response.status_code} {body}", markup=False, soft_wrap=True
    )


def _print_serving(service: demo_service.DemoService) -> None:
    base = service.base_url
    out.print(
        f"Serving {base} with {_plural(service.workers, 'worker')}; try "
        f"{base}/countries?q=land, {base}/init/runs or {base}/docs",
        markup=False,
        soft_wrap=True,
    )
    out.print(
        f"Log: {_show_path(service.log_path)}; database: {service.display_url}. "
        "Press Ctrl-C to stop.",
        markup=False,
        soft_wrap=True,
    )


def _stop_service(service: demo_service.DemoService) -> None:
    with _signals_held(), _status("Stopping the demo service", quiet=True):
        service.stop()
    out.print("Stopped the demo service.", markup=False, soft_wrap=True)


def _stop_postgres(postgres: demo_service.EmbeddedPostgres) -> None:
    if not postgres.started:
        return
    with _signals_held(), _status("Stopping PostgreSQL", quiet=True):
        postgres.stop()
    out.print(
        f"Stopped PostgreSQL; its data stays in {_show_path(postgres.pgdata)}.",
        markup=False,
        soft_wrap=True,
    )


def _show_path(path: Path) -> str:
    """``path`` relative to the working directory when it lies below it."""
    try:
        return str(path.resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _ms_since(started: float) -> float:
    return (time.monotonic() - started) * 1000


if __name__ == "__main__":
    main()
