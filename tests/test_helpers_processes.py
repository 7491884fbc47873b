"""The process helpers start, release, time out and clean up for real."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests.conftest import SpawnPython, StartUvicorn
from tests.helpers import free_port, live_processes_in_group

_REPORT_START = """
import os, time
print(os.environ["INITGATE_TEST_HERD_INDEX"], time.time(), flush=True)
"""


def test_herd_waits_at_the_gate_until_released(spawn_python: SpawnPython) -> None:
    herd = spawn_python(_REPORT_START, n=3)

    # Every process is ready and blocked: alive, and has written nothing.
    assert all(p.poll() is None for p in herd.processes)
    herd.release()
    results = herd.wait_all(timeout=60)

    assert [r.returncode for r in results] == [0, 0, 0], [r.describe() for r in results]
    starts = {}
    for result in results:
        index, started = result.stdout.split()
        starts[int(index)] = float(started)
    assert sorted(starts) == [0, 1, 2]
    assert herd.released_at is not None
    assert all(t >= herd.released_at for t in starts.values())
    # Loose on purpose: on two busy cores the scheduler alone can spread
    # the wake-ups; what matters is that no process ran its own startup
    # after the release.
    assert max(starts.values()) - min(starts.values()) < 0.5


def test_herd_runs_a_script_file_with_env_and_preloaded_modules(
    spawn_python: SpawnPython, tmp_path: Path
) -> None:
    script = tmp_path / "child.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            assert "json" in sys.modules, "preloaded before the gate"
            print(sys.argv[0], __name__)
            import os
            print(os.environ["GREETING"])
            sys.exit(3)
            """
        )
    )
    herd = spawn_python(script, n=2, env={"GREETING": "hello"}, preload=["json"])
    herd.release()
    results = herd.wait_all(timeout=60)

    assert [r.returncode for r in results] == [3, 3]
    assert results[0].stdout.split() == [str(script), "__main__", "hello"]


def test_herd_kills_what_outlives_the_deadline(spawn_python: SpawnPython) -> None:
    herd = spawn_python("import time\ntime.sleep(120)\n", n=2)
    herd.release()
    results = herd.wait_all(timeout=1)

    assert all(r.timed_out for r in results)
    assert all(r.returncode < 0 for r in results)


def test_herd_reports_a_process_that_dies_before_the_gate(
    spawn_python: SpawnPython,
) -> None:
    with pytest.raises(RuntimeError, match="got ready") as raised:
        spawn_python("print('never')\n", n=2, preload=["no_such_module_here"])

    assert "ModuleNotFoundError" in str(raised.value)


def test_wait_all_refuses_to_wait_for_a_herd_never_released(
    spawn_python: SpawnPython,
) -> None:
    herd = spawn_python("pass\n", n=1)

    with pytest.raises(RuntimeError, match="before release"):
        herd.wait_all(timeout=1)


_TINY_APP = """
import os


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": str(os.getpid()).encode()})
"""


@pytest.mark.slow
def test_uvicorn_helper_serves_with_workers_and_stops_the_whole_group(
    run_uvicorn: StartUvicorn, tmp_path: Path
) -> None:
    (tmp_path / "tiny_app.py").write_text(_TINY_APP)
    server = run_uvicorn(
        workers=2,
        port=free_port(),
        app="tiny_app:app",
        extra_args=["--app-dir", str(tmp_path)],
    )

    body = server.wait_until_ok("/", timeout=60)
    assert int(body) != server.process.pid, "a worker answers, not the master"

    server.stop(grace=10)
    assert live_processes_in_group(server.process.pid) == []
    assert "Uvicorn running" in server.log()
