"""Every limit the server has: set by a flag (documented in `serve --help`) or an EDGECOW_ variable, and
a request past it is refused with RESOURCE_EXHAUSTED or DEADLINE_EXCEEDED and a message naming the limit.

    pytest tests/reliability/test_limits.py
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from edge_server.config import ConfigError, load_settings
from shm_client.shared._proto import inference_pb2 as pb
from tests.support.gate import Call, Gate, inline_gate_request
from tests.support.processes import REPO_ROOT, ServerProcess
from tests.support.shm import our_shm_entries
from tests.support.stubs import in_flight, registered_names, rpc_error, v2_stub

C = grpc.StatusCode
LIMIT_FLAGS = {
    "--max-request-bytes": "65536",
    "--max-tensor-bytes": "4096",
    "--max-elements": "2048",
    "--shm-max-regions": "2",
    "--shm-max-mapped-bytes": "12288",
    "--max-inflight-per-model": "1",
    "--max-queue-per-model": "1",
}
X = np.arange(8, dtype=np.float32)


@pytest.fixture(scope="module")
def limited(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    args = [part for flag, value in LIMIT_FLAGS.items() for part in (flag, value)]
    server = ServerProcess(model_repo, tmp_path_factory.mktemp("limits"), *args).start()
    yield server
    server.stop()


@pytest.fixture
def stub(limited: ServerProcess) -> Any:
    return v2_stub(limited.unix_target)


def tensor_request(model: str, name: str, array: np.ndarray, dtype: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name=name, datatype=dtype, shape=array.shape)
    request.raw_input_contents.append(array.tobytes())
    return request


def gated(gate: int, timeout_us: int | None = None) -> pb.ModelInferRequest:
    """The gate model on X with its gate in the request: 1 answers at once, 0 runs until stopped."""
    request = inline_gate_request(X, gate)
    if timeout_us is not None:
        request.parameters["timeout"].int64_param = timeout_us
    return request


def test_serve_help_documents_every_limit() -> None:
    text = subprocess.run(
        [sys.executable, "-m", "edge_server", "serve", "--help"], cwd=REPO_ROOT, capture_output=True, text=True,
        check=True,
    ).stdout
    for flag in (*LIMIT_FLAGS, "--shm-reap-interval", "--grace-period", "--workers"):
        assert flag in text, flag


def test_limits_come_from_environment_variables_too() -> None:
    settings = load_settings(environ={"EDGECOW_MAX_ELEMENTS": "77", "EDGECOW_SHM_MAX_MAPPED_BYTES": "4096"})
    assert (settings.max_elements, settings.shm_max_mapped_bytes) == (77, 4096)
    assert load_settings(environ={"EDGECOW_MAX_ELEMENTS": "77"}, overrides={"max_elements": 5}).max_elements == 5
    with pytest.raises(ConfigError, match="EDGECOW_MAX_TENSOR_BYTES"):
        load_settings(environ={"EDGECOW_MAX_TENSOR_BYTES": "lots"})


def test_request_larger_than_max_request_bytes(stub: Any) -> None:
    err = rpc_error(lambda: stub.ModelInfer(tensor_request("scale", "x", np.ones(20_000, np.float32), "FP32")))
    assert err is not None and err.code() == C.RESOURCE_EXHAUSTED
    assert "larger than max" in err.details() and "65536" in err.details()


def test_tensor_larger_than_max_tensor_bytes(stub: Any) -> None:
    err = rpc_error(lambda: stub.ModelInfer(tensor_request("scale", "x", np.ones(1500, np.float32), "FP32")))
    assert err is not None and err.code() == C.RESOURCE_EXHAUSTED
    assert "'x' is 6000 bytes" in err.details() and "up to 4096 bytes" in err.details()


def test_tensor_in_shm_larger_than_max_tensor_bytes(stub: Any, segments: Callable[..., Any]) -> None:
    segment = segments("limits-tensor", 8192)
    stub.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name="limits-tensor", key=segment.key, byte_size=8192), timeout=10
    )
    try:
        request = pb.ModelInferRequest(model_name="scale")
        tensor = request.inputs.add(name="x", datatype="FP32", shape=[1500])
        tensor.parameters["shared_memory_region"].string_param = "limits-tensor"
        tensor.parameters["shared_memory_byte_size"].int64_param = 6000
        err = rpc_error(lambda: stub.ModelInfer(request, timeout=10))
    finally:
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="limits-tensor"), timeout=10)
    assert err is not None and err.code() == C.RESOURCE_EXHAUSTED and "up to 4096 bytes" in err.details()


def test_tensor_with_more_than_max_elements(stub: Any) -> None:
    err = rpc_error(lambda: stub.ModelInfer(tensor_request("identity_uint8", "x", np.ones(3000, np.uint8), "UINT8")))
    assert err is not None and err.code() == C.RESOURCE_EXHAUSTED
    assert "3000 elements" in err.details() and "at most 2048" in err.details()
    reply = stub.ModelInfer(tensor_request("identity_uint8", "x", np.ones(2048, np.uint8), "UINT8"), timeout=10)
    assert len(reply.raw_output_contents[0]) == 2048


def test_more_regions_than_shm_max_regions(stub: Any, limited: ServerProcess, segments: Callable[..., Any]) -> None:
    before = our_shm_entries({limited.pid})
    keys = [segments(f"limits-r{i}", 4096).key for i in range(3)]
    try:
        for i in range(2):
            stub.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name=f"r{i}", key=keys[i], byte_size=64), timeout=10
            )
        err = rpc_error(lambda: stub.SystemSharedMemoryRegister(
            pb.SystemSharedMemoryRegisterRequest(name="r2", key=keys[2], byte_size=64), timeout=10))
    finally:
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=""), timeout=10)
    assert err is not None and err.code() == C.RESOURCE_EXHAUSTED
    assert "2 shared-memory regions" in err.details() and "unregister" in err.details()
    assert registered_names(stub) == set()
    assert our_shm_entries({limited.pid}) - before == set(keys)  # only the test's own, removed by the fixture


def test_more_mapped_bytes_than_shm_max_mapped_bytes(stub: Any, segments: Callable[..., Any]) -> None:
    first, second = segments("limits-m0", 8192), segments("limits-m1", 8192)
    try:
        stub.SystemSharedMemoryRegister(
            pb.SystemSharedMemoryRegisterRequest(name="m0", key=first.key, byte_size=64), timeout=10
        )
        err = rpc_error(lambda: stub.SystemSharedMemoryRegister(
            pb.SystemSharedMemoryRegisterRequest(name="m1", key=second.key, byte_size=64), timeout=10))
    finally:
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=""), timeout=10)
    assert err is not None and err.code() == C.RESOURCE_EXHAUSTED
    assert "12288 mapped bytes" in err.details()
    assert registered_names(stub) == set()


def test_wait_queue_full_is_refused(stub: Any, limited: ServerProcess, wait_until: Callable[..., Any]) -> None:
    """One call runs, one waits, the next is refused; the two admitted ones both finish."""
    with Gate(limited.unix_target) as gate:
        holder = Call(lambda: stub.ModelInfer(gate.request(X), timeout=120))
        try:
            assert wait_until(lambda: gate.in_flight() == 1, interval=0.01)
            contenders = [Call(lambda: stub.ModelInfer(gate.request(X), timeout=120)) for _ in range(2)]
            assert wait_until(lambda: not all(c.running() for c in contenders), timeout=30)
        finally:
            gate.open()
        outcomes = [contender.error(120) for contender in contenders]
        assert holder.error(120) is None
    refused = [error for error in outcomes if error is not None]
    assert len(refused) == 1, outcomes
    assert refused[0].code() == C.RESOURCE_EXHAUSTED
    assert "max_queue_per_model" in refused[0].details() and "'gate'" in refused[0].details()
    assert sum(error is None for error in outcomes) == 1


def test_grpc_deadline_stops_the_run_and_frees_the_slot(
    stub: Any, limited: ServerProcess, wait_until: Callable[..., Any]
) -> None:
    started = time.monotonic()
    err = rpc_error(lambda: stub.ModelInfer(gated(0), timeout=0.5))
    assert err is not None and err.code() == C.DEADLINE_EXCEEDED
    # onnxruntime was told to terminate: the slot is free, and the shut gate would never have ended the run.
    assert wait_until(lambda: in_flight(limited.unix_target, "gate") == 0, timeout=10)
    reply = stub.ModelInfer(gated(1), timeout=30)  # max_inflight_per_model is 1: the slot is back
    np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[0], np.float32), X)
    assert time.monotonic() - started < 20


def test_timeout_parameter_stops_the_run(stub: Any, limited: ServerProcess, wait_until: Callable[..., Any]) -> None:
    err = rpc_error(lambda: stub.ModelInfer(gated(0, timeout_us=300_000), timeout=60))
    assert err is not None and err.code() == C.DEADLINE_EXCEEDED, err.details()
    assert "deadline" in err.details() and "gate" in err.details()
    assert in_flight(limited.unix_target, "gate") == 0
    assert stub.ModelInfer(gated(1), timeout=30).raw_output_contents


def test_timeout_parameter_expires_while_waiting(
    stub: Any, limited: ServerProcess, wait_until: Callable[..., Any]
) -> None:
    with Gate(limited.unix_target) as gate:
        holder = Call(lambda: stub.ModelInfer(gate.request(X), timeout=120))
        try:
            assert wait_until(lambda: gate.in_flight() == 1, interval=0.01)
            err = rpc_error(lambda: stub.ModelInfer(gated(1, timeout_us=200_000), timeout=60))
        finally:
            gate.open()
        assert holder.error(120) is None
    assert err is not None and err.code() == C.DEADLINE_EXCEEDED
    assert "waited for model 'gate'" in err.details()
    # The waiter left the queue: a later call is admitted.
    assert stub.ModelInfer(gated(1), timeout=30).raw_output_contents


def test_server_survived_the_limits(stub: Any, limited: ServerProcess) -> None:
    assert limited.alive() and stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert "Traceback" not in limited.log
