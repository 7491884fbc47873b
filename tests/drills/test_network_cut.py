"""Network cut: the holder's host loses its link mid-migration.

The holder runs in a network namespace this drill makes (a veth pair, the
holder's end at 198.18.<n>.2, the host's at 198.18.<n>.1: the benchmarking
range, never routed anywhere). A PostgreSQL 15 of the drill's own listens on
the host's end; the waiters connect over loopback. With the holder inside a
long statement, the drill takes the namespace's link down: packets are lost
silently, nothing closes the connection.

What frees the lock is the server noticing that the client is gone. Nothing
is sent while the statement runs, so only TCP keepalives can tell: the gate
sets ``tcp_keepalives_idle=10``, ``tcp_keepalives_interval=5`` and
``tcp_keepalives_count=3`` on its session, so the kernel declares the peer
dead about 10 + 3 x 5 = 25 s after the last packet, and
``client_connection_check_interval`` (1 s) makes the busy backend notice
within a second of that. The drill measures the whole chain.

Needs root and ``ip`` (iproute2); skips saying why otherwise.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.conftest import SpawnPython
from tests.drills.conftest import SecretScan
from tests.drills.servers import CANARY, DrillPostgres, drill_postgres
from tests.drills.support import (
    AGENT,
    PRELOAD,
    DrillResults,
    Events,
    agent_env,
    drill_project,
    lock_holders,
    role_database,
    wait_for,
)
from tests.helpers import DatabaseAdmin

pytestmark = pytest.mark.slow

KEEPALIVE_BOUND_S = 10 + 3 * 5 + 1
"""Idle + count x interval + the check interval, from the gate's settings."""


class Namespace:
    """A network namespace joined to the host by a veth pair."""

    def __init__(self) -> None:
        tag = os.getpid() % 250
        self.name = f"igdrill{os.getpid()}"
        self.host_if = f"igh{os.getpid() % 100000}"
        self.ns_if = f"ign{os.getpid() % 100000}"
        self.host_addr = f"198.18.{tag}.1"
        self.ns_addr = f"198.18.{tag}.2"

    def create(self) -> None:
        steps = [
            ["ip", "netns", "add", self.name],
            [
                "ip",
                "link",
                "add",
                self.host_if,
                "type",
                "veth",
                "peer",
                "name",
                self.ns_if,
            ],
            ["ip", "link", "set", self.ns_if, "netns", self.name],
            ["ip", "addr", "add", f"{self.host_addr}/30", "dev", self.host_if],
            ["ip", "link", "set", self.host_if, "up"],
            *self.inside(
                ["ip", "addr", "add", f"{self.ns_addr}/30", "dev", self.ns_if]
            ),
            *self.inside(["ip", "link", "set", self.ns_if, "up"]),
            *self.inside(["ip", "link", "set", "lo", "up"]),
        ]
        for step in steps:
            subprocess.run(step, check=True, capture_output=True, text=True)

    def inside(self, command: list[str]) -> list[list[str]]:
        return [["ip", "netns", "exec", self.name, *command]]

    def cut(self) -> None:
        for step in self.inside(["ip", "link", "set", self.ns_if, "down"]):
            subprocess.run(step, check=True, capture_output=True)

    def mend(self) -> None:
        for step in self.inside(["ip", "link", "set", self.ns_if, "up"]):
            subprocess.run(step, check=True, capture_output=True)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)
        subprocess.run(["ip", "link", "del", self.host_if], capture_output=True)


@pytest.fixture
def namespace() -> Iterator[Namespace]:
    if os.geteuid() != 0:
        pytest.skip("making a network namespace needs root")
    if shutil.which("ip") is None:
        pytest.skip("needs `ip` from iproute2 (apt-get install iproute2)")
    made = Namespace()
    try:
        made.create()
    except subprocess.CalledProcessError as exc:
        made.delete()
        pytest.skip(f"cannot make a network namespace here: {exc.stderr.strip()}")
    yield made
    made.delete()


@pytest.fixture
def server(namespace: Namespace) -> Iterator[DrillPostgres]:
    with drill_postgres(listen=[namespace.host_addr]) as started:
        yield started


