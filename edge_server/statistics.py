"""Per-version inference statistics, as the v2 ModelStatistics call reports them.

    stats = book.of(model)                   # zero for a version just loaded
    book.success(stats, queue_ns, (input_ns, infer_ns, output_ns), total_ns, batch_size=1)

Counters belong to one loaded ModelRuntime: a version unloaded and loaded again starts from zero, as in Triton.
"""

from __future__ import annotations

import threading
import time
import weakref

from .runtime import ModelRuntime


class Duration:
    """A count and a total in nanoseconds, as v2 statistics report them."""

    __slots__ = ("count", "ns")

    def __init__(self) -> None:
        self.count = 0
        self.ns = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.ns += ns


class ModelStats:
    """Counters for one model version; updated under the DataPlane's stats lock."""

    def __init__(self) -> None:
        self.success = Duration()
        self.fail = Duration()
        self.queue = Duration()
        self.compute_input = Duration()
        self.compute_infer = Duration()
        self.compute_output = Duration()
        self.inference_count = 0
        self.execution_count = 0
        self.last_inference_ms = 0


class StatisticsBook:
    """The counters of every loaded model version, kept as long as the version's runtime lives."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_model: weakref.WeakKeyDictionary[ModelRuntime, ModelStats] = weakref.WeakKeyDictionary()

    def of(self, model: ModelRuntime) -> ModelStats:
        stats = self._by_model.get(model)
        if stats is None:
            with self._lock:
                stats = self._by_model.setdefault(model, ModelStats())
        return stats

    def failure(self, stats: ModelStats, total_ns: int) -> None:
        with self._lock:
            stats.fail.add(total_ns)

    def success(
        self, stats: ModelStats, queue_ns: int, compute_ns: tuple[int, int, int], total_ns: int, batch_size: int = 1
    ) -> None:
        """One successful execution; inference_count counts each of its `batch_size` inferences, as Triton's."""
        with self._lock:
            stats.queue.add(queue_ns)
            stats.compute_input.add(compute_ns[0])
            stats.compute_infer.add(compute_ns[1])
            stats.compute_output.add(compute_ns[2])
            stats.success.add(total_ns)
            stats.inference_count += batch_size
            stats.execution_count += 1
            stats.last_inference_ms = int(time.time() * 1000)
