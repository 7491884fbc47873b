"""The scenarios: baseline, cold boot storm, warm boot, rolling deploy.

Each trial runs on a database of its own and a freshly written project, so
nothing carries over between strategies except the server itself.
"""

from __future__ import annotations

import compileall
import dataclasses
import shutil
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import postgres, workload
from bench.connections import pid_of
from bench.herd import Barrier, Herd
from bench.strategies import FLOORS, Strategy, by_name
from bench.trial import Trial, run_trial
from bench.worker import WorkerSpec
from harness.proxy import ProxiedConnection, RoundTripProxy

__all__ = ["Plan", "baseline", "cold", "rolling", "warm"]

Progress = Callable[[str], None]

# Warm boots longer than this are timed once, not warm_reps times.
_LONG_BOOT_MS = 2000.0


@dataclasses.dataclass
class Plan:
    """What one run of the bench does.

    Attributes:
        strategies: The strategies to compare (the available ones).
        ns: Herd sizes for the cold boot storm.
        workload: The generated project and seed.
        cap: Seconds after which a trial is cut off.
        stall: Seconds without progress after which a trial is cut off.
        repeat: Repetitions of each cold trial.
        baseline_reps: Repetitions of the single-process baselines.
        warm_reps: Single-worker warm boots per strategy (the first one
            goes through the round-trip proxy).
        warm_n: Workers started together on an up-to-date database (0: skip).
        rolling_n: New workers of the rolling deploy.
        readers: Old workers reading during the rolling deploy.
        without_cic: Strategies also run on the workload without
            ``CREATE INDEX CONCURRENTLY``.
        params: Per-strategy settings replacing the defaults (smoke mode).
        workdir: Scratch directory for projects, traces and logs.
        warm_only: When set, the warm boot runs these strategies only.
        rolling_only: When set, the rolling deploy runs these only.
    """

    strategies: list[Strategy]
    ns: list[int]
    workload: workload.Workload
    cap: float
    stall: float
    repeat: int
    baseline_reps: int
    warm_reps: int
    warm_n: int
    rolling_n: int
    readers: int
    without_cic: list[str]
    params: dict[str, dict[str, float]]
    workdir: Path
    warm_only: list[str] | None = None
    rolling_only: list[str] | None = None
    _counter: int = 0

    def scratch(self, label: str) -> Path:
        """A new, empty directory for one trial."""
        self._counter += 1
        path = self.workdir / f"{self._counter:03d}-{label}"
        path.mkdir(parents=True)
        return path

    def params_for(self, strategy: Strategy) -> dict[str, float]:
        """The strategy's settings for this run."""
        return dict(self.params.get(strategy.name, strategy.params))


def _trial(
    server: postgres.Server,
    plan: Plan,
    scenario: str,
    strategy: Strategy,
    n: int,
    url: str,
    project: Path,
    load: workload.Workload,
    **options: Any,
) -> dict[str, Any]:
    trial = Trial(
        scenario=scenario,
        strategy=strategy,
        n=n,
        database_url=url,
        project=project,
        workload=load,
        workdir=plan.scratch(f"{scenario}-{strategy.name}-{n}"),
        cap=plan.cap,
        stall=plan.stall,
        params=plan.params_for(strategy),
        **options,
    )
    return run_trial(server, trial)


def _project(plan: Plan, label: str, load: workload.Workload) -> Path:
    root = plan.scratch(f"project-{label}") / "project"
    workload.write_project(root, load)
    return root


def _line(record: dict[str, Any]) -> str:
    if record["all_ready_s"] is not None:
        state = f"all ready in {record['all_ready_s']:.2f} s"
    else:
        state = (
            f"{record['ready']} ready, {record['crashed']} crashed, "
            f"{record['died']} died ({record['ended']} after "
            f"{record['watched_s']:.0f} s)"
        )
    tags = ", ".join(filter(None, [record["workload"], record.get("variant")]))
    return f"{record['strategy']} N={record['n']} [{tags}]: {state}"