async def test_holder_cut_off_mid_migration_frees_the_lock_within_the_keepalive_bound(
    namespace: Namespace,
    server: DrillPostgres,
    spawn_python: SpawnPython,
    tmp_path: Path,
    drill_results: DrillResults,
    secret_scan: SecretScan,
) -> None:
    secret_scan.add_path(tmp_path)
    name, local_url = await role_database(server)
    db = DatabaseAdmin(server.admin_url_for(name))
    project = drill_project(tmp_path / "p")
    remote_url = local_url.replace("@127.0.0.1:", f"@{namespace.host_addr}:")
    assert CANARY not in remote_url  # quoted, as in any real URL
    holder_events = Events(tmp_path / "holder.events")
    waiter_events = Events(tmp_path / "waiters.events")
    base = agent_env(local_url, project, tmp_path, poll_interval=0.2)
    holder = spawn_python(
        AGENT,
        n=1,
        env=dict(
            base,
            INITGATE_DATABASE_URL=remote_url,
            DRILL_NETNS=namespace.name,
            DRILL_EVENTS=str(holder_events.path),
        ),
        preload=PRELOAD,
    )
    waiters = spawn_python(
        AGENT,
        n=3,
        env=dict(base, DRILL_EVENTS=str(waiter_events.path)),
        preload=PRELOAD,
    )
    holder.release()
    await wait_for(
        lambda: db.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE query LIKE '%pg_sleep(CASE%' "
            "AND state = 'active' AND client_addr = $1::inet",
            namespace.ns_addr,
        ),
        60,
        "the holder's long statement, from inside the namespace",
    )
    admin = await asyncpg.connect(server.admin_url_for(name))
    try:
        [backend] = await lock_holders(admin)
        waiters.release()
        await wait_for(
            lambda: len(waiter_events.find("log", "held by another worker")) >= 3,
            60,
            "every waiter to queue",
        )
        await db.execute("CREATE TABLE resume (id int)")

        namespace.cut()
        cut_at = time.time()
        while backend in await lock_holders(admin):
            assert time.time() - cut_at < 120, "the lock was never freed"
            await asyncio.sleep(0.05)
        freed = time.time() - cut_at
    finally:
        await admin.close()
    results = waiters.wait_all(timeout=60)
    reports = [json.loads(r.stdout.strip().splitlines()[-1]) for r in results]
    taken = waiter_events.find("log", "took the init lock")
    takeover = min(e["t"] for e in taken) - cut_at if taken else None

    namespace.mend()
    [held] = holder.wait_all(timeout=90)
    holder_lines = held.stdout.strip().splitlines()
    holder_report = json.loads(holder_lines[-1]) if holder_lines else {}
    statuses = [
        r["status"] for r in await db.fetch("SELECT status FROM init_runs ORDER BY id")
    ]
    seeded = Counter(r["name"] for r in await db.fetch("SELECT name FROM drill_seeded"))
    version = await db.fetchval("SELECT version_num FROM alembic_version")
    await secret_scan.add_ledger(server.admin_url_for(name))

    outcomes = Counter(r.get("outcome", r.get("error_type")) for r in reports)
    drill_results.record(
        "network_cut",
        freed_s=freed,
        takeover_s=takeover,
        bound_s=KEEPALIVE_BOUND_S,
        outcomes=dict(outcomes),
        statuses=statuses,
        effects=dict(seeded),
        holder_after_mend=holder_report.get("outcome")
        or f"{holder_report.get('error_type')}: {holder_report.get('error')}",
        holder_timed_out=held.timed_out,
        double_runs=max(outcomes.get("ran", 0) - 1, 0)
        + sum(max(n - 1, 0) for n in seeded.values()),
        lost=(version != "r3_tags")
        + sum(1 for s in ("first", "last") if seeded[s] != 1),
    )
    assert outcomes == {"ran": 1, "waited": 2}, outcomes
    assert statuses[-1] == "succeeded" and statuses.count("succeeded") == 1
    assert "abandoned" in statuses
    assert seeded == {"first": 1, "last": 1}
    assert version == "r3_tags"
    # Generous: the keepalive chain plus the poll and a busy machine.
    assert freed < KEEPALIVE_BOUND_S + 15, f"lock freed only after {freed:.1f} s"
