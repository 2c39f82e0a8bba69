"""One thread that fires every call's deadline, instead of a timer thread per call.

    alarms = Alarms()
    handle = alarms.at(time.monotonic() + 0.5, lambda: setattr(run_options, "terminate", True))
    ...; alarms.cancel(handle)                  # the call ended first: nothing fires

Starting a threading.Timer costs a thread start and exit per call (about 100 µs on a small edge CPU); here
a call with a deadline costs one heap push and one cancel under a lock. The thread starts on first use and
sleeps until the nearest deadline; callbacks must be quick (they run on that thread).
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

log = logging.getLogger(__name__)


class Alarm:
    """A pending callback; `cancel()` through Alarms, or let it fire."""

    __slots__ = ("callback", "cancelled", "when")

    def __init__(self, when: float, callback: Callable[[], object]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False


class Alarms:
    """Callbacks at monotonic times, run by one daemon thread in deadline order."""

    def __init__(self, name: str = "edgecow-deadlines") -> None:
        self._name = name
        self._heap: list[tuple[float, int, Alarm]] = []
        self._order = itertools.count()  # ties keep their order and never compare Alarms
        self._wake = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._pending = 0

    def at(self, when: float, callback: Callable[[], object]) -> Alarm:
        """Run `callback` at monotonic time `when` unless cancelled first."""
        alarm = Alarm(when, callback)
        with self._wake:
            earliest = not self._heap or when < self._heap[0][0]
            heapq.heappush(self._heap, (when, next(self._order), alarm))
            self._pending += 1
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                self._thread.start()
            elif earliest:
                self._wake.notify()
        return alarm

    def cancel(self, alarm: Alarm) -> None:
        """Forget `alarm`; a cancelled entry leaves the heap when it comes up or when most are cancelled."""
        with self._wake:
            if alarm.cancelled:
                return
            alarm.cancelled = True
            self._pending -= 1
            if len(self._heap) > 64 and self._pending < len(self._heap) // 2:
                # Calls usually end long before their deadline: drop the dead entries so the heap stays
                # as large as the calls actually waiting.
                self._heap = [entry for entry in self._heap if not entry[2].cancelled]
                heapq.heapify(self._heap)

    def __len__(self) -> int:
        return self._pending

    def _run(self) -> None:
        while True:
            with self._wake:
                due = self._next_due()
            if due is not None:
                try:
                    due.callback()
                except Exception:  # one bad callback must not stop every later deadline
                    log.exception("a deadline callback failed")

    def _next_due(self) -> Alarm | None:
        """Wait (holding the condition) until an alarm is due and pop it; None when woken for a nearer one."""
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        if not self._heap:
            self._wake.wait()
            return None
        remaining = self._heap[0][0] - time.monotonic()
        if remaining > 0:
            self._wake.wait(min(remaining, threading.TIMEOUT_MAX))
            return None
        alarm = heapq.heappop(self._heap)[2]  # not cancelled: the loop above dropped those
        alarm.cancelled = True  # fired: a later cancel() is a no-op
        self._pending -= 1
        return alarm
