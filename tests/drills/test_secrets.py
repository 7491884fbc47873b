"""The drill role's canary password never shows: CLI output, logs, rows.

Every other drill hands its processes' output and its ledger rows to the
session's ``secret_scan``; this one adds the command line, on a server with
SCRAM authentication, with a seed step that quotes its URL in its error.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.drills.conftest import SecretScan
from tests.drills.servers import CANARY, drill_postgres
from tests.drills.support import DrillResults
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow


def _cli(*args: str, url: str) -> subprocess.CompletedProcess[str]:
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("INITGATE_", "PG")) and key != "DATABASE_URL"
    }
    env.update(DATABASE_URL=url, INITGATE_ALEMBIC_CONFIG="", PYTHONPATH=str(REPO_ROOT))
    return subprocess.run(
        [sys.executable, "-m", "initgate", *args],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_canary_password_stays_out_of_cli_output_logs_and_rows(
    tmp_path: Path, secret_scan: SecretScan, drill_results: DrillResults
) -> None:
    with drill_postgres() as server:
        await server.create_role()
        database = await server.create_database("secrets")
        url = server.role_url(database)
        runs = [
            _cli("run", "--app", "tests.drills.leaky_app:gate", "-v", url=url),
            _cli("history", url=url),
            _cli("run", "--app", "tests.drills.leaky_app:gate", url=url + "x"),
        ]
        await secret_scan.add_ledger(server.admin_url_for(database))

    for number, done in enumerate(runs):
        secret_scan.add_text(f"cli-{number}.stdout", done.stdout)
        secret_scan.add_text(f"cli-{number}.stderr", done.stderr)
    codes = [done.returncode for done in runs]
    drill_results.record("secrets_cli", exit_codes=codes)
    # Init fails (the step raises), history lists it, a wrong password is
    # a configuration error: each said without the password.
    assert codes == [1, 0, 2], [(r.stdout, r.stderr) for r in runs]
    assert "could not load prices via" in runs[0].stderr + runs[0].stdout
    for done in runs:
        assert CANARY not in done.stdout + done.stderr


# A URL quoted into an error carries the password percent-encoded, which is
# as good as plain; scrubbing must catch that form too.
async def test_percent_encoded_password_stays_out_of_cli_output_and_rows(
    secret_scan: SecretScan,
) -> None:
    encoded = quote(CANARY, safe="")
    with drill_postgres() as server:
        await server.create_role()
        database = await server.create_database("secrets_encoded")
        done = _cli(
            "run", "--app", "tests.drills.leaky_app:gate", url=server.role_url(database)
        )
        rows = SecretScan()
        await rows.add_ledger(server.admin_url_for(database))

    assert encoded not in done.stdout + done.stderr
    assert not rows.leaks(encoded)[0]
