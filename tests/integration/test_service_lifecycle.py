"""The server's life as systemd sees it: a real server process under a test-owned $NOTIFY_SOCKET.

    sd = NotifyListener(tmp_path / "notify")
    ServerProcess(repo, tmp_path, env=sd.env()).start(); sd.wait_for("READY")
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton

from shm_client.shared._proto import inference_pb2, inference_pb2_grpc
from tests.support import models
from tests.support.gate import Call, Gate
from tests.support.notify import NotifyListener
from tests.support.processes import ServerProcess


def server_live(unix_socket: Path) -> bool:
    """ServerLive over the unix socket, failing at once (no waiting for the socket to appear)."""
    with grpc.insecure_channel(f"unix:{unix_socket}") as channel:
        stub = inference_pb2_grpc.GRPCInferenceServiceStub(channel)
        try:
            return stub.ServerLive(inference_pb2.ServerLiveRequest(), timeout=5).live
        except grpc.RpcError:
            return False


def server_segments(pid: int) -> list[str]:
    """/dev/shm entries the server with this pid owns (its name prefix carries the pid)."""
    pattern = re.compile(rf"^edgecow-(srv-)?{pid}-")
    return sorted(p.name for p in Path("/dev/shm").iterdir() if pattern.match(p.name))


def infer_gated(target: str, gate_region: str) -> np.ndarray:
    """The gate model on x through tritonclient, its gate read from `gate_region`: held until it opens."""
    x = np.arange(8, dtype=np.float32)
    inputs = [triton.InferInput("x", [8], "FP32"), triton.InferInput("gate", [1], "INT32")]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_shared_memory(gate_region, 4)
    with triton.InferenceServerClient(target) as client:
        result = client.infer("gate", inputs, client_timeout=120)
    np.testing.assert_array_equal(result.as_numpy("y"), x)
    return result.as_numpy("y")


def infer_scale(client: triton.InferenceServerClient, version: str = "") -> np.ndarray:
    x = np.ones(4, dtype=np.float32)
    inp = triton.InferInput("x", [4], "FP32")
    inp.set_data_from_numpy(x)
    return client.infer("scale", [inp], model_version=version).as_numpy("y")


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "models"
    models.write_model(root, "scale", 1, models.scale_model(factor=1.0))
    models.write_model(root, "gate", 1, models.gate_model())
    return root


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifyListener]:
    listener = NotifyListener(tmp_path / "notify")
    yield listener
    listener.close()


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "srv"
    path.mkdir()
    return path


def test_server_reports_ready_watchdog_status_and_stopping(
    repo: Path, workdir: Path, notify: NotifyListener
) -> None:
    server = ServerProcess(repo, workdir, env=notify.env(watchdog_usec=400_000))
    notify.on_ready = lambda: server_live(server.socket)
    server.start()
    try:
        assert notify.wait_for("READY"), f"no READY=1; got {notify.messages}\n{server.log}"
        assert notify.ready_results[0] is True, "READY=1 came before the unix socket answered ServerLive"

        # WATCHDOG_USEC=400000: a ping every 0.2 s from the server's health check.
        assert notify.wait_for(lambda ms: sum(m.get("WATCHDOG") == "1" for m in ms) >= 3, timeout=15), (
            f"WATCHDOG=1 did not repeat; got {notify.keys()}"
        )
        statuses = [m["STATUS"] for m in notify.messages if "STATUS" in m]
        assert any("model" in status.lower() for status in statuses), f"no STATUS= about models: {statuses}"

        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0, server.log
    finally:
        server.kill()
    assert notify.wait_for("STOPPING", timeout=5), f"no STOPPING=1; got {notify.keys()}"
    keys = notify.keys()
    assert keys.index("READY") < keys.index("STOPPING")
    assert "READY" not in keys[keys.index("STOPPING"):]


def test_sigterm_lets_a_call_in_flight_finish(repo: Path, workdir: Path, notify: NotifyListener) -> None:
    # The call is held by its gate until SIGTERM has started the drain; the STATUS= line (refreshed every
    # 0.1 s here) shows it on the server first. The grace period is far longer than the test.
    server = ServerProcess(
        repo, workdir, "--grace-period", "240", "--shm-reap-interval", "0.1", env=notify.env(),
    ).start()
    gate = Gate(server.unix_target)
    try:
        segments_while_running = server_segments(server.pid)
        assert segments_while_running, "the server made no shared-memory segment of its own to clean up"
        call = Call(lambda: infer_gated(server.unix_target, gate.region))
        try:
            in_flight = re.compile(r"\b[1-9]\d* call\(s\) in flight")
            assert notify.wait_for(lambda ms: any(in_flight.search(m.get("STATUS", "")) for m in ms), 60), (
                f"no STATUS= reported the call in flight: {[m.get('STATUS') for m in notify.messages]}"
            )
            server.signal(signal.SIGTERM)
            assert notify.wait_for("STOPPING", 60), f"no STOPPING=1; got {notify.keys()}"
            assert call.running(), f"the held call ended before its gate opened: {call.error()!r}"
        finally:
            gate.open()
        error = call.error(250)
        assert error is None, f"{error!r}\n{server.log}"
        assert server.wait(30) == 0, server.log
    finally:
        gate.close()
        server.kill()
    leftovers = server_segments(server.pid)
    assert leftovers == [], f"left in /dev/shm: {leftovers} (while running: {segments_while_running})"


def test_sighup_serves_a_new_version_without_restart(
    repo: Path, workdir: Path, notify: NotifyListener, wait_until
) -> None:
    server = ServerProcess(repo, workdir, env=notify.env()).start()
    try:
        pid = server.pid
        with triton.InferenceServerClient(server.tcp_target) as client:
            assert client.get_model_metadata("scale").versions == ["1"]
            np.testing.assert_array_equal(infer_scale(client), np.ones(4, np.float32))
            assert notify.wait_for("READY")
            messages_before = len(notify.messages)

            models.write_model(repo, "scale", 2, models.scale_model(factor=2.0))
            server.signal(signal.SIGHUP)

            served = wait_until(lambda: "2" in client.get_model_metadata("scale").versions, timeout=30)
            assert served, server.log
            doubled = np.full(4, 2.0, np.float32)
            np.testing.assert_array_equal(infer_scale(client, "2"), doubled)
            np.testing.assert_array_equal(infer_scale(client), doubled)  # the highest version is the default

        assert server.alive() and server.pid == pid
        assert notify.wait_for(lambda ms: any(m.get("READY") == "1" for m in ms[messages_before:]), 10)
        after = notify.messages[messages_before:]
        reload_keys = [k for k in notify.keys()[messages_before:] if k in ("RELOADING", "READY")]
        assert reload_keys[:2] == ["RELOADING", "READY"], f"got {notify.keys()[messages_before:]}"
        reloading = next(m for m in after if m.get("RELOADING") == "1")
        assert int(reloading["MONOTONIC_USEC"]) > 0
        assert server.stop() == 0
    finally:
        server.kill()
