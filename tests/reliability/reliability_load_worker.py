"""One load-test client process: mixed models over one EdgeClient, every result checked against numpy.

    worker(0, "unix:///tmp/x.sock", "auto", 200, 500, barrier, results)   # run by test_load in a process
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import numpy as np

from shm_client import EdgeClient


def _calls(rng: np.random.Generator) -> list[Any]:
    """(model, inputs, version, check) makers: each returns what to send and how to judge the answer.
    With big=True they make their largest tensors, so warm-up grows every buffer and arena to its size."""

    def add_sub(big: bool) -> tuple:
        a, b = rng.standard_normal((1, 16), np.float32), rng.standard_normal((1, 16), np.float32)
        return "add_sub", {"a": a, "b": b}, None, lambda r: _same(r["sum"], a + b) and _same(r["diff"], a - b)

    def scale(big: bool) -> tuple:
        version = int(rng.integers(1, 3))
        x = rng.standard_normal(4095 if big else int(rng.integers(1, 4096)), np.float32)
        return "scale", {"x": x}, version, lambda r: _same(r["y"], x * version)

    def mixed(big: bool) -> tuple:
        n, m = (63, 63) if big else (int(rng.integers(1, 64)), int(rng.integers(1, 64)))
        features = rng.standard_normal((n, 4), np.float32)
        ids = rng.integers(-1000, 1000, m, np.int64)
        mask = rng.integers(0, 2, m).astype(bool)
        return "mixed", {"features": features, "ids": ids, "mask": mask}, None, lambda r: (
            np.allclose(r["total"], features.sum(axis=1), atol=1e-4) and _same(r["ids_twice"], ids * 2)
            and _same(r["mask_not"], ~mask))

    def strings(big: bool) -> tuple:
        count = 19 if big else int(rng.integers(1, 20))
        text = np.array([f"w{i}-{rng.integers(1 << 30)}-é".encode() for i in range(count)], dtype=object)
        return "strings", {"text": text}, None, lambda r: list(r["echo"]) == list(text) and int(r["count"]) == len(
            text)

    def identity_int64(big: bool) -> tuple:
        x = rng.integers(-(2**62), 2**62, 2047 if big else int(rng.integers(1, 2048)), np.int64)
        return "identity_int64", {"x": x}, None, lambda r: _same(r["y"], x)

    def static(big: bool) -> tuple:
        x = rng.standard_normal((4, 256), np.float32)
        return "static", {"x": x}, None, lambda r: _same(r["y"], x * 3)

    return [add_sub, scale, mixed, strings, identity_int64, static]


def _same(got: np.ndarray, want: np.ndarray) -> bool:
    return got.shape == want.shape and got.dtype == want.dtype and bool(np.array_equal(got, want))


def worker(index: int, target: str, transport: str, warm: int, calls: int, barrier: Any, results: Any) -> None:
    rng = np.random.default_rng(index)
    makers = _calls(rng)
    report = {"index": index, "pid": os.getpid(), "calls": 0, "errors": [], "transport": ""}
    client = EdgeClient(target, transport=transport, timeout=60)
    report["transport"] = client.transport

    def run(count: int, big_first: int = 0) -> None:
        for i in range(count):
            model, inputs, version, check = makers[(i + index) % len(makers)](i < big_first)
            try:
                if not check(client.infer(model, inputs, version=version)):
                    report["errors"].append(f"{model}: wrong result")
            except Exception:
                report["errors"].append(traceback.format_exc(limit=2))
            report["calls"] += 1

    try:
        run(warm, big_first=4 * len(makers))
        barrier.wait(120)  # the parent measures the server's memory after warm-up
        barrier.wait(120)
        run(calls)
        barrier.wait(120)  # ... and at the end, before the clients close
        barrier.wait(120)
    finally:
        client.close()
        results.put(report)
