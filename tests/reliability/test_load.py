"""Load: 8 client processes, shared memory and gRPC (unix socket and TCP), several models, thousands of
calls. Zero errors, every result right, the server's memory flat after warm-up, /dev/shm as it was.

    pytest tests/reliability/test_load.py -s     # prints calls, rate and RSS figures
"""

from __future__ import annotations

import multiprocessing
import time
from collections.abc import Callable
from typing import Any

import psutil
import pytest
from reliability_load_worker import worker

from tests.support.processes import ServerProcess
from tests.support.shm import our_shm_entries
from tests.support.stubs import registered_names, v2_stub

WORKERS = 8
WARM_CALLS = 450  # per worker, before the first memory reading (allocator arenas and pools settle)
CALLS = 300  # per worker, between the two readings
MAX_RSS_GROWTH = 0.02


@pytest.mark.slow
def test_eight_clients_mixed_transports_and_models(server: ServerProcess, wait_until: Callable[..., Any]) -> None:
    context = multiprocessing.get_context("spawn")  # no fork of this process's gRPC threads
    barrier = context.Barrier(WORKERS + 1)
    results = context.Queue()
    shm_before = our_shm_entries({server.pid})
    plans = [(server.unix_target, "auto")] * 4 + [(server.unix_target, "grpc")] * 2 + [(server.tcp_target, "grpc")] * 2
    processes = [
        context.Process(target=worker, args=(i, target, transport, WARM_CALLS, CALLS, barrier, results), daemon=True)
        for i, (target, transport) in enumerate(plans)
    ]
    proc = psutil.Process(server.pid)
    started = time.monotonic()
    for process in processes:
        process.start()
    try:
        barrier.wait(300)
        rss_warm = proc.memory_info().rss
        barrier.wait(60)
        barrier.wait(300)
        rss_end = proc.memory_info().rss
        barrier.wait(60)
        reports = [results.get(timeout=60) for _ in processes]
        for process in processes:
            process.join(30)
    finally:
        for process in processes:
            if process.is_alive():
                process.kill()
    elapsed = time.monotonic() - started
    total = sum(r["calls"] for r in reports)
    errors = [e for r in reports for e in r["errors"]]
    growth = (rss_end - rss_warm) / rss_warm
    print(f"\n{total} calls in {elapsed:.1f}s ({total / elapsed:.0f}/s); server RSS {rss_warm >> 20} MiB after "
          f"warm-up, {rss_end >> 20} MiB at the end ({growth:+.2%})")
    assert not errors, errors[:5]
    assert total == WORKERS * (WARM_CALLS + CALLS) >= 5000
    assert sorted(r["transport"] for r in reports) == ["grpc"] * 4 + ["shm"] * 4
    assert growth < MAX_RSS_GROWTH
    pids = {r["pid"] for r in reports}
    assert wait_until(lambda: our_shm_entries({server.pid, *pids}) == shm_before, timeout=10)
    assert registered_names(v2_stub(server.unix_target)) == set()
    assert server.alive()
