"""Exactly once across hosts: three network-namespace hosts, four workers each.

Each "host" is a network namespace (and a UTS namespace, for its own
hostname) with an address on a private /24 that exists only on a bridge this
test makes; every host runs ``uvicorn app.main:app --workers 4``, and all
twelve workers reach one PostgreSQL over that bridge, as containers on
several machines would. Where namespaces cannot be made (no root, no
CAP_NET_ADMIN, no iproute2), the test is skipped and says why.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.deployment import HostNetwork, ListeningPostgres, namespaces_unavailable
from tests.helpers import (
    REPO_ROOT,
    DatabaseAdmin,
    DdlLog,
    UvicornServer,
    find_pg_bindir,
    wait_for_http,
)
from tests.test_workers import assert_demo_initialised_once

HOSTS = 3
WORKERS = 4
PORT = 8000
PG_MAJOR = "15"

pytestmark = pytest.mark.slow


@pytest.fixture
def network() -> Iterator[HostNetwork]:
    """Three namespace hosts on a bridge; skipped where they cannot be made."""
    reason = namespaces_unavailable()
    if reason is not None:
        pytest.skip(f"needs network namespaces: {reason}")
    network = HostNetwork(HOSTS)
    try:
        network.open()
        yield network
    finally:
        network.close()


@pytest.fixture
def bridge_postgres(network: HostNetwork) -> Iterator[ListeningPostgres]:
    """PostgreSQL listening on the bridge, trusting the hosts' subnet."""
    bindir = find_pg_bindir(PG_MAJOR)
    if bindir is None:
        pytest.skip(
            f"needs PostgreSQL {PG_MAJOR} server binaries "
            f"(apt-get install postgresql-{PG_MAJOR})"
        )
    server = ListeningPostgres(
        bindir,
        addresses=[network.gateway],
        trusted=[str(network.subnet)],
        # Every connection is logged with its client address: the proof
        # that each host's workers came in over the bridge.
        settings={"max_connections": "200", "log_connections": "on"},
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


def start_host(
    network: HostNetwork,
    index: int,
    database_url: str,
    trace: Path,
    log_dir: Path,
) -> UvicornServer:
    """Start uvicorn with its workers on host ``index``; returns at once."""
    host = network.hosts[index]
    argv = [
        sys.executable,
        "-m",
        "uvicorn",
        "app.main:app",
        "--host",
        host.address,
        "--port",
        str(PORT),
        "--workers",
        str(WORKERS),
    ]
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO_ROOT),
        "DATABASE_URL": database_url,
        "APP_SEED_TRACE_FILE": str(trace),
    }
    log_path = log_dir / f"{host.name}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            host.command(argv),
            cwd=REPO_ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return UvicornServer(process, PORT, log_path)


async def test_three_hosts_of_four_workers_init_exactly_once(
    network: HostNetwork, bridge_postgres: ListeningPostgres, tmp_path: Path
) -> None:
    admin = await asyncpg.connect(bridge_postgres.url("postgres"))
    try:
        await admin.execute("CREATE DATABASE hosts")
    finally:
        await admin.close()
    db = DatabaseAdmin(bridge_postgres.url("hosts"))
    ddl_log = DdlLog(db)
    await ddl_log.install()
    trace = tmp_path / "seeds.trace"
    # Every host reaches PostgreSQL through the bridge's address, never
    # through loopback: the namespaces have no route to the root's 127.0.0.1.
    url = bridge_postgres.url("hosts", address=network.gateway)

    servers: list[UvicornServer] = []
    try:
        for index in range(HOSTS):
            servers.append(start_host(network, index, url, trace, tmp_path))
        for host, server in zip(network.hosts, servers, strict=True):
            wait_for_http(
                f"http://{host.address}:{PORT}/health/ready",
                timeout=180,
                server=server,
            )
        deadline = time.monotonic() + 120
        for host, server in zip(network.hosts, servers, strict=True):
            while server.log().count("Application startup complete.") < WORKERS:
                assert time.monotonic() < deadline, (host, server.log()[-4000:])
                assert server.process.poll() is None, server.log()[-4000:]
                time.sleep(0.2)

        logs = [server.log() for server in servers]
    finally:
        for server in servers:
            server.stop()

    for log in logs:
        assert "Application startup failed" not in log, log[-3000:]
    received = re.findall(
        r"connection received: host=([\d.]+)", bridge_postgres.log_path.read_text()
    )
    for host in network.hosts:
        # At least the gate's connection from each of the host's workers.
        assert received.count(host.address) >= WORKERS, (host, received)
    await assert_demo_initialised_once(db, ddl_log, trace)
    run = await db.fetchrow("SELECT hostname FROM init_runs")
    assert run is not None
    assert run["hostname"] in {host.name for host in network.hosts}