# -- baseline -----------------------------------------------------------------


def baseline(server: postgres.Server, plan: Plan, say: Progress) -> dict[str, Any]:
    """The migrations' own time: one process, plain ``alembic upgrade head``.

    Also one initgate worker alone on an empty database, for the gate's own
    cost on the cold path.
    """
    plain = by_name("worker_id")
    gate = by_name("initgate")
    upgrade_ms: list[float] = []
    gate_ms: list[float] = []
    for _ in range(plan.baseline_reps):
        for strategy, into in ((plain, upgrade_ms), (gate, gate_ms)):
            with postgres.fresh_database(server, f"base_{strategy.name}") as url:
                project = _project(plan, strategy.name, plan.workload)
                record = _trial(
                    server, plan, "baseline", strategy, 1, url, project, plan.workload
                )
            if record["ready"] != 1:
                continue
            # The plain upgrade's own in-process time; the gate's whole boot
            # (connect, lock, ledger, upgrade, seed).
            if strategy is plain:
                into.append(record["migration_ms"])
            else:
                into.append(record["boot_ms"]["p50"])
    result = {
        "upgrade_ms": _median(upgrade_ms),
        "upgrade_ms_all": [round(v, 1) for v in upgrade_ms],
        "initgate_alone_ms": _median(gate_ms),
        "initgate_alone_ms_all": [round(v, 1) for v in gate_ms],
    }
    say(
        f"baseline: alembic upgrade head + seed alone {result['upgrade_ms']} ms; "
        f"one initgate worker alone {result['initgate_alone_ms']} ms"
    )
    return result


# -- cold boot storm ----------------------------------------------------------


BAKED = "caches baked in"
"""Cold variant: revision bytecode and initgate's heads cache already exist."""


def cold(server: postgres.Server, plan: Plan, say: Progress) -> list[dict[str, Any]]:
    """N workers released together on an empty database, for every strategy.

    Each project is written fresh, as on a new image: no revision bytecode,
    no initgate heads cache, so every worker loads the revisions itself.
    initgate also runs with both baked in (an image whose build ran the
    gate's heads computation once), which shows what that loading costs, and
    the herd also runs connecting only: the floor under every figure.
    """
    records = []
    no_cic = dataclasses.replace(plan.workload, concurrent_index=False)
    variants: list[tuple[Strategy, workload.Workload, str]] = [
        (s, plan.workload, "") for s in plan.strategies
    ]
    variants += [
        (s, plan.workload, BAKED) for s in plan.strategies if s.name == "initgate"
    ]
    variants += [(s, no_cic, "") for s in plan.strategies if s.name in plan.without_cic]
    # The same herd only connecting: what N processes on these cores cost
    # before any coordination or migration.
    variants.append((by_name("floor_asyncpg"), plan.workload, ""))
    for n in plan.ns:
        for strategy, load, variant in variants:
            for _ in range(plan.repeat):
                label = f"cold_{strategy.name}_{n}"
                with postgres.fresh_database(server, label) as url:
                    project = _project(plan, strategy.name, load)
                    if variant == BAKED:
                        _bake(project)
                    record = _trial(
                        server,
                        plan,
                        "cold",
                        strategy,
                        n,
                        url,
                        project,
                        load,
                        variant=variant,
                    )
                records.append(record)
                say("cold: " + _line(record))
    return records


def _bake(project: Path) -> None:
    """Compile the revisions and write initgate's heads cache, as a build would."""
    from initgate.migrate import Migrations

    compileall.compile_dir(project / "versions", quiet=1)
    Migrations(project / "alembic.ini").heads()


# -- warm boot ----------------------------------------------------------------


