"""Prometheus metrics over HTTP, read from the server's own state when scraped.

    endpoint = MetricsEndpoint.bind("127.0.0.1:8002", ServerCollector(store, registry, plane), "the default")
    endpoint.start(); endpoint.address   # ("127.0.0.1", 8002); GET /metrics
    endpoint.stop()

Nothing here runs per call: counters and the latency histograms are kept by StatisticsBook (statistics.py),
the rest is read from the admission gates, the region registry, the model store and psutil at scrape time.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import socket
import threading
from collections.abc import Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import psutil
from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from shm_client.shared.errors import FailedPrecondition

from .dataplane import DataPlane
from .regions import RegionRegistry
from .repository import ModelStore
from .runtime import GPU_PROVIDERS
from .statistics import HISTOGRAM_BOUNDS, PHASES, Histogram

log = logging.getLogger("edgecow")

_VERSION_LABELS = ["model", "version"]


class ServerCollector(Collector):
    """Every edgecow metric, gathered from the server's state at scrape time."""

    def __init__(self, store: ModelStore, registry: RegionRegistry, plane: DataPlane) -> None:
        self.store = store
        self.registry = registry
        self.plane = plane
        self._process = psutil.Process()
        self._gpu = _GpuMemory()

    def collect(self) -> Iterator[Metric]:
        yield from self._requests()
        yield from self._calls()
        yield from self._models()
        yield from self._shared_memory()
        yield from self._process_figures()
        yield from self._gpu_memory()

    def _requests(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "edgecow_requests", "Inference calls per model version, by the gRPC status they ended with.",
            labels=[*_VERSION_LABELS, "code"],
        )
        inferences = CounterMetricFamily(
            "edgecow_inferences", "Inferences per model version (a batch of n counts n).", labels=_VERSION_LABELS
        )
        duration = HistogramMetricFamily(
            "edgecow_request_duration_seconds", "Time of successful calls from admission to response, "
            "per model version.", labels=_VERSION_LABELS,
        )
        phases = HistogramMetricFamily(
            "edgecow_request_phase_duration_seconds", "Time of successful calls split as ModelStatistics "
            "splits it: queue, compute_input, compute_infer, compute_output.", labels=[*_VERSION_LABELS, "phase"],
        )
        for model in self.store.loaded():
            self.plane.statistics.of(model)  # a loaded version no one has called yet shows its zeros
        for model, stats in self.plane.statistics.snapshot():
            labels = [model.name, str(model.version)]
            requests.add_metric([*labels, "OK"], stats.success.count)
            for code, count in sorted(stats.failures_by_code.items()):
                requests.add_metric([*labels, code], count)
            inferences.add_metric(labels, stats.inference_count)
            duration.add_metric(labels, *_histogram(stats.request_histogram))
            for phase in PHASES:
                phases.add_metric([*labels, phase], *_histogram(stats.phase_histograms[phase]))
        yield from (requests, inferences, duration, phases)

    def _calls(self) -> Iterator[Metric]:
        admission = self.plane.admission
        yield GaugeMetricFamily("edgecow_calls_in_flight", "Inference calls admitted and not yet answered.",
                                value=admission.in_flight)
        running = GaugeMetricFamily("edgecow_model_calls_running", "Calls a model is running now.", labels=["model"])
        queued = GaugeMetricFamily("edgecow_model_calls_queued", "Calls waiting for a model's free slot.",
                                   labels=["model"])
        for name in sorted({model.name for model in self.store.loaded()}):
            gate = admission.gate(name)
            running.add_metric([name], gate.running)
            queued.add_metric([name], gate.waiting)
        yield from (running, queued)

    def _models(self) -> Iterator[Metric]:
        state = GaugeMetricFamily("edgecow_model_state", "1 for each model version's load state "
                                  "(READY, UNAVAILABLE or UNLOADED).", labels=[*_VERSION_LABELS, "state"])
        for entry in self.store.index():
            state.add_metric([entry.name, str(entry.version), entry.state], 1)
        yield state

    def _shared_memory(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("edgecow_shm_regions", "Registered shared-memory regions.", value=len(self.registry))
        yield GaugeMetricFamily("edgecow_shm_mapped_bytes", "Bytes of client shared memory the server maps.",
                                value=self.registry.mapped_bytes())

    def _process_figures(self) -> Iterator[Metric]:
        proc = self._process
        with proc.oneshot():
            times = proc.cpu_times()
            rss = proc.memory_info().rss
            threads = proc.num_threads()
            fds = proc.num_fds()
        yield CounterMetricFamily("edgecow_process_cpu_seconds", "CPU time the server used (user and system).",
                                  value=times.user + times.system)
        yield GaugeMetricFamily("edgecow_process_resident_memory_bytes", "Resident memory of the server.", value=rss)
        yield GaugeMetricFamily("edgecow_process_threads", "Threads of the server.", value=threads)
        yield GaugeMetricFamily("edgecow_process_open_fds", "Open file descriptors of the server.", value=fds)

    def _gpu_memory(self) -> Iterator[Metric]:
        if not any(set(model.providers) & set(GPU_PROVIDERS) for model in self.store.loaded()):
            return
        devices = self._gpu.read()
        if not devices:
            return
        used = GaugeMetricFamily("edgecow_gpu_memory_used_bytes", "Memory in use on a GPU (every process's), "
                                 "by NVML device index.", labels=["gpu"])
        total = GaugeMetricFamily("edgecow_gpu_memory_total_bytes", "Memory of a GPU, by NVML device index.",
                                  labels=["gpu"])
        for index, (used_bytes, total_bytes) in enumerate(devices):
            used.add_metric([str(index)], used_bytes)
            total.add_metric([str(index)], total_bytes)
        yield from (used, total)


def _histogram(histogram: Histogram) -> tuple[list[tuple[str, float]], float]:
    """(cumulative buckets with +Inf, sum in seconds) as HistogramMetricFamily.add_metric takes them."""
    buckets: list[tuple[str, float]] = []
    running = 0
    for bound, count in zip((*(repr(b) for b in HISTOGRAM_BOUNDS), "+Inf"), histogram.buckets):
        running += count
        buckets.append((bound, running))
    return buckets, histogram.ns / 1e9


class _NvmlMemory(ctypes.Structure):
    _fields_ = [("total", ctypes.c_ulonglong), ("free", ctypes.c_ulonglong), ("used", ctypes.c_ulonglong)]


class _GpuMemory:
    """Per-device memory from NVML (libnvidia-ml, installed with the NVIDIA driver); no figures where it is
    missing or fails, so a box without the driver's library simply has no GPU metrics."""

    def __init__(self) -> None:
        self._lib: Any = None
        self._tried = False
        self._lock = threading.Lock()

    def _library(self) -> Any:
        with self._lock:
            if not self._tried:
                self._tried = True
                try:
                    lib = ctypes.CDLL("libnvidia-ml.so.1")
                    if lib.nvmlInit_v2() == 0:
                        self._lib = lib
                except (OSError, AttributeError):
                    log.debug("NVML is not available: no GPU memory metrics")
            return self._lib

    def read(self) -> list[tuple[int, int]]:
        """(used, total) bytes per device, in NVML's order; empty when NVML cannot say."""
        lib = self._library()
        if lib is None:
            return []
        count = ctypes.c_uint()
        if lib.nvmlDeviceGetCount_v2(ctypes.byref(count)) != 0:
            return []
        devices = []
        for index in range(count.value):
            handle = ctypes.c_void_p()
            memory = _NvmlMemory()
            if (lib.nvmlDeviceGetHandleByIndex_v2(ctypes.c_uint(index), ctypes.byref(handle)) != 0
                    or lib.nvmlDeviceGetMemoryInfo(handle, ctypes.byref(memory)) != 0):
                return []
            devices.append((memory.used, memory.total))
        return devices


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds are not worth a log line each."""


WAKE_TIMEOUT = 0.05  # seconds; how long stop() waits for each wake-up connection and then for the loop


class _MetricsHttpServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True  # a scrape still running at shutdown does not hold the process


class MetricsEndpoint:
    """The HTTP listener of the metrics: bound by `bind` (so a clash shows before any model loads), served
    from a daemon thread by `start`."""

    def __init__(self, httpd: WSGIServer) -> None:
        self._httpd = httpd
        self._thread: threading.Thread | None = None

    @classmethod
    def bind(cls, listen: str, collector: Collector, source: str, flag: str = "--metrics-listen") -> MetricsEndpoint:
        """Bind `listen` (set by `source`, which error messages name with the `flag` that changes it)."""
        host, _, port = listen.rpartition(":")
        host = host.strip("[]")
        if not host or not port.isdigit():
            raise FailedPrecondition(f"metrics address {listen!r} (from {source}) is not HOST:PORT; give one, "
                                     f"or 'none', with {flag}")
        registry = CollectorRegistry(auto_describe=False)
        registry.register(collector)

        class Server(_MetricsHttpServer):
            address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

        try:
            httpd = make_server(host, int(port), make_wsgi_app(registry), Server, handler_class=_QuietHandler)
        except OSError as err:
            why = "the port is in use" if err.errno == errno.EADDRINUSE else err.strerror or str(err)
            raise FailedPrecondition(
                f"cannot serve metrics on {listen} (from {source}): {why}; choose another {flag}, or 'none'"
            ) from None
        return cls(httpd)

    @property
    def address(self) -> tuple[str, int]:
        host, port = self._httpd.server_address[:2]
        return str(host), int(port)

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://{f'[{host}]' if ':' in host else host}:{port}/metrics"

    def start(self) -> None:
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="edgecow-metrics", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            # serve_forever notices shutdown() only when its poll wakes (every 0.5 s when idle); a connection
            # of our own wakes it at once, so a stopping server does not wait out the poll.
            stopper = threading.Thread(target=self._httpd.shutdown, name="edgecow-metrics-stop", daemon=True)
            stopper.start()
            address = self._httpd.server_address
            while stopper.is_alive():
                with contextlib.suppress(OSError):
                    socket.create_connection((str(address[0]), int(address[1])), timeout=WAKE_TIMEOUT).close()
                stopper.join(WAKE_TIMEOUT)
            self._thread.join()
        self._httpd.server_close()


def metrics_wanted(listen: str) -> bool:
    """Whether `metrics_listen` asks for an endpoint ('none', 'off' or empty turn it off)."""
    return listen.strip().lower() not in ("", "none", "off")
