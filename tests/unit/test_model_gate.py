"""ModelGate: at most `limit` calls run, at most `queue` wait, a freed slot goes to a waiter, deadlines hold.

    pytest tests/unit/test_model_gate.py
"""

from __future__ import annotations

import threading
import time

import pytest

from edge_server.admission import ModelGate
from shm_client.shared.errors import DeadlineExceeded, ResourceExhausted
from tests.support.waiting import wait_until


def test_a_freed_slot_goes_to_the_call_waiting_for_it() -> None:
    gate = ModelGate("m", limit=1, queue=1)
    gate.acquire(None)
    entered = threading.Event()

    def waiter() -> None:
        gate.acquire(time.monotonic() + 60)
        entered.set()
        gate.release()

    thread = threading.Thread(target=waiter)
    thread.start()
    assert wait_until(lambda: gate.waiting == 1)
    assert not entered.is_set()
    with pytest.raises(ResourceExhausted, match="max_queue_per_model"):
        gate.acquire(None)  # the one waiting place is taken
    gate.release()
    thread.join(60)
    assert entered.is_set() and gate.running == 0 and gate.waiting == 0


def test_a_wait_ends_at_the_deadline() -> None:
    gate = ModelGate("m", limit=1, queue=4)
    gate.acquire(None)
    with pytest.raises(DeadlineExceeded, match="waited for model 'm'"):
        gate.acquire(time.monotonic() + 0.05)
    assert gate.running == 1 and gate.waiting == 0
    gate.release()
    gate.acquire(None)
    assert gate.running == 1
    gate.release()
    assert gate.running == 0