def warm(server: postgres.Server, plan: Plan, say: Progress) -> list[dict[str, Any]]:
    """Workers booting on an up-to-date database: cost, round trips, connections.

    initgate runs twice: with its heads cache in place (every boot after the
    first) and with the cache deleted before each boot (the first boot of a
    new image), which makes it load the Alembic script directory.
    """
    chosen = [
        s for s in plan.strategies if plan.warm_only is None or s.name in plan.warm_only
    ]
    # Connecting alone first: the floor under every strategy's figure.
    variants: list[tuple[Strategy, str]] = [(f, "") for f in FLOORS]
    variants += [(s, "") for s in chosen]
    if any(s.name == "initgate" for s in chosen):
        index = next(i for i, v in enumerate(variants) if v[0].name == "initgate")
        variants.insert(index + 1, (by_name("initgate"), "no heads cache"))
    records = []
    with RoundTripProxy(server.admin_url) as proxy:
        for strategy, variant in variants:
            with postgres.fresh_database(server, f"warm_{strategy.name}") as url:
                record = _warm_one(server, plan, strategy, variant, url, proxy)
            records.append(record)
            label = f"{strategy.name} ({variant})" if variant else strategy.name
            say(
                f"warm: {label}: {record['single_ms']} ms, "
                f"{record['round_trips']} round trips, "
                f"{record['connections']} connections per worker"
            )
    return records


def _warm_one(
    server: postgres.Server,
    plan: Plan,
    strategy: Strategy,
    variant: str,
    url: str,
    proxy: RoundTripProxy,
) -> dict[str, Any]:
    project = _project(plan, strategy.name, plan.workload)
    floor = strategy in FLOORS
    # A floor only connects: its database needs no migrating.
    setup = (
        None
        if floor
        else _trial(server, plan, "setup", strategy, 1, url, project, plan.workload)
    )
    cache = project / "versions" / "__pycache__" / "initgate-heads.json"
    database = url.split("?")[0].rsplit("/", 1)[-1]

    singles: list[float] = []
    counted: dict[str, Any] = {}
    earlier = 0
    for rep in range(plan.warm_reps):
        if variant:
            cache.unlink(missing_ok=True)
        counting = rep == 0
        if counting:
            proxy.reset()
            # A connection of an earlier trial may still be closing: only
            # those accepted from here on are this boot's.
            earlier = len(proxy.connections)
        record = _trial(
            server,
            plan,
            "warm",
            strategy,
            1,
            url,
            project,
            plan.workload,
            worker_url=proxy.url_for(database) if counting else None,
        )
        if record["ready"] != 1:
            counted = counted or {"error": record["errors"]}
            continue
        if counting:
            per_worker = _by_worker(proxy.connections[earlier:])
            counted = per_worker[0] if per_worker else {}
        # Through the proxy every round trip pays a Python hop; time only
        # the direct boots when there are any.
        if not counting or plan.warm_reps == 1:
            singles.append(record["boot_ms"]["p50"])
        # A boot that sleeps by design (asyncpg-lock's pause after
        # acquiring) says all it has to say in one timed repetition.
        if singles and singles[-1] > _LONG_BOOT_MS:
            break

    together: dict[str, Any] = {"n": plan.warm_n, "skipped": True}
    if plan.warm_n > 0 and not floor:
        if variant:
            cache.unlink(missing_ok=True)
        together = _trial(
            server, plan, "warm", strategy, plan.warm_n, url, project, plan.workload
        )
    return {
        "strategy": strategy.name,
        "variant": variant,
        "floor": floor,
        "setup_ok": setup is None or setup["ready"] == 1,
        "single_ms": _median(singles),
        "single_ms_all": [round(v, 2) for v in singles],
        "round_trips": counted.get("round_trips"),
        "connections": counted.get("connections"),
        "queries": counted.get("queries", [])[:12],
        "together": {
            key: together.get(key)
            for key in (
                "n",
                "ended",
                "ready",
                "crashed",
                "all_ready_s",
                "last_ready_s",
                "boot_ms",
                "peak_connections",
                "max_connections_per_worker",
                "held_after_ready",
                "ready_offsets_ms",
            )
        },
    }


