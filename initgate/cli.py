"""The ``initgate`` command: pass the gate, inspect and audit it, try the demo.

::

    initgate run      pass the gate outside the app (init container, pre-start)
    initgate status   is the database at the code's target; holder, waiters
    initgate plan     the SQL and seed steps the next run would execute
    initgate check    verify the setup, one finding per line
    initgate history  the runs recorded in init_runs, as a table or JSON
    initgate show     one run with every step, its duration and error
    initgate retry    lift the fail-fast state once a fix is deployed
    initgate prune    delete old runs, keeping what the gate still needs
    initgate demo     PostgreSQL + the demo service with N workers, one init

Exit codes, the same for every command:

====  ==================================================================
0     done: init ran here, was already up to date, or another worker ran it
1     init failed (a step raised, or it failed too often for this code and
      was not tried again); the demo failed; an unexpected error
2     bad configuration or usage: settings, alembic.ini, --app, the URL,
      credentials, an unknown option
3     gave up waiting for another worker that holds the init lock; retry:
      found the lock held
4     the database did not accept a connection in time
5     the database is at a revision this code does not know
6     status: the database is not at the code's target (init pending)
7     check: at least one finding is FAIL
130   interrupted (Ctrl-C)
====  ==================================================================

Errors are one line on stderr, without a traceback, and never show a
password. Every command but demo takes ``--json``: one JSON document on
stdout. On a terminal, results are rich tables and ``run`` shows a spinner
naming the holder it waits for; otherwise plain lines. Everything here is
printed through :data:`out` and :data:`err`; the library itself only logs.
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
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from rich.console import Console, JustifyMethod
from rich.table import Table
from rich.text import Text

from initgate.errors import (
    ConfigurationError,
    DatabaseAheadError,
    DatabaseUnavailableError,
    InitGateError,
    UnsupportedConnectionError,
    WaitTimeoutError,
)
from initgate.states import RunStatus

# Every process of the command builds the whole command line, for --help too,
# so only typer, rich, the exceptions and the run states are imported with
# this module. The
# rest (SQLAlchemy, asyncpg, Alembic, FastAPI: more than a second of CPU) is
# imported by the commands that use it.
if TYPE_CHECKING:
    from initgate import demo as demo_service
    from initgate import ops
    from initgate.gate import Gate, GateResult, Phase
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
    NOT_AT_TARGET = 6
    """``status``: init is pending (revisions, seed steps, or a new target)."""
    CHECK_FAILED = 7
    """``check``: at least one finding is FAIL."""
    INTERRUPTED = 130
    """Ctrl-C (SIGINT), by the shell's convention of 128 + the signal."""


