"""One trial: a herd of workers released on one database, and what happened.

A trial ends when every worker is ready or has exited, at the time cap, or
when nothing has moved for the stall limit (no worker finished, no revision
started). What it returns is a plain dict, JSON-ready: times in seconds or
milliseconds since the release, counts, and the evidence behind an outcome
(errors, what sessions were waiting on).
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg

from bench import connections, postgres
from bench.herd import Barrier, Herd
from bench.strategies import Strategy
from bench.worker import WorkerSpec
from bench.workload import Workload

__all__ = ["Trial", "percentile", "run_trial"]


@dataclasses.dataclass
class Trial:
    """What to run: a strategy's herd of ``n`` workers on one database.

    Attributes:
        scenario: ``cold``, ``warm``, ``rolling`` or ``baseline``.
        strategy: The strategy the workers boot.
        n: How many workers.
        database_url: The trial's database (fresh, or prepared by the caller).
        project: Root of the Alembic project the workers use.
        workload: What the project contains.
        workdir: Where traces and worker logs go.
        cap: Seconds after the release at which the trial is cut off.
        stall: Seconds without progress after which it is cut off.
        worker_url: URL the workers connect to, when not ``database_url``
            (the round-trip proxy).
        variant: What sets this trial apart from the strategy's usual one,
            for the report (empty when nothing does).
        params: The strategy's settings; its defaults when None.
    """

    scenario: str
    strategy: Strategy
    n: int
    database_url: str
    project: Path
    workload: Workload
    workdir: Path
    cap: float
    stall: float
    worker_url: str | None = None
    params: dict[str, float] | None = None
    variant: str = ""

    @property
    def database(self) -> str:
        """The database's name."""
        return self.database_url.split("?")[0].rsplit("/", 1)[-1]


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (``q`` in 0..100), None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


# CPU seconds the herd must use during a stall window to count as busy: well
# above what idle waiters polling once a second use, far below real work.
_BUSY_CPU_SECONDS = 0.5


def run_trial(server: postgres.Server, trial: Trial) -> dict[str, Any]:
    """Run ``trial`` and return its record (see the module docstring)."""
    trial.workdir.mkdir(parents=True, exist_ok=True)
    trace = trial.workdir / "trace"
    trace.touch()
    params = dict(trial.strategy.params if trial.params is None else trial.params)
    specs = [
        WorkerSpec(
            index=i,
            role="worker",
            module=trial.strategy.module,
            database_url=trial.worker_url or trial.database_url,
            alembic_ini=str(trial.project / "alembic.ini"),
            seed_rows=trial.workload.seed_rows,
            params=params,
            trace_path=str(trace),
            go_path=str(trial.workdir / "go"),
            linger_path=str(trial.workdir / "linger"),
            stop_path=str(trial.workdir / "stop"),
            log_path=str(trial.workdir / f"worker-{i}.log"),
        )
        for i in range(trial.n)
    ]
    go = Barrier(trial.workdir / "go")
    linger = Barrier(trial.workdir / "linger")
    log: connections.ServerLog | None = None
    watcher: connections.ConnectionSampler | None = None
    with Herd(specs, go, linger) as herd:
        early = herd.start(timeout=120)
        if server.log_path is not None:
            log = connections.ServerLog(server.log_path, trial.database)
        else:
            watcher = connections.ConnectionSampler(server.admin_url, trial.database)
            watcher.begin()
        try:
            released = herd.release()
            run = _watch(server, trial, herd, trace, released, early)
            if run["ended"] == "finished" and run["ready"]:
                # A moment for closes in flight, then count what the ready
                # workers still hold while they linger.
                time.sleep(0.2)
            run["held"] = connections.count_worker_connections(
                server.admin_url, trial.database
            )
        finally:
            if watcher is not None:
                watcher.stop()
        counts = log.counts() if log is not None else None
        # Workers cut off mid-boot never reach the linger barrier: no
        # point waiting for them to exit by themselves.
        herd.finish(timeout=10 if run["ended"] == "finished" else 0)
    facts = _database_facts(trial.database_url, trial.workload)
    if counts is None:
        counts = watcher.counts() if watcher is not None else None
    return _record(trial, params, run, facts, counts, trace, released)


