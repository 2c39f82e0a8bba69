"""Per-version inference statistics, as the v2 ModelStatistics call reports them.

    stats = book.of(model)                   # zero for a version just loaded
    book.success(stats, queue_ns, (input_ns, infer_ns, output_ns), total_ns, batch_size=1)
    book.failure(stats, total_ns, "INVALID_ARGUMENT")
    for model, copy in book.snapshot(): ...  # consistent copies, for the metrics endpoint

Counters belong to one loaded ModelRuntime: a version unloaded and loaded again starts from zero, as in Triton.
"""

from __future__ import annotations

import bisect
import copy
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


# Upper bounds of the latency histograms, in seconds: 50 µs (a small model on shm) to 10 s (a large one).
HISTOGRAM_BOUNDS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
_BOUNDS_NS = tuple(int(bound * 1e9) for bound in HISTOGRAM_BOUNDS)


class Histogram:
    """Counts per fixed bucket (HISTOGRAM_BOUNDS, then +Inf) and the total: one bisect per observation."""

    __slots__ = ("buckets", "ns")

    def __init__(self) -> None:
        self.buckets = [0] * (len(_BOUNDS_NS) + 1)
        self.ns = 0

    def observe(self, ns: int) -> None:
        self.buckets[bisect.bisect_left(_BOUNDS_NS, ns)] += 1
        self.ns += ns


# The phases a successful call's time is split into, as ModelStatistics splits it.
PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


class ModelStats:
    """Counters for one model version; updated under the DataPlane's stats lock."""

    def __init__(self) -> None:
        self.failures_by_code: dict[str, int] = {}
        self.request_histogram = Histogram()  # whole successful calls
        self.phase_histograms = {phase: Histogram() for phase in PHASES}
        self.phase_order = tuple(self.phase_histograms.values())  # in PHASES order, for success()
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

    def failure(self, stats: ModelStats, total_ns: int, code: str = "UNKNOWN") -> None:
        """One failed call; `code` is the gRPC status name it ended with."""
        with self._lock:
            stats.fail.add(total_ns)
            stats.failures_by_code[code] = stats.failures_by_code.get(code, 0) + 1

    def snapshot(self) -> list[tuple[ModelRuntime, ModelStats]]:
        """A copy of every live version's counters, taken at one instant under the lock."""
        with self._lock:
            return [(model, copy.deepcopy(stats)) for model, stats in list(self._by_model.items())]

    def success(
        self, stats: ModelStats, queue_ns: int, compute_ns: tuple[int, int, int], total_ns: int, batch_size: int = 1
    ) -> None:
        """One successful execution; inference_count counts each of its `batch_size` inferences, as Triton's."""
        input_ns, infer_ns, output_ns = compute_ns
        now_ms = time.time_ns() // 1_000_000
        with self._lock:
            stats.queue.add(queue_ns)
            stats.compute_input.add(input_ns)
            stats.compute_infer.add(infer_ns)
            stats.compute_output.add(output_ns)
            stats.success.add(total_ns)
            stats.request_histogram.observe(total_ns)
            queue, compute_input, compute_infer, compute_output = stats.phase_order
            queue.observe(queue_ns)
            compute_input.observe(input_ns)
            compute_infer.observe(infer_ns)
            compute_output.observe(output_ns)
            stats.inference_count += batch_size
            stats.execution_count += 1
            stats.last_inference_ms = now_ms