_EXIT_CODES_HELP = """
Exit codes: **0** done or up to date; **1** init failed (or failed too often
to be retried); **2** bad configuration or usage; **3** timed out waiting for
the init lock, or (retry) found it held; **4** database unreachable; **5**
database ahead of the code; **6** (status) not at the code's target; **7**
(check) a finding failed; **130** interrupted.
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
        # Imported here: most error lines (a usage error) have no URL to parse.
        import sqlalchemy

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


JsonOption = Annotated[
    bool, typer.Option("--json", help="Print one JSON document for machines.")
]


@cli.command(epilog=_EXIT_CODES_HELP)
def run(
    app: AppOption = "app.main:gate",
    verbose: VerboseOption = False,
    as_json: JsonOption = False,
) -> None:
    """Pass the gate once, outside the app: for init containers or pre-start.

    Imports the app's `InitGate` (so its seed steps are registered) from the
    working directory, then migrates and seeds if the database needs it,
    waiting while another process does. Settings come from the environment,
    as in the app (`DATABASE_URL`, `INITGATE_*`). Prints one result line; on
    a terminal, a spinner shows the phase and the holder it waits for.
    """
    _show_library_logs(verbose)
    try:
        gate = _load_gate(app)
        if out.is_terminal and not as_json:
            result = asyncio.run(_run_with_spinner(gate))
        else:
            result = asyncio.run(gate.run())
    except InitGateError as exc:
        _fail(exc)
    if as_json:
        _print_json(
            dataclasses.asdict(result)
            | {"namespace": gate.settings.effective_namespace}
        )
    else:
        _print_line(_describe_result(result, gate))


def _phase_words() -> dict[Phase, str]:
    """What the spinner says in each phase of the gate."""
    from initgate.gate import Phase

    return {
        Phase.IDLE: "starting",
        Phase.CONNECTING: "connecting to the database",
        Phase.CHECKING: "checking whether init is up to date",
        Phase.WAITING: "waiting for the init lock",
        Phase.HOLDING: "holding the init lock",
        Phase.MIGRATING: "holding the init lock: migrating",
        Phase.SEEDING: "holding the init lock: seeding",
        Phase.PASSED: "passed",
        Phase.FAILED: "failed",
    }


# Seconds between holder queries while waiting: each is a round trip on a
# connection of the spinner's own, never on the gate's.
_HOLDER_POLL = 1.0


async def _run_with_spinner(app_gate: InitGate) -> GateResult:
    """Pass the gate while a spinner shows its phase and whom it waits for."""
    from initgate.gate import Phase

    phase_words = _phase_words()
    gate = app_gate.gate
    task = asyncio.create_task(app_gate.run())
    watcher: Any = None
    holder_text = ""
    next_poll = 0.0
    started = time.monotonic()
    try:
        with out.status(Text(phase_words[gate.phase])) as spinner:
            while not task.done():
                await asyncio.wait({task}, timeout=0.2)
                text = phase_words[gate.phase]
                if gate.phase is Phase.WAITING:
                    if time.monotonic() >= next_poll:
                        next_poll = time.monotonic() + _HOLDER_POLL
                        watcher, holder_text = await _poll_holder(
                            watcher, app_gate.settings, gate
                        )
                    if holder_text:
                        text += f" held by {holder_text}"
                # Text, not a string: a statement like "[active: ...]" is
                # not rich markup.
                spinner.update(Text(f"{text} ({_duration(_ms_since(started))})"))
    finally:
        if watcher is not None:
            with contextlib.suppress(Exception):
                await watcher.close()
    return task.result()


async def _poll_holder(watcher: Any, settings: Settings, gate: Gate) -> tuple[Any, str]:
    """Describe the holder on the spinner's own connection; best effort."""
    import asyncpg

    from initgate import ops

    try:
        if watcher is None or watcher.is_closed():
            watcher = await ops.connect(settings, "run")
        holder = await ops.read_holder(watcher, settings, gate.key)
    except (InitGateError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        # The spinner is a courtesy: the gate reports real problems itself.
        return watcher, ""
    return watcher, _scrub(holder.describe()) if holder else ""


def _load_gate(spec: str) -> InitGate:
    """Import ``module:attribute`` and check that it is an InitGate.

    Raises:
        ConfigurationError: It cannot be imported or is something else;
            also whatever ConfigurationError the import itself raises.
    """
    from initgate.lifespan import InitGate

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
    from initgate.gate import Outcome

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


NamespaceOption = Annotated[
    str | None,
    typer.Option(help="Init namespace; default INITGATE_NAMESPACE or DATABASE:SCHEMA."),
]
SchemaOption = Annotated[
    str | None,
    typer.Option(help="Schema of init_runs; default INITGATE_SCHEMA or public."),
]


def _ledger_settings(
    database_url: str | None, namespace: str | None, schema: str | None
) -> Settings:
    """Settings from the environment and the ledger options; no alembic.ini.

    Raises:
        ConfigurationError: A setting is missing or invalid.
    """
    from initgate.settings import Settings

    if database_url:
        _given_urls.append(database_url)
    overrides = {
        "database_url": database_url,
        "namespace": namespace,
        # By its variable's name, so that a bad value is reported under it.
        "INITGATE_SCHEMA": schema,
    }
    return Settings.from_env(
        alembic_config=None,
        **{key: value for key, value in overrides.items() if value is not None},
    )


@cli.command(epilog=_EXIT_CODES_HELP)
def history(
    limit: Annotated[
        int, typer.Option(min=1, help="Show at most this many runs, newest first.")
    ] = 20,
    status: Annotated[
        list[RunStatus] | None,
        typer.Option(help="Only runs with this status; repeat for several."),
    ] = None,
    since: Annotated[
        str | None,
        typer.Option(
            metavar="WHEN",
            help="Only runs started since: a duration back from now (90s, 30m, "
            "2h, 7d, 2w) or an ISO 8601 time (2026-03-01T12:00+01:00).",
            show_default=False,
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print a JSON array, runs with steps.")
    ] = False,
    database_url: DatabaseUrlOption = None,
    namespace: NamespaceOption = None,
    schema: SchemaOption = None,
) -> None:
    """Show the runs recorded in `init_runs`: who ran init, when, what it did.

    Reads the same settings as the gate. As a table on a terminal, as plain
    columns otherwise, or as JSON with `--json` (datetimes in ISO 8601).
    """
    try:
        started_since = parse_since(since, "--since") if since else None
        settings = _ledger_settings(database_url, namespace, schema)
        found = asyncio.run(
            read_history(
                settings,
                limit=limit,
                statuses=tuple(status or ()),
                since=started_since,
            )
        )
    except InitGateError as exc:
        _fail(exc)
    if as_json:
        _print_json(found.runs)
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
        if since:
            wanted += f" since {since}"
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
    settings: Settings,
    *,
    limit: int = 20,
    statuses: Sequence[str] = (),
    since: dt.datetime | None = None,
) -> History:
    """Read the namespace's latest runs on a short connection of its own.

    Raises:
        ConfigurationError: The URL, the credentials or the database are wrong.
        DatabaseUnavailableError: The server did not answer in time.
    """
    from initgate import ledger, ops

    namespace = settings.effective_namespace
    conn = await ops.connect(settings, "history")
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
                since=since,
            )
    finally:
        await conn.close()
    return History(namespace, bool(has_ledger), runs)


