"""Race loop: 8 worker processes start the gate at once on a fresh database.

The processes live for the whole drill (a pool): each round they get a new
database, build a new gate, answer ``ready``, and are released together by
one ``go`` written to all of them. Rounds: ``INITGATE_DRILL_ROUNDS`` (20).

Rounds alternate between the gate's two drivers, asyncpg and psycopg. Per
round, counted outside the gate's bookkeeping: how many workers report
they ran init, how often each seed body executed (trace file), how often the
revisions' tables were created (DDL event trigger), what each worker saw
committed from a session of its own right after passing.
"""

from __future__ import annotations

import json
import os
import selectors
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from tests.conftest import PgServer
from tests.drills.conftest import SecretScan
from tests.drills.support import (
    SEEDS,
    DrillResults,
    agent_env,
    drill_project,
    round_rounds,
    seed_executions,
    summary,
)
from tests.helpers import REPO_ROOT, DatabaseAdmin, DdlLog, with_database

pytestmark = pytest.mark.slow

WORKERS = 8
DRIVERS = ("asyncpg", "psycopg")
TEMPLATE = "drill_race_template"
EXPECTED = (
    "per round: exactly one worker runs init, every seed body executes once, "
    "each revision's DDL is applied once, all 8 pass, none before the commit"
)


class Pool:
    """Worker processes running :func:`tests.drills.agent.pool`."""

    def __init__(self, count: int, workdir: Path) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = str(REPO_ROOT)
        env["PYTHONUNBUFFERED"] = "1"
        self.processes = []
        self.buffers: list[bytes] = []
        for index in range(count):
            with open(workdir / f"pool-{index}.err", "wb") as err:
                self.processes.append(
                    subprocess.Popen(
                        [sys.executable, "-m", "tests.drills.agent", "pool"],
                        cwd=REPO_ROOT,
                        env=env,
                        stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE,
                        stderr=err,
                        bufsize=0,
                    )
                )
            self.buffers.append(b"")

    def round(self, env: dict[str, str], timeout: float = 60.0) -> list[Any]:
        """Run one round; return each worker's result, in worker order."""
        job = (json.dumps(env) + "\n").encode()
        for process in self.processes:
            self._write(process, job)
        for index in range(len(self.processes)):
            line = self._readline(index, timeout)
            assert line == "ready", f"worker {index} said {line!r}"
        # One short write each: the 8 are released within microseconds.
        for process in self.processes:
            self._write(process, b"go\n")
        return [
            json.loads(self._readline(i, timeout)) for i in range(len(self.processes))
        ]

    def close(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)

    @staticmethod
    def _write(process: subprocess.Popen[bytes], data: bytes) -> None:
        assert process.stdin is not None
        process.stdin.write(data)
        process.stdin.flush()

    def _readline(self, index: int, timeout: float) -> str:
        process = self.processes[index]
        assert process.stdout is not None
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            while b"\n" not in self.buffers[index]:
                left = deadline - time.monotonic()
                if left <= 0 or process.poll() is not None:
                    raise AssertionError(
                        f"pool worker {index} gave no line within {timeout} s "
                        f"(exit {process.poll()})"
                    )
                if selector.select(left):
                    chunk = os.read(process.stdout.fileno(), 65536)
                    if not chunk:
                        continue  # EOF: poll() notices on the next turn.
                    self.buffers[index] += chunk
        line, _, rest = self.buffers[index].partition(b"\n")
        self.buffers[index] = rest
        return line.decode()


@pytest.fixture
def pool(tmp_path: Path, secret_scan: SecretScan) -> Iterator[Pool]:
    workers = Pool(WORKERS, tmp_path)
    secret_scan.add_path(tmp_path)
    yield workers
    workers.close()


async def _make_template(admin_url: str) -> None:
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE}" WITH (FORCE)')
        await conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
    finally:
        await conn.close()
    template = DatabaseAdmin(with_database(admin_url, TEMPLATE))
    # No drill pauses in the race: the second revision finds `resume`.
    await template.execute("CREATE TABLE resume (id int)")
    await DdlLog(template).install()


async def _check_round(
    db: DatabaseAdmin, reports: list[Any], trace: Path
) -> dict[str, Any]:
    """Everything a round must show, as counts; 0 is good for every "bad"."""
    outcomes = Counter(r.get("outcome", r.get("error_type")) for r in reports)
    seeds = seed_executions(trace)
    ddl = DdlLog(db)
    creates = {t: await ddl.count("CREATE TABLE", t) for t in ("items", "tags")}
    effects = Counter(
        r["name"] for r in await db.fetch("SELECT name FROM drill_seeded")
    )
    statuses = [r["status"] for r in await db.fetch("SELECT status FROM init_runs")]
    ran = outcomes.get("ran", 0)
    double = (
        max(ran - 1, 0)
        + sum(max(seeds[s] - 1, 0) for s in SEEDS)
        + sum(max(n - 1, 0) for n in creates.values())
        + max(len(statuses) - 1, 0)
    )
    lost = (
        sum(1 for s in SEEDS if effects[s] != 1)
        + sum(1 for n in creates.values() if n != 1)
        + (statuses != ["succeeded"])
    )
    early = sum(1 for r in reports if r.get("ok") and not r.get("committed_seen"))
    return {
        "outcomes": dict(outcomes),
        "failed": sum(1 for r in reports if not r.get("ok")),
        "double_runs": double,
        "lost": lost,
        "passed_before_commit": early,
        "seed_bodies": sum(seeds.values()),
        "errors": sorted({r["error"] for r in reports if not r.get("ok")})[:3],
    }


async def test_eight_racing_workers_init_each_fresh_database_exactly_once(
    pg_server: PgServer,
    pool: Pool,
    tmp_path: Path,
    drill_results: DrillResults,
) -> None:
    rounds = round_rounds("INITGATE_DRILL_ROUNDS", 20)
    project = drill_project(tmp_path / "project")
    await _make_template(pg_server.admin_url)
    admin = await asyncpg.connect(pg_server.admin_url)
    bad_rounds = []
    spans = []
    try:
        for number in range(rounds):
            name = f"race_{number}_{os.getpid()}"
            await admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE}"')
            url = with_database(pg_server.admin_url, name)
            trace = tmp_path / f"round-{number}.trace"
            env = agent_env(url, project, tmp_path, poll_interval=1.0)
            env.update(DRILL_TRACE=str(trace), DRILL_CHECK_COMMITTED="1")
            # Every other round on psycopg: the protocol is one, the drivers
            # under it are two.
            env["INITGATE_DRIVER"] = DRIVERS[number % len(DRIVERS)]
            reports = pool.round(env)
            figures = await _check_round(DatabaseAdmin(url), reports, trace)
            ends = [r.get("passed", r.get("failed", 0)) for r in reports]
            span = max(ends) - min(r["started"] for r in reports)
            spans.append(span)
            drill_results.record(
                "race",
                round=number,
                driver=env["INITGATE_DRIVER"],
                workers=WORKERS,
                all_passed_s=span,
                expected=EXPECTED,
                **figures,
            )
            if (
                figures["failed"]
                or figures["double_runs"]
                or figures["lost"]
                or (figures["passed_before_commit"])
            ):
                bad_rounds.append((number, figures))
            await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()

    print(f"{rounds} rounds of {WORKERS}: all passed in {summary(spans)}")
    assert not bad_rounds, bad_rounds[:5]
