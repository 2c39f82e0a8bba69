"""Client processes for the concurrent and soak runs (started with the "spawn" method: no inherited
gRPC state). Each opens one EdgeClient per transport it needs and warms them up; then, phase by phase, all
processes wait on one barrier and call until the phase's budget ends.

    phases = run_clients([Job(target, [Phase("shm", seconds=3), Phase("grpc", seconds=3)], seed=i) for i in ...])
"""

from __future__ import annotations

import multiprocessing
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shm_client import EdgeClient

KB = 1024
BARRIER_TIMEOUT = 300.0  # a client that never reaches the barrier (it died) must not hang the others


@dataclass(frozen=True)
class Phase:
    transport: str
    calls: int = 0  # stop after this many calls (0: use `seconds`)
    seconds: float = 0.0


@dataclass
class Job:
    target: str
    phases: list[Phase] = field(default_factory=list)
    mix: str = "scale-4k"  # "scale-4k": one model, 4 KB; "soak": several models and sizes, checked
    seed: int = 0
    warmup: int = 20


Case = tuple[str, dict[str, np.ndarray], Any]


def _scale_4k(rng: np.random.Generator) -> list[Case]:
    x = rng.standard_normal(KB).astype(np.float32)
    return [("scale", {"x": x}, None)]


def _soak_mix(rng: np.random.Generator) -> list[Case]:
    """(model, inputs, expected outputs) cases the soak cycles through: four models, 1 KB to 256 KB."""
    cases: list[Case] = []
    for nbytes in (KB, 16 * KB, 256 * KB):
        x = rng.standard_normal(nbytes // 4).astype(np.float32)
        cases.append(("scale", {"x": x}, {"y": x}))
        cases.append(("double", {"x": x}, {"y": x * 2}))
        cases.append(("identity", {"x": x}, {"y": x}))
    a = rng.standard_normal((1, 16)).astype(np.float32)
    b = rng.standard_normal((1, 16)).astype(np.float32)
    cases.append(("add_sub", {"a": a, "b": b}, {"sum": a + b, "diff": a - b}))
    return cases


MIXES = {"scale-4k": _scale_4k, "soak": _soak_mix}


def _check(outputs: dict[str, np.ndarray], expected: dict[str, np.ndarray] | None) -> None:
    if expected is None:
        return
    for name, want in expected.items():
        if not np.allclose(outputs[name], want):
            raise AssertionError(f"output {name} differs from the expected values")


def _phase(client: EdgeClient, phase: Phase, cases: list[Case]) -> dict[str, Any]:
    latencies: list[float] = []
    errors, messages = 0, list[str]()
    clock = time.perf_counter
    began = clock()
    deadline = began + phase.seconds
    i = 0
    while (i < phase.calls) if phase.calls else (clock() < deadline):
        model, inputs, expected = cases[i % len(cases)]
        start = clock()
        try:
            outputs = client.infer(model, inputs)
            latencies.append(clock() - start)
            _check(outputs, expected)
        except Exception as err:
            errors += 1
            if len(messages) < 3:
                messages.append(f"{type(err).__name__}: {err}")
        i += 1
    return {"latencies": np.asarray(latencies, np.float32), "errors": errors, "messages": messages,
            "elapsed": clock() - began, "transport": client.transport}


def client_loop(job: Job, barrier: Any, results: Any) -> None:
    """Put {"phases": [{"latencies": float32 seconds, "errors", "messages", "elapsed", "transport"}, ...]}
    on `results`, or {"failed": why} when a client could not start or a peer process died."""
    cases = MIXES[job.mix](np.random.default_rng(job.seed))
    clients: dict[str, EdgeClient] = {}
    try:
        try:
            for transport in dict.fromkeys(phase.transport for phase in job.phases):
                clients[transport] = client = EdgeClient(job.target, transport=transport)
                for i in range(job.warmup):
                    model, inputs, expected = cases[i % len(cases)]
                    _check(client.infer(model, inputs), expected)
        except Exception:
            barrier.abort()
            results.put({"failed": traceback.format_exc(limit=3)})
            return
        reports = []
        for phase in job.phases:
            try:
                barrier.wait(BARRIER_TIMEOUT)
            except threading.BrokenBarrierError:
                results.put({"failed": "another client process failed or died"})
                return
            reports.append(_phase(clients[phase.transport], phase, cases))
        results.put({"phases": reports})
    finally:
        for client in clients.values():
            client.close()


def run_clients(jobs: list[Job], timeout: float = 900.0) -> list[dict[str, Any]]:
    """Start one process per job and merge their reports phase by phase (every job has as many phases):
    [{"latencies", "errors", "messages", "elapsed" (the slowest client's), "transports", "pids"}, ...]."""
    ctx = multiprocessing.get_context("forkserver")
    # The fork server imports the client once; each client process is a fork of it with nothing else
    # inherited (no channel, no thread), which starts 8 clients in a fraction of what 8 spawns take.
    ctx.set_forkserver_preload([__name__])
    barrier = ctx.Barrier(len(jobs))
    results = ctx.Queue()
    workers = [ctx.Process(target=client_loop, args=(job, barrier, results), daemon=True) for job in jobs]
    for worker in workers:
        worker.start()
    reports: list[dict[str, Any]] = []
    try:
        for _ in workers:
            reports.append(results.get(timeout=timeout))
    except queue.Empty:
        pass
    finally:
        for worker in workers:
            worker.join(10)
            if worker.is_alive():
                worker.kill()
                worker.join(10)
    failures = [r["failed"] for r in reports if "failed" in r]
    if failures or len(reports) < len(jobs):
        reason = failures[0] if failures else "the others sent no report before the timeout"
        raise SystemExit(f"bench: {len(reports) - len(failures)} of {len(jobs)} client processes finished; {reason}")
    pids = [worker.pid for worker in workers if worker.pid is not None]
    merged = []
    for i in range(len(jobs[0].phases)):
        phases = [r["phases"][i] for r in reports]
        merged.append({
            "latencies": np.concatenate([p["latencies"] for p in phases]),
            "errors": sum(p["errors"] for p in phases),
            "messages": [m for p in phases for m in p["messages"]],
            # clients start together; the slowest one bounds the wall time
            "elapsed": max(p["elapsed"] for p in phases) or 1e-9,
            "transports": sorted({p["transport"] for p in phases}),
            "pids": pids,
        })
    return merged
