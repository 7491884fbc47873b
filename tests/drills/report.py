"""Run the fault drills and write their figures into RELIABILITY.md.

::

    python -m tests.drills.report                      # CI-sized rounds
    python -m tests.drills.report --race-rounds 1000 --kill-rounds 3
    python -m tests.drills.report --from-results tests/drills/results/x.jsonl

Every figure in the file comes from the results this run recorded (one JSON
line per drill round, see :class:`tests.drills.support.DrillResults`);
nothing is typed in by hand. ``--from-results`` rewrites the file from an
earlier run's results without running anything.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import subprocess
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from tests.helpers import REPO_ROOT, find_pg_bindir

__all__ = ["main", "render"]

Records = dict[str, list[dict[str, Any]]]


def _run_drills(results: Path, race: int, kill: int) -> tuple[int, str, float]:
    env = dict(os.environ)
    env.update(
        INITGATE_DRILL_RESULTS=str(results),
        INITGATE_DRILL_ROUNDS=str(race),
        INITGATE_DRILL_KILL_ROUNDS=str(kill),
    )
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-m", "slow", "tests/drills", "-q", "-rA"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    return done.returncode, lines[-1] if lines else "", time.monotonic() - started


def _load(path: Path) -> Records:
    records: Records = defaultdict(list)
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records[record["drill"]].append(record)
    return records


def _seconds(values: list[Any]) -> str:
    numbers = [float(v) for v in values if v is not None]
    if not numbers:
        return "n/a"
    return f"{statistics.median(numbers):.2f} / {max(numbers):.2f}"


def _total(rows: list[dict[str, Any]], key: str) -> int:
    return sum(int(r.get(key) or 0) for r in rows)


def _race(rows: list[dict[str, Any]]) -> list[str]:
    outcomes: Counter[str] = Counter()
    by_driver: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        outcomes.update(row["outcomes"])
        # Results from before the drill alternated drivers name none.
        by_driver[row.get("driver", "asyncpg")].append(row)
    lines = [
        "## Race loop: 8 workers start the gate at once on a fresh database",
        "",
        f"Expected: {rows[0]['expected']}. Rounds alternate between the gate's "
        "drivers.",
        "",
        "| driver | rounds | workers | double runs | lost or half-applied "
        "| failed workers | passed before commit | seed bodies run "
        "| all 8 passed, s (median / max) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for driver, group in sorted(by_driver.items()):
        lines.append(
            f"| {driver} | {len(group)} | {group[0]['workers']} "
            f"| {_total(group, 'double_runs')} | {_total(group, 'lost')} "
            f"| {_total(group, 'failed')} | {_total(group, 'passed_before_commit')} "
            f"| {_total(group, 'seed_bodies')} "
            f"| {_seconds([r['all_passed_s'] for r in group])} |"
        )
    return [
        *lines,
        "",
        "Happened: outcomes over all rounds "
        + ", ".join(f"{k} {v}" for k, v in sorted(outcomes.items()))
        + ".",
        "",
        "Reproduce: `INITGATE_DRILL_ROUNDS=1000 python -m pytest -m slow "
        "tests/drills/test_race.py`",
        "",
    ]


def _sigkill(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "## SIGKILL of the holder at each phase",
        "",
        "Three waiters queue behind a holder stopped at the phase, then the "
        "holder's process group gets SIGKILL. *Freed*: the dead backend no "
        "longer holds the lock (pg_locks polled every 5 ms). *Takeover*: a "
        "waiter logged that it took the lock. *Ready*: the first waiter passed. "
        "Seconds from the kill, median / max.",
        "",
        "Expected: the dead run `abandoned` (no run row yet when killed right "
        "after the lock), one `succeeded` run, schema at head, no half-applied "
        "revision, each seed effect exactly once (the seed killed mid-step runs "
        "twice, commits once), takeover within about check interval + poll "
        "interval.",
        "",
        "| phase | poll s | rounds | double runs | lost or half-applied "
        "| freed | takeover | ready | committed when killed | runs after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["phase"], row["poll_interval"])].append(row)
    for (phase, poll), group in groups.items():
        statuses = sorted({",".join(r["statuses"]) for r in group})
        lines.append(
            f"| {phase} | {poll:g} | {len(group)} | {_total(group, 'double_runs')} "
            f"| {_total(group, 'lost')} | {_seconds([r['freed_s'] for r in group])} "
            f"| {_seconds([r['takeover_s'] for r in group])} "
            f"| {_seconds([r['ready_s'] for r in group])} "
            f"| {group[0]['state_at_kill']} | {' / '.join(statuses)} |"
        )
    lines += [
        "",
        "Reproduce: `INITGATE_DRILL_KILL_ROUNDS=3 python -m pytest -m slow "
        "tests/drills/test_holder_faults.py -k sigkilled`",
        "",
    ]
    return lines


def _single(
    title: str, expected: str, rows: list[dict[str, Any]], keys: list[str], command: str
) -> list[str]:
    lines = [f"## {title}", "", f"Expected: {expected}", ""]
    if not rows:
        lines.append("- Not run (or skipped) in this run: no figures.")
    for row in rows:
        label = f" ({row['mode']})" if "mode" in row else ""
        facts = "; ".join(f"{k}: {_fmt(row.get(k))}" for k in keys if k in row)
        lines.append(f"- Happened{label}: {facts}.")
    lines += ["", f"Reproduce: `{command}`", ""]
    return lines


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, dict):
        return ", ".join(f"{k} {v}" for k, v in sorted(value.items())) or "none"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value) or "none"
    return str(value)


def render(records: Records, pytest_line: str, took: float, command: str) -> str:
    """The whole RELIABILITY.md for one run's records."""
    env = records["environment"][0]
    bindir = find_pg_bindir("15")
    pg15 = "not installed"
    if bindir is not None:
        pg15 = subprocess.run(
            [str(bindir / "postgres"), "--version"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    when = dt.datetime.fromtimestamp(env["at"], dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Reliability: fault drills",
        "",
        "Written by `python -m tests.drills.report` from the results of one run "
        "of the drills in `tests/drills/`; every figure below comes from that "
        "run. Real PostgreSQL, real worker processes.",
        "",
        f"- Run: {when}, {took / 60:.1f} min; pytest: `{pytest_line}`",
        f"- Command: `{command}`",
        f"- Session server (race, kills, terminate, freeze): PostgreSQL "
        f"{env['pg_version']} ({env['pg_source']}); dedicated servers (restart, "
        f"boot storm, network cut, passwords): {pg15}",
        f"- Machine: {env['cores']} cores, Linux {env['kernel']}, Python "
        f"{env['python']}",
        "",
    ]
    if records.get("race"):
        out += _race(records["race"])
    if records.get("sigkill"):
        out += _sigkill(records["sigkill"])
    out += _single(
        "pg_terminate_backend of the holder mid-migration",
        "the holder notices; nothing more is written through the dead session, "
        "and no other session of the holder runs DDL (it enters the gate again "
        "as a waiter: holder_sessions counts its sessions); another worker "
        "completes init; the dead run `abandoned`.",
        records.get("terminate", []),
        [
            "holder_error",
            "holder_sessions",
            "ddl_by_other_sessions",
            "outcomes",
            "statuses",
            "double_runs",
            "lost",
            "takeover_s",
        ],
        "python -m pytest -m slow tests/drills/test_holder_faults.py -k terminated",
    )
    out += _single(
        "Holder frozen with SIGSTOP",
        "waiters (wait_timeout 3 s) time out naming the holder; after SIGCONT "
        "the holder completes; nobody else runs a step.",
        records.get("sigstop", []),
        [
            "frozen_s",
            "waiter_errors",
            "waiter_message",
            "holder_outcome",
            "late_outcome",
            "statuses",
            "seed_bodies",
            "double_runs",
            "lost",
        ],
        "python -m pytest -m slow tests/drills/test_holder_faults.py -k frozen",
    )
    out += _single(
        "PostgreSQL restarted while 16 workers boot",
        "workers retry until INITGATE_CONNECT_TIMEOUT and all become ready, "
        "with one init: sessions lost at the restart enter the gate again.",
        records.get("restart", []),
        [
            "outcomes",
            "errors",
            "statuses",
            "down_s",
            "all_ready_s",
            "double_runs",
            "lost",
        ],
        "python -m pytest -m slow tests/drills/test_server_faults.py -k restart",
    )
    out += _single(
        "PostgreSQL not up yet when 16 workers start (up after 3 s)",
        "workers retry with backoff and jitter, then all become ready; one init.",
        records.get("not_up_yet", []),
        [
            "outcomes",
            "statuses",
            "retries",
            "most_attempts",
            "all_ready_after_up_s",
            "double_runs",
            "lost",
        ],
        "python -m pytest -m slow tests/drills/test_server_faults.py -k before",
    )
    out += _single(
        "Connect deadline (server down, INITGATE_CONNECT_TIMEOUT=2)",
        "a DatabaseUnavailableError in one line naming the variable, soon after "
        "the deadline.",
        records.get("connect_deadline", []),
        ["errors", "message", "gave_up_after"],
        "python -m pytest -m slow tests/drills/test_server_faults.py -k deadline",
    )
    out += _single(
        "Boot storm: 150 workers, max_connections=50",
        "'too many clients' retried, all 150 ready, one init, none passes "
        "before the commit.",
        records.get("boot_storm", []),
        [
            "outcomes",
            "statuses",
            "too_many_clients_retries",
            "all_ready_s",
            "passed_before_commit",
            "double_runs",
            "lost",
        ],
        "python -m pytest -m slow tests/drills/test_server_faults.py -k storm",
    )
    out += _single(
        "Network cut: the holder's namespace link goes down mid-migration",
        "the server frees the lock once TCP keepalives declare the peer dead "
        "(gate: idle 10 s, interval 5 s, count 3, so about 25 s after the last "
        "packet) and client_connection_check_interval (1 s) notices; a waiter "
        "takes over; nothing twice.",
        records.get("network_cut", []),
        [
            "freed_s",
            "takeover_s",
            "bound_s",
            "outcomes",
            "statuses",
            "holder_after_mend",
            "double_runs",
            "lost",
        ],
        "python -m pytest -m slow tests/drills/test_network_cut.py",
    )
    out += _single(
        "Secrets: the drill role's canary password",
        "never in any agent's output or events, CLI output, or stored row, "
        "neither plain nor percent-encoded.",
        records.get("secrets", []),
        ["files", "texts", "rows", "leaks", "encoded_leaks", "encoded_where"],
        "python -m pytest -m slow tests/drills",
    )
    return "\n".join(out).rstrip() + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run the drills (unless ``--from-results``) and write the report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--race-rounds", type=int, default=20)
    parser.add_argument("--kill-rounds", type=int, default=1)
    parser.add_argument("--output", type=Path, default=REPO_ROOT / "RELIABILITY.md")
    parser.add_argument("--from-results", type=Path)
    args = parser.parse_args(argv)

    command = (
        f"python -m tests.drills.report --race-rounds {args.race_rounds} "
        f"--kill-rounds {args.kill_rounds}"
    )
    if args.from_results:
        results, code, line, took = args.from_results, 0, "(not rerun)", 0.0
        line = (
            args.from_results.with_suffix(".pytest").read_text().strip()
            if args.from_results.with_suffix(".pytest").exists()
            else line
        )
    else:
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S")
        results = REPO_ROOT / "tests" / "drills" / "results" / f"report-{stamp}.jsonl"
        code, line, took = _run_drills(results, args.race_rounds, args.kill_rounds)
        results.with_suffix(".pytest").write_text(f"{line}\n{took}\n")
    args.output.write_text(render(_load(results), line.splitlines()[0], took, command))
    print(f"wrote {args.output} from {results} (pytest: {line.splitlines()[0]})")
    return code


if __name__ == "__main__":
    raise SystemExit(main())
