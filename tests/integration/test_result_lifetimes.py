"""Results over shared memory own their segment: they stay right however long and wherever they are kept.

    .venv/bin/pytest tests/integration/test_result_lifetimes.py

Each array EdgeClient.infer returns over shm lives in the segment the server wrote it to, and that segment
goes back to the pool only when the array and every view of it are gone. These tests keep results across
threads, past the client's life and in large numbers, and check that no later call ever writes over one.
"""

from __future__ import annotations

import gc
import queue
import threading

import numpy as np
import pytest

from shm_client import EdgeClient
from tests.support.processes import ServerProcess

pytestmark = pytest.mark.shared_server  # calls only: see tests/conftest.py

A = np.arange(16, dtype=np.float32).reshape(1, 16)


def _sum(client: EdgeClient, scale: float) -> np.ndarray:
    return client.infer("add_sub", {"a": A * scale, "b": A})["sum"]


def test_a_result_handed_to_another_thread_survives_the_calls_made_meanwhile(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target, transport="shm") as client:
        handed: queue.Queue[np.ndarray] = queue.Queue()
        checked: queue.Queue[bool] = queue.Queue()
        go = threading.Event()

        def reader() -> None:
            result = handed.get(timeout=30)
            assert go.wait(30)
            checked.put(bool(np.array_equal(result, A * 3 + A)))

        thread = threading.Thread(target=reader)
        thread.start()
        handed.put(_sum(client, 3)[:, :])  # a view; the original is dropped here
        for scale in range(10, 60):  # the pool lends segments over and over meanwhile
            np.testing.assert_array_equal(_sum(client, scale), A * scale + A)
        go.set()
        thread.join(30)
        assert checked.get(timeout=1)


def test_many_results_kept_at_once_each_keep_their_own_values(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target, transport="shm") as client:
        session = client._session
        kept = [_sum(client, scale) for scale in range(300)]
        for scale, result in enumerate(kept):
            np.testing.assert_array_equal(result, A * scale + A)
        assert len({result.ctypes.data for result in kept}) == len(kept)  # one segment each, none shared
        assert len(session._owned) == len(kept)
        del kept, result
        gc.collect()
        assert not session._owned  # every segment went back to the pool
        np.testing.assert_array_equal(_sum(client, 7), A * 7 + A)


def test_results_from_many_threads_at_once_are_each_right(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target, transport="shm") as client:
        failures: list[str] = []

        def worker(offset: int) -> None:
            mine = [(scale, _sum(client, scale)) for scale in range(offset, offset + 40)]
            failures.extend(f"scale {s}" for s, r in mine if not np.array_equal(r, A * s + A))

        threads = [threading.Thread(target=worker, args=(100 * i,)) for i in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert not failures
