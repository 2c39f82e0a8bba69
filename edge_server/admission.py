"""Admission: which calls may start, how many run per model, and the drain at shutdown.

    admission = Admission(settings)
    admission.admit(); gate = admission.gate("scale"); gate.acquire(deadline)   # Unavailable while draining
    ...; gate.release(); admission.leave()
    admission.drain(timeout=30.0)                                              # True when no call is left
"""

from __future__ import annotations

import threading
import time

from shm_client.shared.errors import DeadlineExceeded, ResourceExhausted, Unavailable

from .config import Settings


class ModelGate:
    """At most `limit` calls of a model run at once; at most `queue` more wait, the rest are refused."""

    def __init__(self, name: str, limit: int, queue: int) -> None:
        self.name = name
        self.limit = limit
        self.queue = queue
        self._lock = threading.Lock()
        self._freed = threading.Condition(self._lock)
        self.waiting = 0
        self.running = 0

    def acquire(self, deadline: float | None) -> None:
        """A running slot, waiting until `deadline` (monotonic) for one; release() gives it back."""
        with self._lock:
            if self.running < self.limit:  # the common case: one lock, no wait
                self.running += 1
                return
            if self.waiting >= self.queue:
                raise ResourceExhausted(
                    f"model {self.name!r} is at its limit of calls in flight and {self.queue} are already "
                    "waiting; retry later or raise max_queue_per_model"
                )
            self.waiting += 1
            try:
                while self.running >= self.limit:
                    timeout = None if deadline is None else deadline - time.monotonic()
                    if timeout is not None and timeout <= 0:
                        raise DeadlineExceeded(f"the call's deadline passed while it waited for model {self.name!r}")
                    self._freed.wait(timeout)
            finally:
                self.waiting -= 1
            self.running += 1

    def release(self) -> None:
        with self._lock:
            self.running -= 1
            if self.waiting:
                self._freed.notify()


class Admission:
    """Counts the calls in flight, refuses new ones once draining, and holds one ModelGate per model."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._gates: dict[str, ModelGate] = {}
        self._lock = threading.Lock()
        self.accepting = True
        self._in_flight = 0
        self._idle = threading.Condition(self._lock)

    def admit(self) -> None:
        """Count a call in flight; Unavailable once draining. leave() ends it."""
        with self._lock:
            if not self.accepting:
                raise Unavailable("the server is shutting down and takes no new calls")
            self._in_flight += 1

    def leave(self) -> None:
        with self._lock:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._idle.notify_all()

    def drain(self, timeout: float) -> bool:
        """Refuse new calls and wait up to `timeout` s for those in flight; True when none are left."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self.accepting = False
            while self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def responsive(self, timeout: float) -> bool:
        """Whether the lock every call takes is free within `timeout` s (the watchdog's check)."""
        if not self._lock.acquire(timeout=timeout):
            return False
        self._lock.release()
        return True

    def gate(self, name: str) -> ModelGate:
        gate = self._gates.get(name)
        if gate is None:
            with self._lock:
                gate = self._gates.setdefault(
                    name,
                    ModelGate(name, self.settings.max_inflight_per_model, self.settings.max_queue_per_model),
                )
        return gate