_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.I)
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, option: str) -> dt.timedelta:
    """``90s``, ``30m``, ``2h``, ``7d`` or ``2w`` as a timedelta.

    Raises:
        ConfigurationError: Anything else, naming ``option``.
    """
    match = _DURATION.match(text)
    if match is None:
        raise ConfigurationError(
            f"{option}: expected a duration such as 90s, 30m, 2h, 7d or 2w, "
            f"got {text!r}"
        )
    number, unit = match.groups()
    return dt.timedelta(seconds=float(number) * _DURATION_UNITS[unit.lower()])


def parse_since(text: str, option: str) -> dt.datetime:
    """A duration back from now, or an ISO 8601 time (local if naive).

    Raises:
        ConfigurationError: Neither, naming ``option``.
    """
    if _DURATION.match(text):
        return dt.datetime.now(dt.UTC) - parse_duration(text, option)
    try:
        when = dt.datetime.fromisoformat(text.strip())
    except ValueError:
        raise ConfigurationError(
            f"{option}: expected a duration such as 2h or 7d, or an ISO 8601 "
            f"time such as 2026-03-01T12:00:00+00:00, got {text!r}"
        ) from None
    return when if when.tzinfo is not None else when.astimezone()


def _json_value(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    return str(value)


# -- output helpers -------------------------------------------------------------


def _print_line(text: str, *, style: str | None = None) -> None:
    """One result line on stdout, password-scrubbed, never markup."""
    out.print(_scrub(text), markup=False, soft_wrap=True, style=style)


def _print_json(value: Any) -> None:
    """One JSON document on stdout: dataclasses as objects, times in ISO 8601."""
    typer.echo(_scrub(json.dumps(_jsonable(value), default=_json_value, indent=2)))


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {
            field.name: _jsonable(getattr(value, field.name))
            for field in dataclasses.fields(value)
        }
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return value


def _print_fields(title: str, rows: Sequence[tuple[str, str]]) -> None:
    """Name/value pairs: a two-column table on a terminal, lines otherwise."""
    if not out.is_terminal:
        _print_line(f"{title}:")
        width = max(len(name) for name, _ in rows)
        for name, value in rows:
            _print_line(f"  {name.ljust(width)}  {value}")
        return
    table = Table(title=Text(_scrub(title)), title_justify="left", show_header=False)
    table.add_column(style="bold")
    table.add_column(overflow="fold")
    for name, value in rows:
        table.add_row(Text(name), Text(_scrub(value)))
    out.print(table)


def _load_app(spec: str) -> InitGate:
    """:func:`_load_gate`, with the app's own password added to the masks."""
    app_gate = _load_gate(spec)
    _given_urls.append(app_gate.settings.database_url.get_secret_value())
    return app_gate


def _time(value: dt.datetime | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    return value.astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _revision_list(revisions: Sequence[str]) -> str:
    return ", ".join(revisions) if revisions else "none"


# -- initgate status ------------------------------------------------------------


@cli.command(epilog=_EXIT_CODES_HELP)
def status(app: AppOption = "app.main:gate", as_json: JsonOption = False) -> None:
    """Is the database at the code's target? What is pending, who is at work.

    Compares the database with the app's code (`--app`, as for `run`):
    revisions between `alembic_version` and the code's heads, seed steps not
    yet run, the holder of the init lock and what it is doing, the other
    initgate sessions waiting, and the last run. Exits **0** when up to
    date, **6** when init is pending, **1** when the last run failed, **5**
    when the database is ahead of the code.
    """
    from initgate import ops

    try:
        app_gate = _load_app(app)
        found = asyncio.run(ops.read_status(app_gate.gate))
    except InitGateError as exc:
        _fail(exc)
    code = _status_exit_code(found, app_gate.settings)
    if as_json:
        _print_json(_status_document(found) | {"exit_code": int(code)})
    else:
        _print_fields(_status_title(found), _status_rows(found))
    raise typer.Exit(code)


def _status_exit_code(found: ops.Status, settings: Settings) -> ExitCode:
    if found.unknown_revisions and not settings.allow_unknown_revisions:
        return ExitCode.DATABASE_AHEAD
    if found.up_to_date or found.unknown_revisions:
        return ExitCode.OK
    last = found.last_run
    if last is not None and last["status"] == RunStatus.FAILED:
        return ExitCode.INIT_FAILED
    return ExitCode.NOT_AT_TARGET


def _status_title(found: ops.Status) -> str:
    if found.unknown_revisions:
        where = "AHEAD of the code"
    elif found.up_to_date:
        where = "up to date"
    else:
        where = "NOT at the code's target"
    return f"init of {found.namespace!r} in {found.database_url}: {where}"


def _status_rows(found: ops.Status) -> list[tuple[str, str]]:
    rows = [("target", found.target)]
    if found.heads is not None:
        text = (
            f"database at {_revision_list(found.revisions)}, code heads "
            f"{_revision_list(found.heads)}"
        )
        if found.unknown_revisions:
            text += f"; unknown to the code: {', '.join(found.unknown_revisions)}"
        elif found.pending_revisions:
            names = ", ".join(p.revision for p in found.pending_revisions)
            text += f"; {len(found.pending_revisions)} pending: {names}"
        else:
            text += "; none pending"
        rows.append(("revisions", text))
    pending = [f"{name} v{version}" for name, version in found.pending_seeds]
    rows.append(
        (
            "seed steps",
            f"{len(pending)} pending: {', '.join(pending)}"
            if pending
            else "none pending",
        )
    )
    rows.append(("holder", found.holder.describe() if found.holder else "none"))
    waiters = [waiter.describe() for waiter in found.waiters]
    rows.append(
        ("waiters", f"{len(waiters)}: {'; '.join(waiters)}" if waiters else "none")
    )
    rows.append(("last run", _describe_last_run(found.last_run)))
    if found.failures:
        verdict = (
            "workers fail fast for this code: deploy a fix, or run `initgate "
            "retry` once it is deployed"
            if found.fail_fast
            else f"workers try again (fail fast at {found.max_attempts})"
        )
        rows.append(
            (
                "failures",
                f"{found.failures} for this code since the last success; {verdict}",
            )
        )
    return rows


def _describe_last_run(run: dict[str, Any] | None) -> str:
    if run is None:
        return "none"
    started: dt.datetime = run["started_at"]
    finished: dt.datetime | None = run["finished_at"]
    took = (
        f", took {_duration((finished - started).total_seconds() * 1000)}"
        if finished is not None
        else ""
    )
    text = (
        f"{run['id']} {run['status']} on {run['hostname']} pid {run['pid']}, "
        f"started {_time(started)}{took}"
    )
    if run.get("error"):
        text += f": {_one_line(run['error'])}"
    return text


def _status_document(found: ops.Status) -> dict[str, Any]:
    holder = found.holder
    return {
        "namespace": found.namespace,
        "database_url": found.database_url,
        "target": found.target,
        "up_to_date": found.up_to_date,
        "revisions": {
            "database": found.revisions,
            "heads": found.heads,
            "pending": [
                {"revision": p.revision, "description": p.doc}
                for p in found.pending_revisions
            ],
            "unknown": found.unknown_revisions,
        },
        "seeds": {
            "pending": [
                {"name": name, "version": version}
                for name, version in found.pending_seeds
            ]
        },
        "holder": None
        if holder is None
        else {
            "session": holder.session,
            "run": holder.run,
            "since": holder.since,
            "description": holder.describe(),
        },
        "waiters": found.waiters,
        "last_run": found.last_run,
        "failures": found.failures,
        "max_attempts": found.max_attempts,
        "fail_fast": found.fail_fast,
        "ledger_version": found.ledger_version,
    }


# -- initgate show --------------------------------------------------------------


@cli.command(epilog=_EXIT_CODES_HELP)
def show(
    run_id: Annotated[
        int, typer.Argument(metavar="RUN_ID", min=1, help="The run's id.")
    ],
    with_traceback: Annotated[
        bool, typer.Option("--traceback", help="Also print the run's traceback.")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print the run, steps and traceback as JSON."),
    ] = False,
    database_url: DatabaseUrlOption = None,
    schema: SchemaOption = None,
) -> None:
    """Show one run: who ran it, every step with its duration and error."""
    try:
        settings = _ledger_settings(database_url, None, schema)
        run = asyncio.run(_read_run(settings, run_id))
    except InitGateError as exc:
        _fail(exc)
    if as_json:
        _print_json(run)
        return
    _print_fields(f"run {run['id']} of {run['namespace']!r}", _run_rows(run))
    _print_steps(run["steps"])
    if with_traceback:
        if run.get("traceback"):
            _print_line("traceback:")
            _print_line(run["traceback"].rstrip())
        else:
            _print_line("traceback: none recorded")


async def _read_run(settings: Settings, run_id: int) -> dict[str, Any]:
    from initgate import ledger, ops

    conn = await ops.connect(settings, "show")
    try:
        run = await ledger.fetch_run(conn, settings.ledger_schema, run_id)
    finally:
        await conn.close()
    if run is None:
        raise ConfigurationError(
            f"there is no run {run_id} in schema {settings.ledger_schema!r} of "
            f"{settings.masked_url}; `initgate history` lists the runs"
        )
    return run


def _run_rows(run: dict[str, Any]) -> list[tuple[str, str]]:
    started: dt.datetime = run["started_at"]
    finished: dt.datetime | None = run["finished_at"]
    rows = [
        ("status", str(run["status"])),
        ("target", str(run["target"])),
        (
            "host",
            f"{run['hostname']} pid {run['pid']} (backend pid {run['backend_pid']})",
        ),
        ("started", _time(started)),
        ("finished", _time(finished)),
    ]
    if finished is not None:
        rows.append(
            ("duration", _duration((finished - started).total_seconds() * 1000))
        )
    rows.append(
        (
            "revisions",
            f"{run['revision_from'] or 'none'} -> {run['revision_to'] or '-'}",
        )
    )
    if run.get("code_version"):
        rows.append(("code version", str(run["code_version"])))
    if run.get("error"):
        rows.append(("error", _one_line(run["error"])))
    return rows


_STEP_COLUMNS = (
    "step",
    "kind",
    "name",
    "version",
    "status",
    "started",
    "duration",
    "checksum",
    "error",
)


def _print_steps(steps: Sequence[dict[str, Any]]) -> None:
    if not steps:
        _print_line("steps: none recorded")
        return
    rows = [
        [
            str(step["id"]),
            str(step["kind"]),
            str(step["name"]),
            str(step["version"] or "-"),
            str(step["status"]),
            _time(step["started_at"]),
            _duration(step["duration_ms"]),
            (step.get("checksum") or "-")[:12],
            _one_line(step["error"] or ""),
        ]
        for step in steps
    ]
    if not out.is_terminal:
        _print_line("steps:")
        _print_plain(_STEP_COLUMNS, rows)
        return
    table = Table(title="steps", title_justify="left")
    for name in _STEP_COLUMNS:
        table.add_column(
            name, justify="right" if name == "step" else "left", overflow="fold"
        )
    for cells in rows:
        texts = [Text(_scrub(cell)) for cell in cells]
        texts[4].stylize("green" if cells[4] == "succeeded" else "red")
        table.add_row(*texts)
    out.print(table)


# -- initgate check -------------------------------------------------------------


@cli.command(epilog=_EXIT_CODES_HELP)
def check(app: AppOption = "app.main:gate", as_json: JsonOption = False) -> None:
    """Verify the setup, one finding per line: ok, warn, FAIL or skip.

    Checks that the app imports, the database answers and the role logs in,
    alembic.ini and its revisions load, the database is not ahead of the
    code, the role may create (or write) the ledger tables and take advisory
    locks, the server is PostgreSQL 14+, and that no applied revision's file
    has changed since. Exits **7** if any finding is FAIL.
    """
    from initgate import ops
    from initgate.settings import Settings

    findings = []
    seeds = None
    try:
        app_gate = _load_app(app)
        settings = app_gate.settings
        seeds = app_gate.seeds
        findings.append(
            ops.Finding(
                ops.CheckLevel.OK,
                "app",
                f"{app} imports; {_plural(len(seeds), 'seed step')} registered",
            )
        )
    except ConfigurationError as exc:
        findings.append(ops.Finding(ops.CheckLevel.FAIL, "app", str(exc)))
        try:
            settings = Settings.from_env()
        except ConfigurationError as settings_exc:
            findings.append(
                ops.Finding(ops.CheckLevel.FAIL, "settings", str(settings_exc))
            )
            _print_findings(findings, as_json)
            raise typer.Exit(ExitCode.CHECK_FAILED) from None
    findings.extend(asyncio.run(ops.check(settings, seeds)))
    _print_findings(findings, as_json)
    failed = any(finding.level is ops.CheckLevel.FAIL for finding in findings)
    raise typer.Exit(ExitCode.CHECK_FAILED if failed else ExitCode.OK)


def _print_findings(findings: Sequence[ops.Finding], as_json: bool) -> None:
    from initgate.ops import CheckLevel

    styles = {
        CheckLevel.OK: "green",
        CheckLevel.WARN: "yellow",
        CheckLevel.FAIL: "bold red",
        CheckLevel.SKIP: "dim",
    }
    if as_json:
        failed = any(f.level is CheckLevel.FAIL for f in findings)
        _print_json({"ok": not failed, "findings": list(findings)})
        return
    width = max(len(finding.check) for finding in findings)
    for finding in findings:
        line = Text(f"{finding.level.value:<4}  ", style=styles[finding.level])
        line.append(
            f"{finding.check.ljust(width)}  {_one_line(_scrub(finding.message))}"
        )
        out.print(line, soft_wrap=True)


# -- initgate plan --------------------------------------------------------------


@cli.command(epilog=_EXIT_CODES_HELP)
def plan(app: AppOption = "app.main:gate", as_json: JsonOption = False) -> None:
    """The SQL and seed steps the next run would execute, for review.

    Reads where the database is, then has Alembic render the pending
    revisions' SQL in offline mode (`upgrade CURRENT:heads --sql`, through
    the project's env.py, which must support offline mode); nothing is
    executed. Seed steps are Python, so only their names are listed.
    """
    from initgate import ops

    try:
        app_gate = _load_app(app)
        found = ops.read_plan(app_gate.gate)
    except InitGateError as exc:
        _fail(exc)
    if as_json:
        _print_json(
            {
                "namespace": found.namespace,
                "up_to_date": found.up_to_date,
                "database_revisions": found.revisions,
                "revisions": [
                    {"revision": p.revision, "description": p.doc}
                    for p in found.pending_revisions
                ],
                "seeds": [
                    {"name": name, "version": version}
                    for name, version in found.pending_seeds
                ],
                "sql": found.sql,
            }
        )
        return
    _print_plan(found)


def _print_plan(found: ops.Plan) -> None:
    where = _revision_list(found.revisions)
    if not found.pending_revisions and not found.pending_seeds:
        if found.up_to_date:
            _print_line(
                f"Nothing to do: init of {found.namespace!r} is at the code's "
                f"target (database at {where})."
            )
        else:
            _print_line(
                f"No revision and no seed step to run for {found.namespace!r} "
                f"(database at {where}); the next run only records the code's "
                "new target."
            )
        return
    _print_line(f"Plan for {found.namespace!r}, database at {where}:")
    if found.pending_revisions:
        _print_line(f"{_plural(len(found.pending_revisions), 'revision')} to apply:")
        for pending in found.pending_revisions:
            _print_line(f"  {pending.revision}  {pending.doc or ''}".rstrip())
    if found.pending_seeds:
        _print_line(f"{_plural(len(found.pending_seeds), 'seed step')} to run:")
        for name, version in found.pending_seeds:
            _print_line(f"  {name} v{version}")
    if found.sql:
        _print_line("SQL, from Alembic's offline mode:", style="bold")
        _print_line(found.sql.rstrip())


# -- initgate retry -------------------------------------------------------------


@cli.command(epilog=_EXIT_CODES_HELP)
def retry(
    as_json: JsonOption = False,
    database_url: DatabaseUrlOption = None,
    namespace: NamespaceOption = None,
    schema: SchemaOption = None,
) -> None:
    """Lift the fail-fast state after a failed init, once a fix is deployed.

    Records a run with status `retry`: failures before it no longer count
    towards `INITGATE_MAX_ATTEMPTS`, so the next worker to start tries init
    again. Takes the init lock with a try-lock: if a holder is at work, says
    who and exits **3** without recording anything.
    """
    from initgate import ops

    try:
        settings = _ledger_settings(database_url, namespace, schema)
        result = asyncio.run(ops.retry(settings))
    except InitGateError as exc:
        _fail(exc)
    lifted = [failure["id"] for failure in result.lifted]
    if as_json:
        _print_json(
            {
                "namespace": settings.effective_namespace,
                "run_id": result.run_id,
                "lifted": lifted,
            }
        )
    elif result.run_id is None:
        _print_line(
            f"Nothing to retry: no failed run of {settings.effective_namespace!r} "
            "since its last success or retry."
        )
    else:
        _print_line(
            f"Recorded retry as run {result.run_id}: the failures of "
            f"{_plural(len(lifted), 'run')} ({', '.join(map(str, lifted))}) no "
            "longer count; the next worker to start tries init again."
        )


# -- initgate prune -------------------------------------------------------------


@cli.command(epilog=_EXIT_CODES_HELP)
def prune(
    keep: Annotated[
        int | None,
        typer.Option(min=0, help="Keep the newest N runs of the namespace."),
    ] = None,
    older_than: Annotated[
        str | None,
        typer.Option(
            metavar="DURATION",
            help="Delete only runs started longer ago than this (30d, 12h, 2w).",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Only say what would be deleted.")
    ] = False,
    all_namespaces: Annotated[
        bool, typer.Option("--all-namespaces", help="Prune every namespace.")
    ] = False,
    as_json: JsonOption = False,
    database_url: DatabaseUrlOption = None,
    namespace: NamespaceOption = None,
    schema: SchemaOption = None,
) -> None:
    """Delete old runs and their steps; what the gate still reads stays.

    With `--keep` and `--older-than` together, a run goes only if it is both
    beyond the newest N and older. Never deleted: the latest succeeded run of
    each namespace, `running` runs, and the last run that recorded each seed
    step version (the gate reads it to skip that step).
    """
    from initgate import ops

    try:
        age = parse_duration(older_than, "--older-than") if older_than else None
        settings = _ledger_settings(database_url, namespace, schema)
        result = asyncio.run(
            ops.prune(
                settings,
                keep=keep,
                older_than=age,
                all_namespaces=all_namespaces,
                dry_run=dry_run,
            )
        )
    except InitGateError as exc:
        _fail(exc)
    where = "every namespace" if all_namespaces else repr(settings.effective_namespace)
    ids = ", ".join(map(str, result.run_ids))
    if as_json:
        _print_json(
            {
                "dry_run": dry_run,
                "count": len(result.run_ids),
                "run_ids": result.run_ids,
            }
        )
    elif dry_run:
        _print_line(
            f"Would delete {_plural(len(result.run_ids), 'run')} of {where}"
            + (f": {ids}" if ids else ".")
        )
    else:
        _print_line(
            f"Deleted {_plural(len(result.run_ids), 'run')} of {where}"
            + (f": {ids}" if ids else ".")
        )


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


def print_runs(runs: Sequence[dict[str, Any]], *, title: str) -> None:
    """Print runs as a rich table on a terminal, as plain columns otherwise."""
    styles = {
        RunStatus.SUCCEEDED: "green",
        RunStatus.FAILED: "red",
        RunStatus.RUNNING: "yellow",
        RunStatus.ABANDONED: "magenta",
        RunStatus.RETRY: "cyan",
    }
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
        texts[1].stylize(styles.get(RunStatus(run["status"]), ""))
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
    from initgate.ledger import StepKind

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
    from initgate import demo as demo_service
    from initgate.settings import Settings

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
    import asyncpg

    from initgate import demo as demo_service

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
    from initgate.gate import Outcome

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
    from initgate.ledger import StepKind

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
