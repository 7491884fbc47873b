"""The bench's smoke mode runs end to end, so the benchmarks cannot rot.

It runs ``python -m bench --smoke`` against the session's PostgreSQL (each
trial creates and drops a database of its own) and checks the shape of the
JSON it writes, and that behind initgate the migrations ran exactly once.
Timings are printed by the bench, never asserted here.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PgServer
from tests.helpers import REPO_ROOT

COLD_KEYS = {
    "strategy",
    "n",
    "workload",
    "ended",
    "ready",
    "crashed",
    "all_ready_s",
    "ready_offsets_ms",
    "wake_ms",
    "migrations_started",
    "migrations_completed",
    "seed_runs",
    "peak_connections",
    "max_connections_per_worker",
    "held_after_ready",
}


@pytest.fixture(scope="module")
def smoke_results(
    pg_server: PgServer, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("bench")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            "--smoke",
            "--database-url",
            pg_server.admin_url,
            "--out",
            str(out),
        ],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    results: dict[str, Any] = json.loads((out / "latest.json").read_text())
    results["_out"] = str(out)
    results["_stdout"] = result.stdout
    return results


def test_smoke_writes_every_section_with_the_machine(
    smoke_results: dict[str, Any],
) -> None:
    for section in ("meta", "strategies", "baseline", "cold", "warm", "rolling"):
        assert section in smoke_results, section
    machine = smoke_results["meta"]["machine"]
    assert {"cores", "ram_gb", "python", "postgresql"} <= machine.keys()
    assert smoke_results["meta"]["command"].startswith("python -m bench --smoke")
    assert smoke_results["targets"], "targets are judged even in smoke mode"
    assert "Cold boot storm" in smoke_results["_stdout"]


def test_every_strategy_ran_or_says_why_not(smoke_results: dict[str, Any]) -> None:
    cold = {r["strategy"] for r in smoke_results["cold"]}
    for strategy in smoke_results["strategies"]:
        if strategy["available"]:
            assert strategy["name"] in cold, strategy["name"]
        else:
            assert strategy["reason"], strategy["name"]
    for record in smoke_results["cold"]:
        assert record.keys() >= COLD_KEYS, COLD_KEYS - record.keys()
        assert record["ready"] + record["crashed"] + record["died"] <= record["n"]


def test_behind_initgate_the_migrations_ran_exactly_once(
    smoke_results: dict[str, Any],
) -> None:
    gated = [r for r in smoke_results["cold"] if r["strategy"] == "initgate"]
    assert gated
    for record in gated:
        assert record["ready"] == record["n"], record
        assert record["migrations_started"] == 1
        assert record["migrations_completed"] == 1
        assert record["seed_runs"] == 1
        assert record["init_runs"] == {"succeeded": 1}
        assert record["held_after_ready"] == 0
    rolled = [r for r in smoke_results["rolling"] if r["strategy"] == "initgate"]
    assert [r["migrations_completed"] for r in rolled] == [1]
    assert rolled[0]["old_workers"]["failed"] == 0


def test_warm_boot_counts_round_trips_and_connections(
    smoke_results: dict[str, Any],
) -> None:
    warm = {(w["strategy"], w["variant"]): w for w in smoke_results["warm"]}
    gate = warm[("initgate", "")]
    assert isinstance(gate["round_trips"], int)
    assert isinstance(gate["connections"], int)
    assert ("initgate", "no heads cache") in warm


def test_the_plot_is_written_when_matplotlib_is_installed(
    smoke_results: dict[str, Any],
) -> None:
    pytest.importorskip("matplotlib")
    png = Path(smoke_results["_out"]) / "latest.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
