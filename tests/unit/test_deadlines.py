"""The one deadline thread: alarms fire in deadline order, cancelled ones never, and a bad callback stops nothing.

    .venv/bin/pytest tests/unit/test_deadlines.py
"""

from __future__ import annotations

import threading
import time

from edge_server.deadlines import Alarms

WAIT = 10.0  # seconds to wait for an alarm that must fire; a loaded machine may be slow, never this slow


def test_alarms_fire_in_deadline_order_whatever_the_order_they_were_set() -> None:
    alarms = Alarms()
    fired: list[int] = []
    done = threading.Event()
    now = time.monotonic()
    # The nearest is set last, so the thread already asleep for a later one must wake for it.
    for index, delay in ((3, 0.3), (2, 0.2), (1, 0.1)):
        alarms.at(now + delay, lambda i=index: fired.append(i))
    alarms.at(now + 0.4, done.set)
    assert done.wait(WAIT)
    assert fired == [1, 2, 3]
    assert len(alarms) == 0


def test_a_cancelled_alarm_never_fires() -> None:
    alarms = Alarms()
    fired: list[str] = []
    done = threading.Event()
    now = time.monotonic()
    cancelled = alarms.at(now + 0.05, lambda: fired.append("cancelled"))
    alarms.at(now + 0.1, done.set)
    alarms.cancel(cancelled)
    alarms.cancel(cancelled)  # twice is harmless
    assert done.wait(WAIT)
    assert fired == []


def test_an_alarm_already_due_fires_at_once() -> None:
    alarms = Alarms()
    done = threading.Event()
    alarms.at(time.monotonic() - 1.0, done.set)
    assert done.wait(WAIT)


def test_a_failing_callback_does_not_stop_later_alarms() -> None:
    alarms = Alarms()
    done = threading.Event()
    now = time.monotonic()
    alarms.at(now, lambda: 1 / 0)
    alarms.at(now + 0.05, done.set)
    assert done.wait(WAIT)


def test_many_calls_ending_before_their_deadline_leave_a_small_heap() -> None:
    alarms = Alarms()
    far = time.monotonic() + 3600
    for _ in range(10_000):
        alarms.cancel(alarms.at(far, lambda: None))
    assert len(alarms) == 0
    assert len(alarms._heap) <= 130  # compacted whenever most entries are cancelled
