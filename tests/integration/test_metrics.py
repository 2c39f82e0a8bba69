"""The Prometheus endpoint of a real server, scraped over HTTP and read with prometheus_client's parser.

    families = scrape(metrics_url(server))
    value(families, "edgecow_requests_total", model="scale", version="2", code="OK")
"""

from __future__ import annotations

import re
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from shm_client.shared._proto import inference_pb2 as pb
from tests.support.gate import Call, Gate
from tests.support.processes import ServerProcess
from tests.support.stubs import v2_stub
from tests.support.waiting import wait_until

METRICS_LINE = re.compile(r"metrics on (http://\S+)")
PHASES = ("queue", "compute_input", "compute_infer", "compute_output")


@pytest.fixture(scope="module")
def metrics_server(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    # One call per model at a time, so a second gate call waits in the queue.
    proc = ServerProcess(
        model_repo, tmp_path_factory.mktemp("metrics"), "--metrics-listen", "127.0.0.1:0",
        "--max-inflight-per-model", "1",
    ).start()
    yield proc
    proc.stop()


def metrics_url(server: ServerProcess) -> str:
    match = METRICS_LINE.search(server.log)
    assert match, server.log
    return match.group(1)


def scrape(url: str) -> dict[str, Metric]:
    with urllib.request.urlopen(url, timeout=10) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    return {family.name: family for family in text_string_to_metric_families(text)}


def samples(families: dict[str, Metric], sample_name: str, **labels: str) -> list[float]:
    family_name = re.sub(r"(_total|_bucket|_count|_sum)$", "", sample_name)
    family = families.get(family_name)
    if family is None:
        return []
    return [s.value for s in family.samples
            if s.name == sample_name and all(s.labels.get(k) == v for k, v in labels.items())]


def value(families: dict[str, Metric], sample_name: str, **labels: str) -> float:
    found = samples(families, sample_name, **labels)
    assert len(found) == 1, (sample_name, labels, found)
    return found[0]


def scale_request(version: str, datatype: str = "FP32") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="scale", model_version=version)
    request.inputs.add(name="x", datatype=datatype, shape=[4])
    request.raw_input_contents.append(np.ones(4, np.float32).tobytes())
    return request


def test_requests_are_counted_by_model_version_and_status_with_latency_histograms(
    metrics_server: ServerProcess,
) -> None:
    stub = v2_stub(metrics_server.unix_target)
    for _ in range(3):
        stub.ModelInfer(scale_request("2"), timeout=30)
    for _ in range(2):
        stub.ModelInfer(scale_request("1"), timeout=30)
    for _ in range(2):
        with pytest.raises(grpc.RpcError) as failed:
            stub.ModelInfer(scale_request("2", datatype="INT32"), timeout=30)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    families = scrape(metrics_url(metrics_server))
    assert value(families, "edgecow_requests_total", model="scale", version="2", code="OK") == 3
    assert value(families, "edgecow_requests_total", model="scale", version="1", code="OK") == 2
    assert value(families, "edgecow_requests_total", model="scale", version="2", code="INVALID_ARGUMENT") == 2
    assert samples(families, "edgecow_requests_total", model="scale", version="1", code="INVALID_ARGUMENT") == []
    # A loaded version no one called is listed with zero.
    assert value(families, "edgecow_requests_total", model="static", version="1", code="OK") == 0
    assert value(families, "edgecow_inferences_total", model="scale", version="2") >= 3

    for version, calls in (("2", 3), ("1", 2)):
        _check_histogram(families, "edgecow_request_duration_seconds", calls, model="scale", version=version)
        for phase in PHASES:
            _check_histogram(families, "edgecow_request_phase_duration_seconds", calls,
                             model="scale", version=version, phase=phase)


def _check_histogram(families: dict[str, Metric], name: str, calls: int, **labels: str) -> None:
    assert value(families, f"{name}_count", **labels) == calls
    assert value(families, f"{name}_sum", **labels) >= 0
    family = families[name]
    buckets = [(s.labels["le"], s.value) for s in family.samples
               if s.name == f"{name}_bucket" and all(s.labels.get(k) == v for k, v in labels.items())]
    assert buckets[-1] == ("+Inf", calls)
    counts = [count for _, count in buckets]
    assert counts == sorted(counts), buckets  # cumulative
    bounds = [float(le) for le, _ in buckets]
    assert bounds == sorted(bounds)


def test_calls_in_flight_and_queued_and_shared_memory_are_reported(metrics_server: ServerProcess) -> None:
    url = metrics_url(metrics_server)
    before = scrape(url)
    assert value(before, "edgecow_calls_in_flight") == 0
    stub = v2_stub(metrics_server.unix_target)
    with Gate(metrics_server.unix_target) as gate:
        families = scrape(url)
        assert value(families, "edgecow_shm_regions") == value(before, "edgecow_shm_regions") + 1
        assert value(families, "edgecow_shm_mapped_bytes") >= value(before, "edgecow_shm_mapped_bytes") + 4
        x = np.ones(2, np.float32)
        first = Call(lambda: stub.ModelInfer(gate.request(x), timeout=60))
        assert wait_until(lambda: value(scrape(url), "edgecow_model_calls_running", model="gate") == 1)
        second = Call(lambda: stub.ModelInfer(gate.request(x), timeout=60))
        assert wait_until(lambda: value(scrape(url), "edgecow_model_calls_queued", model="gate") == 1)
        families = scrape(url)
        assert value(families, "edgecow_calls_in_flight") == 2
        assert value(families, "edgecow_model_calls_running", model="gate") == 1
        gate.open()
        first.result()
        second.result()
    families = scrape(url)
    assert value(families, "edgecow_calls_in_flight") == 0
    assert value(families, "edgecow_model_calls_queued", model="gate") == 0
    assert value(families, "edgecow_model_calls_running", model="gate") == 0
    assert value(families, "edgecow_shm_regions") == value(before, "edgecow_shm_regions")
    assert value(families, "edgecow_requests_total", model="gate", version="1", code="OK") == 2


def test_model_state_and_process_figures_are_reported(metrics_server: ServerProcess) -> None:
    families = scrape(metrics_url(metrics_server))
    assert value(families, "edgecow_model_state", model="scale", version="2", state="READY") == 1
    assert value(families, "edgecow_model_state", model="scale", version="1", state="READY") == 1
    assert value(families, "edgecow_process_cpu_seconds_total") > 0
    assert value(families, "edgecow_process_resident_memory_bytes") > 1 << 20
    assert value(families, "edgecow_process_threads") >= 2
    assert value(families, "edgecow_process_open_fds") >= 3
    # These models run on the CPU: no GPU figures.
    assert "edgecow_gpu_memory_used_bytes" not in families


def test_a_metrics_port_in_use_stops_the_start_before_models_load(model_repo: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = ServerProcess(model_repo, tmp_path, "--metrics-listen", f"127.0.0.1:{port}").start()
        assert proc.wait() != 0
    assert "port is in use" in proc.log and "--metrics-listen" in proc.log, proc.log
    assert "loaded model" not in proc.log
    assert "Traceback" not in proc.log


def test_metrics_none_serves_no_endpoint(model_repo: Path, tmp_path: Path) -> None:
    with ServerProcess(model_repo, tmp_path, "--metrics-listen", "none") as proc:
        v2_stub(proc.unix_target).ModelInfer(scale_request("2"), timeout=30)
        assert not METRICS_LINE.search(proc.log)