# -- rolling deploy -----------------------------------------------------------


def rolling(server: postgres.Server, plan: Plan, say: Progress) -> list[dict[str, Any]]:
    """One new revision while old workers keep reading; new workers boot."""
    records = []
    for strategy in plan.strategies:
        if plan.rolling_only is not None and strategy.name not in plan.rolling_only:
            continue
        with postgres.fresh_database(server, f"roll_{strategy.name}") as url:
            record = _rolling_one(server, plan, strategy, url)
        records.append(record)
        old = record["old_workers"]
        say(
            "rolling: "
            + _line(record)
            + f"; old workers: {old['ok']} queries ok, {old['failed']} failed, "
            f"slowest {old['max_ms']} ms"
        )
    return records


def _rolling_one(
    server: postgres.Server, plan: Plan, strategy: Strategy, url: str
) -> dict[str, Any]:
    project = _project(plan, strategy.name, plan.workload)
    setup = _trial(server, plan, "setup", strategy, 1, url, project, plan.workload)
    if setup["ready"] != 1:
        raise RuntimeError(
            f"rolling deploy of {strategy.name}: the old release did not boot: "
            f"{setup['errors']}"
        )

    scratch = plan.scratch(f"readers-{strategy.name}")
    stop = scratch / "stop"
    specs = [
        WorkerSpec(
            index=i,
            role="reader",
            module="",
            database_url=url,
            alembic_ini="",
            seed_rows=0,
            params={},
            trace_path=str(scratch / "trace"),
            go_path=str(scratch / "go"),
            linger_path=str(scratch / "linger"),
            stop_path=str(stop),
            log_path=str(scratch / f"reader-{i}.log"),
        )
        for i in range(plan.readers)
    ]
    go = Barrier(scratch / "go")
    linger = Barrier(scratch / "linger")
    with Herd(specs, go, linger) as readers:
        readers.start(timeout=60)
        readers.release()
        time.sleep(1.0)  # The old release serves for a while first.
        workload.add_rolling_revision(project, plan.workload)
        record = _trial(
            server,
            plan,
            "rolling",
            strategy,
            plan.rolling_n,
            url,
            project,
            plan.workload,
        )
        time.sleep(0.5)
        stop.touch()
        reports = []
        for event in readers.drain(15):
            if event["event"] in ("stopped", "crashed"):
                reports.append(event)
                if len(reports) == plan.readers:
                    break
    record["old_workers"] = {
        "n": plan.readers,
        "reported": len(reports),
        "ok": sum(r.get("ok", 0) for r in reports),
        "failed": sum(r.get("failed", 0) for r in reports)
        + sum(1 for r in reports if r["event"] == "crashed"),
        "errors": sorted({e for r in reports for e in r.get("errors", [])})[:3],
        "max_ms": _round(max((r.get("max_ms") or 0 for r in reports), default=None)),
        "p50_ms": _round(_median([r["p50_ms"] for r in reports if r.get("p50_ms")])),
    }
    shutil.rmtree(scratch, ignore_errors=True)
    return record


def _by_worker(connections: list[ProxiedConnection]) -> list[dict[str, Any]]:
    """Connections, round trips and queries of each worker pid, first seen first.

    A round trip is any wait for the server, Flush included (asyncpg's first
    use of a statement costs two); queries are cut to 80 characters for the
    report. Connections that name no worker (cancel requests) are left out.
    """
    found: dict[int, dict[str, Any]] = {}
    for conn in connections:
        pid = pid_of(conn.application_name or "")
        if pid is None:
            continue
        worker = found.setdefault(
            pid, {"connections": 0, "round_trips": 0, "queries": []}
        )
        worker["connections"] += 1
        worker["round_trips"] += conn.network_round_trips
        worker["queries"].extend(query[:80] for query in conn.queries)
    return list(found.values())


def _median(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 1)
