"""The server's life as systemd sees it: a real server process under a test-owned $NOTIFY_SOCKET.

    sd = NotifyListener(tmp_path / "notify")
    ServerProcess(repo, tmp_path, env={"NOTIFY_SOCKET": str(sd.path)}).start(); sd.wait_for("READY")
"""

from __future__ import annotations

import re
import signal
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import models
import numpy as np
import pytest
import tritonclient.grpc as triton
from conftest import ServerProcess

from shm_client.shared._proto import inference_pb2, inference_pb2_grpc

Predicate = Callable[[list[dict[str, str]]], bool]
SLOW_ITERATIONS = 50_000  # about 2 s of work on an idle core (about 0.04 ms per iteration)


class NotifyListener:
    """Plays systemd's side of $NOTIFY_SOCKET: collects every message, in order, as a dict of fields.

    `on_ready` runs in the listener thread the moment a READY=1 arrives, before anything else is read, so
    it sees the server exactly as systemd would when it declares the service started.
    """

    def __init__(self, path: Path, on_ready: Callable[[], object] | None = None) -> None:
        self.path = path
        self.on_ready = on_ready
        self.ready_results: list[object] = []
        self.messages: list[dict[str, str]] = []
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._sock.recv(4096)
            except TimeoutError:
                continue
            message = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            if message.get("READY") == "1" and self.on_ready is not None:
                self.ready_results.append(self.on_ready())
            with self._changed:
                self.messages.append(message)
                self._changed.notify_all()

    def keys(self) -> list[str]:
        """Which flag each message carried, in order: READY, WATCHDOG, RELOADING, STOPPING or STATUS."""
        flags = ("READY", "RELOADING", "STOPPING", "WATCHDOG")
        with self._changed:
            return [next((f for f in flags if m.get(f) == "1"), "STATUS" if "STATUS" in m else "?")
                    for m in self.messages]

    def wait_for(self, predicate: Predicate | str, timeout: float = 30.0) -> bool:
        """Wait until `predicate(messages)` holds; a string waits for a message with that flag set to 1."""
        if isinstance(predicate, str):
            flag = predicate
            predicate = lambda messages: any(m.get(flag) == "1" for m in messages)  # noqa: E731
        with self._changed:
            return self._changed.wait_for(lambda: predicate(list(self.messages)), timeout)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._sock.close()


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


def infer_slow(target: str, iterations: int) -> np.ndarray:
    x = np.arange(8, dtype=np.float32)
    inputs = [triton.InferInput("x", [8], "FP32"), triton.InferInput("iterations", [], "INT64")]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(np.array(iterations, dtype=np.int64))
    with triton.InferenceServerClient(target) as client:
        result = client.infer("slow", inputs, client_timeout=120)
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
    models.write_model(root, "slow", 1, models.slow_model())
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
    server = ServerProcess(repo, workdir, env={"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"})
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
    # A grace period far longer than the call even on a loaded machine; the STATUS= line (refreshed every
    # 0.1 s here) tells when the call is on the server, so SIGTERM lands while it runs.
    server = ServerProcess(
        repo, workdir, "--grace-period", "240", "--shm-reap-interval", "0.1",
        env={"NOTIFY_SOCKET": str(notify.path)},
    ).start()
    try:
        segments_while_running = server_segments(server.pid)
        assert segments_while_running, "the server made no shared-memory segment of its own to clean up"
        outcome: dict[str, object] = {}

        def call() -> None:
            try:
                outcome["y"] = infer_slow(server.tcp_target, SLOW_ITERATIONS)
            except Exception as exc:  # reported by the assertion below, with the server log
                outcome["error"] = exc

        caller = threading.Thread(target=call)
        caller.start()
        in_flight = re.compile(r"\b[1-9]\d* call\(s\) in flight")
        assert notify.wait_for(lambda ms: any(in_flight.search(m.get("STATUS", "")) for m in ms), 60), (
            f"no STATUS= reported the call in flight: {[m.get('STATUS') for m in notify.messages]}"
        )
        assert caller.is_alive(), f"the slow call ended before SIGTERM could be sent: {outcome}"
        server.signal(signal.SIGTERM)

        caller.join(250)
        assert "error" not in outcome, f"{outcome.get('error')}\n{server.log}"
        assert "y" in outcome
        assert server.wait(30) == 0, server.log
    finally:
        server.kill()
    leftovers = server_segments(server.pid)
    assert leftovers == [], f"left in /dev/shm: {leftovers} (while running: {segments_while_running})"


def test_sighup_serves_a_new_version_without_restart(
    repo: Path, workdir: Path, notify: NotifyListener, wait_until
) -> None:
    server = ServerProcess(repo, workdir, env={"NOTIFY_SOCKET": str(notify.path)}).start()
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