def _watch(
    server: postgres.Server,
    trial: Trial,
    herd: Herd,
    trace: Path,
    released: float,
    early: list[dict[str, Any]],
) -> dict[str, Any]:
    ready: dict[int, dict[str, Any]] = {}
    crashed: dict[int, dict[str, Any]] = {}
    for event in early:
        if event["event"] == "crashed":
            crashed[event["index"]] = event
    started = time.monotonic()
    last_progress = started
    # The herd's CPU time, read at most once a second, first after the last
    # progress: a stall is judged on what the workers did since then.
    cpu_mark, cpu_mark_at = herd.cpu_seconds(), started
    trace_size = 0
    ended = "finished"
    evidence: list[str] = []
    while True:
        for event in herd.drain(0.05):
            last_progress = time.monotonic()
            if event["event"] == "ready":
                ready[event["index"]] = event
            elif event["event"] == "crashed":
                crashed[event["index"]] = event
        size = trace.stat().st_size
        if size != trace_size:
            trace_size = size
            last_progress = time.monotonic()
        codes = herd.exit_codes()
        if all(i in ready or code is not None for i, code in enumerate(codes)):
            # Crash reports may still be in flight behind the exits.
            unreported = {i for i, c in enumerate(codes) if c is not None} - set(
                crashed
            )
            for event in herd.drain(0.5) if unreported else ():
                if event["event"] == "crashed":
                    crashed[event["index"]] = event
                    unreported.discard(event["index"])
                    if not unreported:
                        break
            break
        now = time.monotonic()
        if cpu_mark_at < last_progress and now - cpu_mark_at >= 1.0:
            cpu_mark, cpu_mark_at = herd.cpu_seconds(), now
        if now - started > trial.cap:
            ended = "capped"
        elif now - last_progress > trial.stall:
            # Workers starved of CPU (a busy machine, 128 of them on 2
            # cores) report nothing for a while but keep computing; only
            # workers that also sit idle are stuck.
            cpu = herd.cpu_seconds()
            if cpu - cpu_mark > _BUSY_CPU_SECONDS:
                last_progress = now
                cpu_mark, cpu_mark_at = cpu, now
                continue
            ended = "stalled"
        else:
            continue
        evidence = connections.wait_snapshot(server.admin_url, trial.database)
        break
    codes = herd.exit_codes()
    died = [
        i
        for i, code in enumerate(codes)
        if code is not None and i not in ready and i not in crashed
    ]
    return {
        "ready": ready,
        "crashed": crashed,
        "died": {i: codes[i] for i in died},
        "ended": ended,
        "evidence": evidence,
        "watched_s": time.monotonic() - started,
    }


def _database_facts(url: str, workload: Workload) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    with psycopg.connect(url, autocommit=True) as conn:

        def value(sql: str) -> Any:
            row = conn.execute(sql).fetchone()
            return row[0] if row else None

        if value(f"SELECT to_regclass('public.{postgres.DDL_LOG_TABLE}')"):
            facts["tables_created"] = value(
                f"SELECT count(*) FROM public.{postgres.DDL_LOG_TABLE} "
                "WHERE command_tag = 'CREATE TABLE' "
                "AND object_identity ~ '^public\\.t[0-9]+$'"
            )
        if value("SELECT to_regclass('public.t01')"):
            facts["seed_rows"] = value("SELECT count(*) FROM t01")
        facts["invalid_indexes"] = value(
            "SELECT count(*) FROM pg_index WHERE NOT indisvalid"
        )
        if value("SELECT to_regclass('public.alembic_version')"):
            facts["alembic_version"] = value(
                "SELECT string_agg(version_num, ',') FROM alembic_version"
            )
        if value("SELECT to_regclass('public.init_runs')"):
            rows = conn.execute(
                "SELECT status, extract(epoch FROM started_at)::float8,"
                " extract(epoch FROM finished_at)::float8"
                " FROM init_runs ORDER BY id"
            ).fetchall()
            facts["init_runs"] = [
                {"status": s, "started_at": a, "finished_at": b} for s, a, b in rows
            ]
    return facts


def _trace_counts(trace: Path) -> tuple[collections.Counter[str], dict[str, set[int]]]:
    """How often each revision (and the seed) ran, and by which pids."""
    counts: collections.Counter[str] = collections.Counter()
    pids: dict[str, set[int]] = collections.defaultdict(set)
    for line in trace.read_text().splitlines():
        name, _, pid = line.partition(" ")
        counts[name] += 1
        pids[name].add(int(pid))
    return counts, pids


