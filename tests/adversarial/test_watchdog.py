"""The watchdog's health check works on every listener set-up and needs no free gRPC worker, so systemd
restarts a wedged server, not a busy one nor one that serves TLS only.

    pytest tests/adversarial/test_watchdog.py
"""

from __future__ import annotations

import grpc
import numpy as np

from shm_client import EdgeClient
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from tests.support.certs import self_signed
from tests.support.gate import inline_gate_request
from tests.support.notify import NotifyListener
from tests.support.processes import ServerProcess
from tests.support.stubs import live, scale_answers, v2_stub

WATCHDOG_USEC = 400_000  # a ping every 0.2 s while the check passes


def test_watchdog_pings_with_tls_on_tcp_and_no_unix_socket(model_repo, tmp_path) -> None:
    cert, key = self_signed(tmp_path)
    notify = NotifyListener(tmp_path / "notify")
    server = ServerProcess(
        model_repo, tmp_path, "--socket", "none", "--tls-cert", str(cert), "--tls-key", str(key),
        env=notify.env(WATCHDOG_USEC),
    ).start()
    try:
        assert notify.wait_for_pings(3), f"no WATCHDOG=1 from a TLS-only server:\n{server.log}"
        port = server.tcp_target.rsplit(":", 1)[1]
        with EdgeClient(f"localhost:{port}", root_certificates=cert.read_bytes(), transport="grpc") as client:
            x = np.arange(4, dtype=np.float32)
            np.testing.assert_array_equal(client.infer("scale", {"x": x}, version=1)["y"], x)
    finally:
        assert server.stop() == 0
        notify.close()


def _busy(stub: pb_grpc.GRPCInferenceServiceStub) -> bool:
    try:
        stub.ServerLive(pb.ServerLiveRequest(), timeout=0.5)
    except grpc.RpcError as err:
        return err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    return False


def test_watchdog_pings_while_every_worker_runs_a_long_call(model_repo, tmp_path, wait_until) -> None:
    workers = 4
    notify = NotifyListener(tmp_path / "notify")
    server = ServerProcess(
        model_repo, tmp_path, "--workers", str(workers), "--max-inflight-per-model", "1",
        env=notify.env(WATCHDOG_USEC),
    ).start()
    unix = v2_stub(server.unix_target)
    # One call runs (one core), the others wait for the model: every worker is taken, none burns CPU.
    # Their gate never opens: the calls end only when they are cancelled.
    endless = inline_gate_request(np.ones(4, np.float32), 0)
    calls = [v2_stub(server.tcp_target).ModelInfer.future(endless, timeout=120) for _ in range(workers)]
    try:
        assert wait_until(lambda: _busy(unix), timeout=30), "the calls never took every worker"
        assert notify.wait_for_pings(3), "the watchdog stopped pinging a server whose workers are all busy"
        for call in calls:
            call.cancel()
        assert wait_until(lambda: live(unix), timeout=30), "the server did not come back once the calls ended"
        assert scale_answers(unix)
    finally:
        for call in calls:
            call.cancel()
        assert server.stop() == 0
        notify.close()
