"""``python -m bench``: run the scenarios, print the table, write the results.

Modes:

* default: N = 8, 32, 128; every scenario; about 15 minutes on 2 cores;
* ``--quick``: N = 8, 32 and shorter cut-offs, about 5 minutes;
* ``--smoke``: N = 2, a tiny workload and short poll intervals; checks the
  bench runs end to end (under a minute). Its figures mean nothing.

The full and quick modes also rewrite the generated block of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shlex
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import herd, postgres, report, scenarios
from bench.strategies import FLOORS, STRATEGIES, by_name
from bench.workload import Workload

__all__ = ["main"]

REPO_ROOT = Path(__file__).resolve().parent.parent
SCENARIOS = ("baseline", "cold", "warm", "rolling")

# Smoke mode shortens every wait so that the slow pollers still finish.
_SMOKE_PARAMS = {
    "trylock_poll": {"poll_interval": 0.2},
    "locktable_poll": {"poll_interval": 0.5},
    "asyncpg_lock": {"reacquire_delay": 0.2, "after_acquire_delay": 0.2},
}

_MODES: dict[str, dict[str, Any]] = {
    "full": {
        "ns": [8, 32, 128],
        "workload": Workload(),
        "cap": 30.0,
        "stall": 15.0,
        "baseline_reps": 3,
        "warm_reps": 6,
        "warm_n": 8,
        "rolling_n": 8,
        "readers": 4,
        "without_cic": ["initgate", "blocking_lock", "tooz"],
        "params": {},
    },
    "quick": {
        "ns": [8, 32],
        "workload": Workload(),
        "cap": 20.0,
        "stall": 12.0,
        "baseline_reps": 2,
        "warm_reps": 3,
        "warm_n": 8,
        "rolling_n": 4,
        "readers": 2,
        "without_cic": ["initgate", "blocking_lock", "tooz"],
        "params": {},
    },
    "smoke": {
        "ns": [2],
        "workload": Workload(revisions=3, tables=6, seed_rows=20),
        "cap": 12.0,
        "stall": 5.0,
        "baseline_reps": 1,
        "warm_reps": 1,
        "warm_n": 0,
        "rolling_n": 2,
        "readers": 1,
        "without_cic": [],
        "params": _SMOKE_PARAMS,
        "warm_only": ["initgate", "blocking_lock"],
        "rolling_only": ["initgate"],
    },
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark initgate against the alternatives on one PostgreSQL.",
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true", help="N=2, tiny workload, <60 s")
    mode.add_argument("--quick", action="store_true", help="N=8,32, about 5 minutes")
    parser.add_argument(
        "--database-url",
        help="a superuser's postgresql:// URL to use instead of an embedded "
        "PostgreSQL 18 (each trial creates and drops its own database)",
    )
    parser.add_argument("--ns", help="herd sizes for the cold boot, e.g. 8,32,128")
    parser.add_argument("--strategies", help="comma-separated names (default: all)")
    parser.add_argument(
        "--scenarios",
        help=f"comma-separated, from {','.join(SCENARIOS)} (default: all)",
    )
    parser.add_argument("--repeat", type=int, default=1, help="cold trials per cell")
    parser.add_argument("--cap", type=float, help="seconds before a trial is cut off")
    parser.add_argument("--out", type=Path, help="results directory (bench/results)")
    parser.add_argument(
        "--no-markdown",
        action="store_true",
        help="do not rewrite the generated block of BENCHMARKS.md",
    )
    parser.add_argument(
        "--keep-workdir", action="store_true", help="keep projects, traces and logs"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the bench; return the process exit status."""
    args = _parser().parse_args(argv)
    # A plain SIGTERM would skip every cleanup below and leave the embedded
    # server and lingering workers running; exiting runs the finally blocks.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    settings = dict(_MODES[mode])
    if args.ns:
        settings["ns"] = [int(n) for n in args.ns.split(",")]
    if args.cap:
        settings["cap"] = args.cap
    wanted = (
        [by_name(n.strip()) for n in args.strategies.split(",")]
        if args.strategies
        else list(STRATEGIES)
    )
    chosen = set(args.scenarios.split(",")) if args.scenarios else set(SCENARIOS)
    unknown = chosen - set(SCENARIOS)
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(sorted(unknown))}")
    out = args.out or REPO_ROOT / "bench" / "results"
    command = "python -m bench" + (
        " " + shlex.join(argv if argv is not None else sys.argv[1:])
        if (argv if argv is not None else sys.argv[1:])
        else ""
    )

    strategies_info = []
    runnable = []
    for strategy in wanted:
        reason = strategy.unavailable()
        strategies_info.append(
            {
                "name": strategy.name,
                "title": strategy.title,
                "kind": strategy.kind,
                "summary": strategy.summary,
                "version": strategy.version(),
                "params": settings["params"].get(strategy.name, dict(strategy.params)),
                "available": reason is None,
                "reason": reason,
                "import_s": None,
            }
        )
        if reason is None:
            runnable.append(strategy)
        else:
            print(f"bench: {strategy.name} is not run: {reason}", flush=True)
    if mode != "smoke":
        for info in strategies_info:
            if info["available"]:
                info["import_s"] = herd.import_seconds([by_name(info["name"]).module])

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="igbench-work-", dir="/tmp"))
    plan = scenarios.Plan(
        strategies=runnable,
        ns=settings["ns"],
        workload=settings["workload"],
        cap=settings["cap"],
        stall=settings["stall"],
        repeat=args.repeat,
        baseline_reps=settings["baseline_reps"],
        warm_reps=settings["warm_reps"],
        warm_n=settings["warm_n"],
        rolling_n=settings["rolling_n"],
        readers=settings["readers"],
        without_cic=settings["without_cic"],
        params=settings["params"],
        workdir=workdir,
        warm_only=settings.get("warm_only"),
        rolling_only=settings.get("rolling_only"),
    )
    # The largest herd's connections, three per worker for strategies that
    # hold that many (tooz), plus room for the bench's own sessions.
    needed = max([*plan.ns, plan.warm_n, plan.rolling_n]) * 3 + 50

    def say(line: str) -> None:
        print(f"[{time.monotonic() - started:6.1f} s] {line}", flush=True)

    results: dict[str, Any] = {
        "strategies": strategies_info,
        "floors": [
            {"name": f.name, "title": f.title, "summary": f.summary} for f in FLOORS
        ],
    }
    try:
        with postgres.started_server(
            args.database_url, max_connections=needed
        ) as server:
            if server.max_connections < needed:
                say(
                    f"warning: max_connections is {server.max_connections}; "
                    f"the largest herds may need {needed}"
                )
            results["meta"] = {
                "command": command,
                "mode": mode,
                "machine": report.machine(server),
                "workload": plan.workload.label,
                "cap_s": plan.cap,
                "stall_s": plan.stall,
                "ns": plan.ns,
            }
            say(f"PostgreSQL {server.version} ({server.source}); mode {mode}")
            if "baseline" in chosen:
                results["baseline"] = scenarios.baseline(server, plan, say)
            if "cold" in chosen:
                results["cold"] = scenarios.cold(server, plan, say)
            if "warm" in chosen:
                results["warm"] = scenarios.warm(server, plan, say)
            if "rolling" in chosen:
                results["rolling"] = scenarios.rolling(server, plan, say)
    finally:
        if not args.keep_workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"bench: work directory kept at {workdir}")

    meta = results["meta"]
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    meta["finished"] = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    meta["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    results["targets"] = report.evaluate_targets(results)

    print()
    print(report.text_report(results))
    report.write_json(results, out / "latest.json")
    problem = report.plot(results, out / "latest.png")
    print(f"\nwrote {out / 'latest.json'}" + (f" ({problem})" if problem else ""))
    if problem is None:
        print(f"wrote {out / 'latest.png'}")
    if mode != "smoke" and not args.no_markdown:
        with contextlib.suppress(OSError):
            if report.update_markdown(
                REPO_ROOT / "BENCHMARKS.md", report.markdown(results)
            ):
                print(f"updated {REPO_ROOT / 'BENCHMARKS.md'}")
    return 0