def _record(
    trial: Trial,
    params: dict[str, float],
    run: dict[str, Any],
    facts: dict[str, Any],
    counts: connections.ConnectionCounts | None,
    trace: Path,
    released: float,
) -> dict[str, Any]:
    ready: dict[int, dict[str, Any]] = run["ready"]
    crashed: dict[int, dict[str, Any]] = run["crashed"]
    runs, pids = _trace_counts(trace)
    head = trial.workload.head if trial.scenario != "rolling" else "r_rolling"
    first = trial.workload.first if trial.scenario != "rolling" else "r_rolling"

    offsets = sorted((e["ready_at"] - released) for e in ready.values())
    holder_commit, holder_ms, ran_pids = _holder(facts, ready, pids.get(head, set()))
    holder_start = (
        holder_commit - holder_ms / 1000
        if holder_commit is not None and holder_ms is not None
        else None
    )
    wake = [
        (e["ready_at"] - holder_commit) * 1000
        for e in ready.values()
        if holder_commit is not None
        and e["pid"] not in ran_pids
        and trial.scenario in ("cold", "rolling")
    ]
    errors = collections.Counter(_error_kind(e["error"]) for e in crashed.values())
    all_ready = len(ready) == trial.n
    record: dict[str, Any] = {
        "scenario": trial.scenario,
        "strategy": trial.strategy.name,
        "n": trial.n,
        "workload": "cic" if trial.workload.concurrent_index else "no_cic",
        "variant": trial.variant,
        "params": params,
        "ended": run["ended"],
        "ready": len(ready),
        "crashed": len(crashed),
        "died": len(run["died"]),
        "all_ready_s": _round(offsets[-1], 4) if all_ready and offsets else None,
        "first_ready_s": _round(offsets[0], 4) if offsets else None,
        "last_ready_s": _round(offsets[-1], 4) if offsets else None,
        "watched_s": _round(run["watched_s"], 2),
        "ready_offsets_ms": [round(o * 1000) for o in offsets],
        "boot_ms": _summary([e["boot_ms"] for e in ready.values()]),
        "wake_ms": _summary(wake, p99=True) if wake else None,
        "migration_ms": _round(holder_ms, 1),
        # When the holder began (initgate: its run row) and committed, both
        # from the release: the rest of "all ready" is before and after.
        "holder_started_s": _round(
            holder_start - released if holder_start is not None else None, 4
        ),
        "holder_committed_s": _round(
            holder_commit - released if holder_commit is not None else None, 4
        ),
        "migrations_started": len(pids.get(first, set())),
        "migrations_completed": len(pids.get(head, set())),
        "seed_runs": runs.get("seed", 0),
        "tables_created": facts.get("tables_created"),
        "seed_rows": facts.get("seed_rows"),
        "invalid_indexes": facts.get("invalid_indexes"),
        "alembic_version": facts.get("alembic_version"),
        "peak_connections": counts.peak if counts else None,
        "max_connections_per_worker": (
            max(counts.per_worker_peak.values(), default=0) if counts else None
        ),
        "max_connections_opened_per_worker": (
            max(counts.opened.values(), default=0) if counts and counts.exact else None
        ),
        "connections_exact": counts.exact if counts else None,
        # Only meaningful once every worker has finished booting.
        "held_after_ready": run["held"] if run["ended"] == "finished" else None,
        "errors": dict(errors.most_common(3)),
        "evidence": run["evidence"],
        "outcomes": dict(
            collections.Counter(e["info"].get("outcome", "-") for e in ready.values())
        ),
    }
    if "init_runs" in facts:
        record["init_runs"] = collections.Counter(
            r["status"] for r in facts["init_runs"]
        )
    return record


def _holder(
    facts: dict[str, Any], ready: dict[int, dict[str, Any]], head_pids: set[int]
) -> tuple[float | None, float | None, set[int]]:
    """When the holder's work was committed, how long it took, who ran it.

    For initgate the ledger says (``finished_at`` of the succeeded run);
    for the others, the earliest commit among workers that ran the last
    revision themselves.
    """
    runs = [r for r in facts.get("init_runs", []) if r["status"] == "succeeded"]
    ran = {e["pid"] for e in ready.values() if e["info"].get("outcome") == "ran"}
    if runs and runs[-1]["finished_at"] is not None:
        run = runs[-1]
        return run["finished_at"], (run["finished_at"] - run["started_at"]) * 1000, ran
    commits = [
        (e["commit_at"], e["init_ms"])
        for e in ready.values()
        if e["pid"] in head_pids and e["commit_at"] is not None
    ]
    if not commits:
        return None, None, head_pids
    commit_at, init_ms = min(commits)
    return commit_at, init_ms, head_pids


def _summary(values: list[float], p99: bool = False) -> dict[str, Any] | None:
    if not values:
        return None
    out: dict[str, Any] = {
        "n": len(values),
        "p50": _round(statistics.median(values), 2),
        "max": _round(max(values), 2),
    }
    if p99:
        out["p99"] = _round(percentile(values, 99), 2)
    return out


def _error_kind(error: str) -> str:
    # Messages differ by object name and pid; the first words tell the kind.
    return " ".join(error.split()[:8])[:120]


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
