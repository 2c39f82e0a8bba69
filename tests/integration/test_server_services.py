"""The server's standard side services and listeners: health, reflection, TLS, concurrency.

    pytest tests/integration/test_server_services.py
"""

from __future__ import annotations

from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from shm_client import EdgeClient
from tests.support.certs import self_signed
from tests.support.gate import Call, Gate
from tests.support.processes import ServerProcess
from tests.support.stubs import v2_stub

pytestmark = pytest.mark.shared_server  # calls only: see tests/conftest.py


def test_health_service_reports_serving_for_the_server_and_the_v2_service(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.tcp_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "inference.GRPCInferenceService", "edgecow.v1.EdgecowService"):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_lists_the_v2_and_edgecow_services_and_describes_them(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.unix_target.replace("unix://", "unix:")) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        requests = [
            reflection_pb2.ServerReflectionRequest(list_services=""),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="inference.GRPCInferenceService"),
            reflection_pb2.ServerReflectionRequest(file_containing_symbol="edgecow.v1.EdgecowService"),
        ]
        replies = list(stub.ServerReflectionInfo(iter(requests), timeout=5))
    names = {s.name for s in replies[0].list_services_response.service}
    assert {"inference.GRPCInferenceService", "edgecow.v1.EdgecowService", "grpc.health.v1.Health"} <= names
    assert replies[1].file_descriptor_response.file_descriptor_proto, replies[1]
    assert replies[2].file_descriptor_response.file_descriptor_proto, replies[2]


def test_tls_listener_serves_inference_to_a_client_that_trusts_the_certificate(
    model_repo: Path, tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path)
    proc = ServerProcess(model_repo, tmp_path, "--tls-cert", str(cert), "--tls-key", str(key)).start()
    try:
        port = proc.tcp_target.rsplit(":", 1)[1]
        with EdgeClient(f"localhost:{port}", root_certificates=cert.read_bytes(), transport="grpc") as client:
            x = np.arange(8, dtype=np.float32)
            np.testing.assert_array_equal(client.infer("scale", {"x": x}, version=1)["y"], x)
        with EdgeClient(f"localhost:{port}", transport="grpc", timeout=3) as plain:
            assert not plain.ready()  # a plaintext client cannot talk to the TLS port
    finally:
        assert proc.stop() == 0


def test_calls_on_one_model_run_concurrently(server: ServerProcess, gate: Gate, wait_until) -> None:
    """Two calls are inside onnxruntime at the same time (the server shows both in flight)."""
    stub = v2_stub(server.unix_target)
    x = np.arange(4, dtype=np.float32)
    calls = [Call(lambda: stub.ModelInfer(gate.request(x), timeout=60)) for _ in range(2)]
    try:
        both = wait_until(lambda: gate.in_flight() == 2, timeout=30)
    finally:
        gate.open()
    for call in calls:
        np.testing.assert_array_equal(np.frombuffer(call.result().raw_output_contents[0], np.float32), x)
    assert both, f"in flight at the end of the wait: {gate.in_flight()}"


@pytest.mark.parametrize("service", ["inference.GRPCInferenceService", "edgecow.v1.EdgecowService"])
def test_server_metadata_lists_the_extensions(server: ServerProcess, service: str) -> None:
    from shm_client.shared._proto import inference_pb2, inference_pb2_grpc

    with grpc.insecure_channel(server.tcp_target) as channel:
        reply = inference_pb2_grpc.GRPCInferenceServiceStub(channel).ServerMetadata(
            inference_pb2.ServerMetadataRequest(), timeout=5
        )
    assert reply.name == "edgecow"
    assert {"system_shared_memory", "model_repository", "statistics", "edgecow"} <= set(reply.extensions)
