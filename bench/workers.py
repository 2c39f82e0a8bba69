"""Client processes for the concurrent and soak runs (started with the "spawn" method: no inherited
gRPC state). Each owns one EdgeClient, warms up, waits on a barrier, then calls until its budget ends.

    ctx.Process(target=client_loop, args=(Job(...), barrier, queue)).start()
"""

from __future__ import annotations

import time
import traceback
from dataclasses import dataclass
from typing import Any

import numpy as np

from shm_client import EdgeClient

KB = 1024


@dataclass
class Job:
    target: str
    transport: str
    calls: int = 0  # stop after this many calls (0: use `seconds`)
    seconds: float = 0.0
    mix: str = "scale-4k"  # "scale-4k": one model, 4 KB; "soak": several models and sizes, checked
    seed: int = 0
    warmup: int = 20


def _scale_4k(rng: np.random.Generator) -> list[tuple[str, dict[str, np.ndarray], Any]]:
    x = rng.standard_normal(KB).astype(np.float32)
    return [("scale", {"x": x}, None)]


def _soak_mix(rng: np.random.Generator) -> list[tuple[str, dict[str, np.ndarray], Any]]:
    """(model, inputs, expected outputs) cases the soak cycles through: four models, 1 KB to 256 KB."""
    cases: list[tuple[str, dict[str, np.ndarray], Any]] = []
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


def client_loop(job: Job, barrier: Any, results: Any) -> None:
    """Put {"latencies": float32 seconds, "errors": n, "messages": [...], "elapsed": s} on `results`."""
    rng = np.random.default_rng(job.seed)
    cases = MIXES[job.mix](rng)
    latencies: list[float] = []
    errors, messages, elapsed = 0, [], 0.0
    client = None
    try:
        client = EdgeClient(job.target, transport=job.transport)
        for i in range(job.warmup):
            model, inputs, expected = cases[i % len(cases)]
            _check(client.infer(model, inputs), expected)
    except Exception:
        barrier.abort()
        results.put({"latencies": np.zeros(0, np.float32), "errors": 1, "elapsed": 0.0,
                     "messages": [traceback.format_exc(limit=3)]})
        return
    barrier.wait()
    clock = time.perf_counter
    began = clock()
    deadline = began + job.seconds
    i = 0
    while (i < job.calls) if job.calls else (clock() < deadline):
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
    elapsed = clock() - began
    client.close()
    results.put({"latencies": np.asarray(latencies, np.float32), "errors": errors, "messages": messages,
                 "elapsed": elapsed, "transport": client.transport})
