"""PostgreSQL restarts, is not up yet, or runs out of connection slots.

Each drill owns a PostgreSQL 15 server (:mod:`tests.drills.servers`) that it
may stop and start; workers log in as the non-superuser ``drill`` role with
its SCRAM canary password, so these drills also feed the secret scan with
real authentication traffic and ledger rows.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import SpawnPython
from tests.drills.conftest import SecretScan
from tests.drills.servers import DrillPostgres, drill_postgres
from tests.drills.support import (
    AGENT,
    PRELOAD,
    DrillResults,
    Events,
    agent_env,
    agent_reports,
    drill_project,
    role_database,
    summary,
    wait_for,
)
from tests.helpers import DatabaseAdmin

pytestmark = pytest.mark.slow


@pytest.fixture
def server() -> Iterator[DrillPostgres]:
    with drill_postgres() as started:
        yield started


def _retries(events: Events) -> list[str]:
    return [e["msg"] for e in events.find("log", "not reachable yet")]


# Every session dies at the restart, the holder's included: workers enter
# the gate again on new sessions (after connect retries while the server is
# down), and the next holder marks the dead run abandoned.
@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_restart_while_16_workers_boot_ends_with_all_ready_and_one_init(
    mode: str,
    server: DrillPostgres,
    spawn_python: SpawnPython,
    tmp_path: Path,
    drill_results: DrillResults,
    secret_scan: SecretScan,
) -> None:
    secret_scan.add_path(tmp_path)
    name, url = await role_database(server)
    db = DatabaseAdmin(server.admin_url_for(name))
    events = Events(tmp_path / "workers.events")
    env = agent_env(
        url,
        drill_project(tmp_path / "p"),
        tmp_path,
        poll_interval=0.5,
        connect_timeout=60,
    )
    env["DRILL_EVENTS"] = str(events.path)
    herd = spawn_python(AGENT, n=16, env=env, preload=PRELOAD, ready_timeout=120)
    herd.release()
    await wait_for(
        lambda: db.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE '%pg_sleep(CASE%' "
            "AND state = 'active' AND pid <> pg_backend_pid()"
        ),
        60,
        "the holder's long statement",
    )
    await db.execute("CREATE TABLE resume (id int)")

    restarted_at = time.time()
    server.shutdown(mode)
    await asyncio.sleep(1.0)  # Down for a moment: workers see refused connects.
    server.launch()
    up_at = time.time()
    reports = agent_reports(herd, timeout=120)
    statuses = [r["status"] for r in await db.fetch("SELECT status FROM init_runs")]
    seeded = Counter(r["name"] for r in await db.fetch("SELECT name FROM drill_seeded"))
    await secret_scan.add_ledger(server.admin_url_for(name))

    outcomes = Counter(r.get("outcome", r.get("error_type")) for r in reports)
    ready = [r["passed"] - restarted_at for r in reports if r.get("ok")]
    errors = sorted({r["error"] for r in reports if not r.get("ok")})
    drill_results.record(
        "restart",
        mode=mode,
        workers=16,
        outcomes=dict(outcomes),
        statuses=statuses,
        effects=dict(seeded),
        down_s=up_at - restarted_at,
        all_ready_s=max(ready) if ready else None,
        retries=len(_retries(events)),
        errors=errors[:3],
        double_runs=max(outcomes.get("ran", 0) - 1, 0)
        + sum(max(n - 1, 0) for n in seeded.values()),
        lost=sum(1 for s in ("first", "last") if seeded[s] != 1),
    )
    assert not errors, errors
    assert outcomes["ran"] == 1, outcomes
    assert statuses.count("succeeded") == 1
    assert set(statuses) <= {"abandoned", "succeeded"}
    assert seeded == {"first": 1, "last": 1}


async def test_workers_started_before_postgresql_wait_for_it_then_init_once(
    spawn_python: SpawnPython,
    tmp_path: Path,
    drill_results: DrillResults,
    secret_scan: SecretScan,
) -> None:
    secret_scan.add_path(tmp_path)
    with drill_postgres() as server:
        name, url = await role_database(server)
        db = DatabaseAdmin(server.admin_url_for(name))
        await db.execute("CREATE TABLE resume (id int)")
        server.shutdown("fast")
        events = Events(tmp_path / "workers.events")
        env = agent_env(
            url, drill_project(tmp_path / "p"), tmp_path, connect_timeout=60
        )
        env["DRILL_EVENTS"] = str(events.path)
        herd = spawn_python(AGENT, n=16, env=env, preload=PRELOAD, ready_timeout=120)
        herd.release()
        await asyncio.sleep(3.0)
        server.launch()
        up_at = time.time()
        reports = agent_reports(herd, timeout=120)
        statuses = [r["status"] for r in await db.fetch("SELECT status FROM init_runs")]
        await secret_scan.add_ledger(server.admin_url_for(name))

    outcomes = Counter(r.get("outcome", r.get("error_type")) for r in reports)
    ready = [r["passed"] - up_at for r in reports if r.get("ok")]
    retries = _retries(events)
    attempts = [int(m.split("attempt ")[1].split(":")[0]) for m in retries]
    drill_results.record(
        "not_up_yet",
        workers=16,
        down_s=3.0,
        outcomes=dict(outcomes),
        statuses=statuses,
        retries=len(retries),
        all_ready_after_up_s=max(ready) if ready else None,
        most_attempts=max(attempts, default=0),
        double_runs=max(outcomes.get("ran", 0) - 1, 0),
        lost=0 if statuses == ["succeeded"] else 1,
    )
    assert outcomes["ran"] == 1, outcomes
    assert outcomes["ran"] + outcomes["waited"] + outcomes["up_to_date"] == 16
    assert statuses == ["succeeded"]
    assert len(retries) >= 16, "every worker should have retried at least once"


async def test_workers_give_up_after_the_connect_deadline_with_one_clear_line(
    spawn_python: SpawnPython,
    tmp_path: Path,
    drill_results: DrillResults,
    secret_scan: SecretScan,
) -> None:
    secret_scan.add_path(tmp_path)
    with drill_postgres() as server:
        _, url = await role_database(server)
        server.shutdown("fast")
        env = agent_env(url, None, tmp_path, connect_timeout=2)
        herd = spawn_python(AGENT, n=4, env=env, preload=PRELOAD)
        herd.release()
        reports = agent_reports(herd, timeout=60)
        server.launch()  # So that stop() at the end finds it running.

    took = [r["failed"] - r["started"] for r in reports]
    messages = sorted({r.get("error", "") for r in reports})
    drill_results.record(
        "connect_deadline",
        workers=4,
        connect_timeout_s=2,
        errors=sorted({r.get("error_type", "passed") for r in reports}),
        message=messages[0],
        gave_up_after=str(summary(took)),
    )
    assert all(r.get("error_type") == "DatabaseUnavailableError" for r in reports)
    assert all("INITGATE_CONNECT_TIMEOUT" in m and "\n" not in m for m in messages)
    assert all(1.9 < t < 10 for t in took), took


async def test_boot_storm_of_150_workers_beyond_max_connections_all_ready(
    spawn_python: SpawnPython,
    tmp_path: Path,
    drill_results: DrillResults,
    secret_scan: SecretScan,
) -> None:
    secret_scan.add_path(tmp_path)
    storm_dir = tmp_path / "storm"
    storm_dir.mkdir()
    with drill_postgres(settings={"max_connections": "50"}) as server:
        name, url = await role_database(server)
        db = DatabaseAdmin(server.admin_url_for(name))
        await db.execute("CREATE TABLE resume (id int)")
        env = agent_env(
            url, drill_project(tmp_path / "p"), tmp_path, connect_timeout=180
        )
        env["DRILL_CHECK_COMMITTED"] = "1"
        herd = spawn_python(
            f"from tests.drills.agent import storm\nstorm(150, {str(storm_dir)!r})\n",
            n=1,
            env=env,
            preload=PRELOAD,
        )
        released = time.time()
        herd.release()
        [parent] = herd.wait_all(timeout=240)
        statuses = [r["status"] for r in await db.fetch("SELECT status FROM init_runs")]
        seeded = Counter(
            r["name"] for r in await db.fetch("SELECT name FROM drill_seeded")
        )
        await secret_scan.add_ledger(server.admin_url_for(name))

    reports = [json.loads(p.read_text()) for p in storm_dir.glob("storm-*.json")]
    outcomes = Counter(r.get("outcome", r.get("error_type")) for r in reports)
    too_many = sum(
        len(Events(p).find("log", "TooManyConnectionsError"))
        for p in storm_dir.glob("storm-*.events")
    )
    ready = [r["passed"] - released for r in reports if r.get("ok")]
    drill_results.record(
        "boot_storm",
        workers=150,
        max_connections=50,
        outcomes=dict(outcomes),
        statuses=statuses,
        effects=dict(seeded),
        too_many_clients_retries=too_many,
        all_ready_s=max(ready) if ready else None,
        double_runs=max(outcomes.get("ran", 0) - 1, 0)
        + sum(max(n - 1, 0) for n in seeded.values()),
        lost=sum(1 for s in ("first", "last") if seeded[s] != 1),
        passed_before_commit=sum(1 for r in reports if not r.get("committed_seen")),
    )
    assert parent.returncode == 0, parent.describe()
    assert len(reports) == 150
    assert outcomes["ran"] == 1, outcomes
    assert outcomes["ran"] + outcomes["waited"] + outcomes["up_to_date"] == 150
    assert statuses == ["succeeded"]
    assert seeded == {"first": 1, "last": 1}
    assert too_many > 0, "the storm never hit max_connections: not a storm"
