"""The holder dies, loses its session or freezes: nothing twice, nothing lost.

Each drill starts a holder process that stops at a checkpoint (see
:data:`tests.drills.agent.CHECKPOINTS`), three waiter processes that queue
behind it, then hurts the holder: SIGKILL, ``pg_terminate_backend`` or
SIGSTOP. Times are wall-clock, from the moment of the fault:

- *freed*: the dead holder's backend no longer holds the lock (the drill
  polls ``pg_locks`` every 5 ms);
- *takeover*: a waiter logged "took the init lock";
- *ready*: the first waiter passed the gate.

Rounds per case: ``INITGATE_DRILL_KILL_ROUNDS`` (1).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import PgServer, SpawnPython
from tests.drills.conftest import SecretScan
from tests.drills.support import (
    AGENT,
    HEAD,
    PRELOAD,
    DrillResults,
    Events,
    agent_env,
    agent_reports,
    drill_project,
    drop_database,
    fresh_database,
    lock_holders,
    round_rounds,
    seed_executions,
    wait_for,
)
from tests.helpers import DatabaseAdmin, DdlLog, RoundTripProxy, with_database
from tests.project import Project

pytestmark = pytest.mark.slow

KILL_ROUNDS = round_rounds("INITGATE_DRILL_KILL_ROUNDS", 1)
WAITERS = 3

PHASES = {
    "after_lock": "after_lock",
    "after_running_row": "after_running_row",
    "in_long_migration": None,  # the statement sleeps; found in pg_stat_activity
    "between_migrations": "between_migrations",
    "in_seed": "in_seed:last",
    "before_succeeded": "before_succeeded",
}


class Drill:
    """One round: a fresh database, a holder, waiters, and what they left."""

    def __init__(
        self,
        pg_server: PgServer,
        spawn_python: SpawnPython,
        workdir: Path,
        project: Project,
    ) -> None:
        self.pg_server = pg_server
        self.spawn_python = spawn_python
        self.workdir = workdir
        self.project = project
        self.holder_events = Events(workdir / "holder.events")
        self.waiter_events = Events(workdir / "waiters.events")

    async def setup(self, *, resume: bool) -> None:
        self.name = await fresh_database(self.pg_server.admin_url)
        self.url = with_database(self.pg_server.admin_url, self.name)
        self.db = DatabaseAdmin(self.url)
        if resume:
            await self.db.execute("CREATE TABLE resume (id int)")

    def spawn(
        self,
        pause_at: str | None,
        *,
        holder_url: str | None = None,
        pause_seconds: float = 300,
        **settings: Any,
    ) -> None:
        base = agent_env(self.url, self.project, self.workdir, **settings)
        holder_env = dict(
            base,
            DRILL_EVENTS=str(self.holder_events.path),
            DRILL_PAUSE_SECONDS=str(pause_seconds),
        )
        if holder_url:
            holder_env["INITGATE_DATABASE_URL"] = holder_url
        if pause_at:
            holder_env["DRILL_PAUSE_AT"] = pause_at
        self.holder = self.spawn_python(AGENT, n=1, env=holder_env, preload=PRELOAD)
        self.waiters = self.spawn_python(
            AGENT,
            n=WAITERS,
            env=dict(base, DRILL_EVENTS=str(self.waiter_events.path)),
            preload=PRELOAD,
        )

    async def holder_reaches(self, pause_at: str | None) -> int:
        """Release the holder, wait for its checkpoint; return its backend pid."""
        self.holder.release()
        if pause_at is None:
            await wait_for(
                lambda: self.db.fetchval(
                    "SELECT pid FROM pg_stat_activity WHERE state = 'active' "
                    "AND query LIKE '%pg_sleep(CASE%' AND pid <> pg_backend_pid()"
                ),
                60,
                "the holder's long statement",
            )
        else:
            await wait_for(
                lambda: self.holder_events.find("paused"), 60, f"checkpoint {pause_at}"
            )
        conn = await asyncpg.connect(self.url)
        try:
            [backend] = await lock_holders(conn)
        finally:
            await conn.close()
        return backend

    async def waiters_queue(self) -> None:
        self.waiters.release()
        await wait_for(
            lambda: (
                len(self.waiter_events.find("log", "held by another worker")) >= WAITERS
            ),
            60,
            "every waiter to queue",
        )

    async def watch_lock_freed(self, backend: int, since: float) -> float:
        """Seconds from ``since`` until ``backend`` no longer holds the lock."""
        conn = await asyncpg.connect(self.url)
        try:
            while backend in await lock_holders(conn):
                await asyncio.sleep(0.005)
            return time.time() - since
        finally:
            await conn.close()

    def takeover_after(self, since: float) -> float | None:
        taken = self.waiter_events.find("log", "took the init lock")
        return min(e["t"] for e in taken) - since if taken else None

    async def ledger_checks(self) -> dict[str, Any]:
        """What init left: counts where anything but the expected is bad."""
        db = self.db
        ddl = DdlLog(db)
        tables = ("items", "drill_seeded", "first_half", "second_half", "tags")
        creates = {t: await ddl.count("CREATE TABLE", t) for t in tables}
        present = {
            t: await db.fetchval("SELECT to_regclass($1) IS NOT NULL", t)
            for t in tables
        }
        version = [
            r["version_num"]
            for r in await db.fetch("SELECT version_num FROM alembic_version")
        ]
        effects = Counter(
            r["name"] for r in await db.fetch("SELECT name FROM drill_seeded")
        )
        seed_rows = Counter(
            r["name"]
            for r in await db.fetch(
                "SELECT name FROM init_steps WHERE kind = 'seed' "
                "AND status = 'succeeded'"
            )
        )
        statuses = [
            r["status"]
            for r in await db.fetch("SELECT status FROM init_runs ORDER BY id")
        ]
        half = (present["first_half"] != present["second_half"]) + sum(
            1 for t in tables if not present[t]
        )
        return {
            "statuses": statuses,
            "version": version,
            "creates": creates,
            "effects": dict(effects),
            "seed_rows": dict(seed_rows),
            "seed_bodies": dict(seed_executions(self.workdir / "seeds.trace")),
            "double_runs": sum(max(n - 1, 0) for n in creates.values())
            + sum(max(n - 1, 0) for n in effects.values())
            + sum(max(n - 1, 0) for n in seed_rows.values()),
            "lost": half
            + (version != [HEAD])
            + sum(1 for s in ("first", "last") if effects[s] != 1),
        }

    async def teardown(self) -> None:
        self.holder.kill()
        self.waiters.kill()
        await drop_database(self.pg_server.admin_url, self.name)


async def _phase_state(db: DatabaseAdmin, phase: str) -> str:
    """What is committed while the holder sits at ``phase``, in words."""
    runs = (
        await db.fetchval("SELECT string_agg(status, ',') FROM init_runs")
        if await db.fetchval("SELECT to_regclass('init_runs')")
        else None
    )
    version = (
        await db.fetchval("SELECT string_agg(version_num, ',') FROM alembic_version")
        if await db.fetchval("SELECT to_regclass('alembic_version')")
        else None
    )
    seeded = (
        await db.fetchval("SELECT string_agg(name, ',') FROM drill_seeded")
        if await db.fetchval("SELECT to_regclass('drill_seeded')")
        else None
    )
    return f"runs={runs} version={version} seeded={seeded}"


# What a fresh session sees while the holder sits at each phase.
EXPECTED_STATE = {
    "after_lock": "runs=None version=None seeded=None",
    "after_running_row": "runs=running version=None seeded=None",
    "in_long_migration": "runs=running version=r1_items seeded=None",
    "between_migrations": "runs=running version=r1_items seeded=None",
    "in_seed": "runs=running version=r3_tags seeded=first",
    "before_succeeded": "runs=running version=r3_tags seeded=first,last",
}


@pytest.mark.parametrize("poll_interval", [1.0, 0.2])
@pytest.mark.parametrize("phase", list(PHASES))
async def test_sigkilled_holder_is_taken_over_without_running_anything_twice(
    phase: str,
    poll_interval: float,
    pg_server: PgServer,
    spawn_python: SpawnPython,
    tmp_path: Path,
    drill_results: DrillResults,
    secret_scan: SecretScan,
) -> None:
    secret_scan.add_path(tmp_path)
    project = drill_project(tmp_path / "project")
    pause_at = PHASES[phase]
    problems = []
    for number in range(KILL_ROUNDS):
        workdir = tmp_path / f"round-{number}"
        workdir.mkdir()
        drill = Drill(pg_server, spawn_python, workdir, project)
        await drill.setup(resume=phase != "in_long_migration")
        try:
            drill.spawn(pause_at, poll_interval=poll_interval)
            backend = await drill.holder_reaches(pause_at)
            state = await _phase_state(drill.db, phase)
            await drill.waiters_queue()
            if phase == "in_long_migration":
                # The dying statement already sleeps; its successor must not.
                await drill.db.execute("CREATE TABLE resume (id int)")

            os.killpg(drill.holder.processes[0].pid, signal.SIGKILL)
            killed_at = time.time()
            freed = await asyncio.wait_for(
                drill.watch_lock_freed(backend, killed_at), 30
            )
            reports = agent_reports(drill.waiters, timeout=60)
            figures = await drill.ledger_checks()
        finally:
            await drill.teardown()

        outcomes = Counter(r.get("outcome", r.get("error_type")) for r in reports)
        passed = [r["passed"] for r in reports if r.get("ok")]
        figures.update(
            phase=phase,
            poll_interval=poll_interval,
            round=number,
            state_at_kill=state,
            outcomes=dict(outcomes),
            freed_s=freed,
            takeover_s=drill.takeover_after(killed_at),
            ready_s=min(passed) - killed_at if passed else None,
        )
        drill_results.record("sigkill", **figures)
        expected_bodies = {"first": 1, "last": 2 if phase == "in_seed" else 1}
        checks = {
            "state": state == EXPECTED_STATE[phase],
            "outcomes": outcomes == {"ran": 1, "waited": WAITERS - 1},
            # Killed before its run row, the holder leaves nothing to abandon.
            "statuses": figures["statuses"]
            == (["succeeded"] if phase == "after_lock" else ["abandoned", "succeeded"]),
            "double": figures["double_runs"] == 0,
            "lost": figures["lost"] == 0,
            "bodies": figures["seed_bodies"] == expected_bodies,
            # Generous: about check interval + poll interval, on a busy CI box.
            "takeover": (figures["takeover_s"] or 99) < 2 * poll_interval + 3,
        }
        if not all(checks.values()):
            problems.append(
                (number, [k for k, ok in checks.items() if not ok], figures)
            )
    assert not problems, problems


async def test_terminated_backend_holder_fails_cleanly_and_writes_nothing_more(
    pg_server: PgServer,
    spawn_python: SpawnPython,
    tmp_path: Path,
    round_trip_proxy: RoundTripProxy,
    drill_results: DrillResults,
    secret_scan: SecretScan,
) -> None:
    secret_scan.add_path(tmp_path)
    drill = Drill(pg_server, spawn_python, tmp_path, drill_project(tmp_path / "p"))
    await drill.setup(resume=False)
    try:
        # Only the holder goes through the proxy: every session it opens,
        # before or after the fault, is counted there.
        drill.spawn(
            None,
            holder_url=round_trip_proxy.url_for(drill.name),
            poll_interval=0.2,
        )
        backend = await drill.holder_reaches(None)
        await drill.waiters_queue()
        await drill.db.execute("CREATE TABLE resume (id int)")

        await drill.db.fetchval("SELECT pg_terminate_backend($1)", backend)
        terminated_at = time.time()
        [holder] = agent_reports(drill.holder, timeout=60)
        reports = agent_reports(drill.waiters, timeout=60)
        figures = await drill.ledger_checks()
        later_ddl = await drill.db.fetchval(
            "SELECT count(*) FROM test_ddl_log WHERE backend_pid = $1", backend
        )
        new_backend = await drill.db.fetchval(
            "SELECT backend_pid FROM init_runs WHERE status = 'succeeded'"
        )
        foreign_ddl = await drill.db.fetchval(
            "SELECT count(*) FROM test_ddl_log WHERE backend_pid NOT IN ($1, $2) "
            "AND object_identity <> 'public.resume'",
            backend,
            new_backend,
        )
    finally:
        await drill.teardown()

    sessions = [s for s in round_trip_proxy.sessions if s.database == drill.name]
    outcomes = Counter(r.get("outcome", r.get("error_type")) for r in reports)
    figures.update(
        holder_error=f"{holder.get('error_type')}: {holder.get('error')}",
        holder_sessions=len(sessions),
        holder_failed_s=holder.get("failed", 0) - terminated_at,
        ddl_by_dead_backend=later_ddl,
        ddl_by_other_sessions=foreign_ddl,
        outcomes=dict(outcomes),
        takeover_s=drill.takeover_after(terminated_at),
    )
    drill_results.record("terminate", **figures)
    if holder["ok"]:
        # Entered the gate again on a new session, as a fresh worker would.
        assert holder["outcome"] in ("waited", "up_to_date", "ran"), holder
    else:
        # Gave up: one line, and no session of its own after the fault.
        assert "\n" not in holder["error"]
        assert len(sessions) == 1, "the holder opened another session"
    assert foreign_ddl == 0
    # The dead run was closed by the next holder, not by the dead one.
    assert figures["statuses"] == ["abandoned", "succeeded"]
    everyone = Counter({**outcomes})
    if holder.get("ok"):
        everyone[holder["outcome"]] += 1
    assert everyone["ran"] == 1, (outcomes, holder)
    assert figures["double_runs"] == 0
    assert figures["lost"] == 0


async def test_frozen_holder_makes_waiters_time_out_naming_it_then_completes(
    pg_server: PgServer,
    spawn_python: SpawnPython,
    tmp_path: Path,
    drill_results: DrillResults,
    secret_scan: SecretScan,
) -> None:
    secret_scan.add_path(tmp_path)
    drill = Drill(pg_server, spawn_python, tmp_path, drill_project(tmp_path / "p"))
    await drill.setup(resume=True)
    try:
        drill.spawn(
            "in_seed:first",
            pause_seconds=1,
            poll_interval=0.2,
            wait_timeout=3,
            long_wait_warning=1,
        )
        drill.holder.release()
        await wait_for(lambda: drill.holder_events.find("paused"), 60, "the holder")
        holder_pid = drill.holder.processes[0].pid
        os.killpg(holder_pid, signal.SIGSTOP)
        stopped_at = time.time()
        drill.waiters.release()
        reports = agent_reports(drill.waiters, timeout=60)
        frozen_for = time.time() - stopped_at
        os.killpg(holder_pid, signal.SIGCONT)
        [holder] = agent_reports(drill.holder, timeout=60)
        late = spawn_python(
            AGENT,
            n=1,
            env=agent_env(drill.url, drill.project, tmp_path),
            preload=PRELOAD,
        )
        late.release()
        [after] = agent_reports(late, timeout=60)
        figures = await drill.ledger_checks()
    finally:
        await drill.teardown()

    errors = [r.get("error", "") for r in reports]
    figures.update(
        frozen_s=frozen_for,
        waiter_errors=sorted({r.get("error_type", "passed") for r in reports}),
        waiter_message=errors[0],
        holder_outcome=holder.get("outcome", holder.get("error_type")),
        late_outcome=after.get("outcome"),
    )
    drill_results.record("sigstop", **figures)
    assert all(r.get("error_type") == "WaitTimeoutError" for r in reports), reports
    assert all(f"pid {holder_pid}" in e for e in errors), errors
    assert all("INITGATE_WAIT_TIMEOUT" in e and "\n" not in e for e in errors)
    assert holder.get("outcome") == "ran", holder
    assert after.get("outcome") == "up_to_date"
    assert figures["statuses"] == ["succeeded"]
    assert figures["seed_bodies"] == {"first": 1, "last": 1}
    assert figures["double_runs"] == 0
    assert figures["lost"] == 0
