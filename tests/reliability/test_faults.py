"""Faults: a client killed mid-call, a server killed and restarted, SIGTERM with calls in flight, and a
/dev/shm with no room. Nothing leaks and nobody hangs.

    pytest tests/reliability/test_faults.py
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from shm_client import EdgeClient
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared.segments import SHM_DIR, Segment
from tests.support.gate import inline_gate_request
from tests.support.processes import REPO_ROOT, ServerProcess
from tests.support.shm import our_shm_entries, owned_by, owned_segments
from tests.support.stubs import in_flight, registered_names, v2_stub


def python(code: str, *args: str, **kwargs: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), *args], cwd=REPO_ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


def test_client_killed_mid_call_leaves_no_registration_or_segment(
    server: ServerProcess, wait_until: Callable[..., Any]
) -> None:
    stub = v2_stub(server.unix_target)
    child = python("""
        import sys, numpy as np
        from shm_client import EdgeClient
        client = EdgeClient(sys.argv[1], transport="shm")
        x = np.arange(4096, dtype=np.float32)
        for gate in (1, 1, 0):  # the third call's gate never opens: it runs until its caller dies
            y = client.infer("gate", {"x": x, "gate": np.array([gate], np.int32)})["y"]
            assert (y == x).all()
            print("call", flush=True)
    """, server.unix_target)
    try:
        # Two calls done (so outputs go to shm too), then catch it inside the third.
        assert child.stdout is not None
        for _ in range(2):
            assert child.stdout.readline().startswith("call"), child.stderr.read() if child.stderr else ""
        assert wait_until(lambda: in_flight(server.unix_target, "gate") == 1, timeout=30)
        assert owned_by(child.pid, registered_names(stub))
        assert owned_by(child.pid, our_shm_entries({child.pid}))
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(10)
    # The server reaps every 2 s: registrations of a dead client's segments go, and so do the segments.
    assert wait_until(lambda: not owned_by(child.pid, registered_names(stub)), timeout=10)
    assert wait_until(lambda: not owned_by(child.pid, our_shm_entries({child.pid})), timeout=10)
    assert in_flight(server.unix_target, "gate") == 0
    x = np.ones(8, np.float32)
    reply = stub.ModelInfer(inline_gate_request(x, 1), timeout=10)
    assert np.frombuffer(reply.raw_output_contents[0], np.float32).sum() == 8
    assert server.alive()


def test_server_killed_then_restarted_removes_its_old_segments(model_repo: Path, tmp_path: Path) -> None:
    first = ServerProcess(model_repo, tmp_path, "--models", "scale").start()
    beacon = SHM_DIR / f"edgecow-srv-{first.pid}-beacon"
    client = EdgeClient(first.unix_target)
    try:
        x = np.arange(1000, dtype=np.float32)
        assert client.transport == "shm"
        np.testing.assert_array_equal(client.infer("scale", {"x": x})["y"], x * 2)
        assert beacon.exists()
        first.signal(signal.SIGKILL)
        first.wait(10)
        assert first.socket.exists()  # nobody cleaned up after a SIGKILL
        if not beacon.exists():
            # Another test's server started meanwhile and swept it, as every server does at start: put a
            # segment of the dead server back, so that the start below has one to remove.
            Segment.create(beacon.name, 4096).close()

        second = ServerProcess(model_repo, tmp_path, "--models", "scale").start()
        try:
            assert not beacon.exists(), "the dead server's segment was left at start"
            assert (SHM_DIR / f"edgecow-srv-{second.pid}-beacon").exists()
            # The client's registrations died with the first server; it registers again by itself.
            for _ in range(3):
                np.testing.assert_array_equal(client.infer("scale", {"x": x})["y"], x * 2)
            assert registered_names(v2_stub(second.unix_target))
        finally:
            client.close()
            assert second.stop() == 0
        assert not owned_by(second.pid, our_shm_entries({second.pid}))
        assert not owned_by(os.getpid(), our_shm_entries())
    finally:
        client.close()
        first.kill()


def test_sigterm_lets_calls_in_flight_finish(
    model_repo: Path, tmp_path: Path, wait_until: Callable[..., Any]
) -> None:
    """Three calls held in the `gate` model (two over gRPC, one on the lane) until SIGTERM has started the
    drain; then the test opens the gates and every call must still get its answer."""
    server = ServerProcess(model_repo, tmp_path, "--models", "gate").start()
    stub = v2_stub(server.unix_target)
    client = EdgeClient(server.unix_target, transport="shm")
    x = np.arange(512, dtype=np.float32)
    results: dict[str, Any] = {}

    def call(name: str, fn: Callable[[], np.ndarray]) -> None:
        try:
            results[name] = fn()
        except Exception as err:  # recorded and asserted on below
            results[name] = err

    def raw() -> np.ndarray:
        request = pb.ModelInferRequest(model_name="gate")
        request.inputs.add(name="x", datatype="FP32", shape=x.shape)
        request.raw_input_contents.append(x.tobytes())
        gate_input = request.inputs.add(name="gate", datatype="INT32", shape=[1])
        gate_input.parameters["shared_memory_region"].string_param = "sigterm-gate"
        gate_input.parameters["shared_memory_byte_size"].int64_param = 4
        reply = stub.ModelInfer(request, timeout=60)
        return np.frombuffer(reply.raw_output_contents[0], np.float32)

    with owned_segments(f"faults-{os.getpid()}-") as make:
        gate = make("gate", 4096)
        stub.SystemSharedMemoryRegister(
            pb.SystemSharedMemoryRegisterRequest(name="sigterm-gate", key="/" + gate.key, byte_size=4), timeout=10
        )
        client_gate = client.empty((1,), np.int32)  # passed by reference: the server reads it in place
        client_gate[0] = 0
        threads = [threading.Thread(target=call, args=(f"grpc{i}", raw)) for i in range(2)]
        threads.append(threading.Thread(target=call, args=("shm", lambda: client.infer(
            "gate", {"x": x, "gate": client_gate}, timeout=60)["y"])))
        try:
            for thread in threads:
                thread.start()
            assert wait_until(lambda: in_flight(server.unix_target, "gate") == 3, timeout=60)
            server.signal(signal.SIGTERM)
            assert wait_until(lambda: "stopping:" in server.log, timeout=60)
            gate.write(np.ones(1, np.int32))
            client_gate[0] = 1
            for thread in threads:
                thread.join(60)
            assert server.wait(60) == 0
        finally:
            gate.write(np.ones(1, np.int32))
            client_gate[0] = 1
            server.kill()
            client.close()
    for name, value in results.items():
        assert isinstance(value, np.ndarray), f"{name}: {value!r}"
        np.testing.assert_array_equal(value, x)
    assert len(results) == 3
    assert not server.socket.exists()
    assert not owned_by(server.pid, our_shm_entries({server.pid}))
    assert "grace period over" not in server.log


FSIZE_LIMITED = """
    import errno, os, resource, signal, sys
    import numpy as np
    from shm_client.shared.errors import ResourceExhausted
    from shm_client.shared.segments import Segment
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the kernel answers EFBIG instead of killing us
    def limit(nbytes):
        resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    def mine():
        return sorted(n for n in os.listdir("/dev/shm") if n.startswith(f"edgecow-cli-{os.getpid()}-"))
"""


def test_segment_create_on_a_full_dev_shm_is_resource_exhausted() -> None:
    """posix_fallocate failing (here EFBIG under RLIMIT_FSIZE, ENOSPC on a full tmpfs) is RESOURCE_EXHAUSTED,
    and the half-made object is unlinked."""
    child = python(FSIZE_LIMITED + """
    limit(4096)
    key = f"edgecow-cli-{os.getpid()}-full"
    try:
        Segment.create(key, 1 << 20)
    except ResourceExhausted as err:
        print("refused:", err)
    small = Segment.create(key + "-small", 4096)  # under the limit: fine
    small.close(); small.unlink()
    print("left:", mine())
    """)
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err
    assert "refused: no room in /dev/shm for a 1048576-byte segment" in out
    assert "left: []" in out


def test_client_falls_back_to_grpc_when_shared_memory_cannot_be_allocated(server: ServerProcess) -> None:
    child = python(FSIZE_LIMITED + """
    import logging
    from shm_client import EdgeClient
    logging.basicConfig(level=logging.WARNING)
    client = EdgeClient(sys.argv[1])
    assert client.transport == "shm"          # proven before /dev/shm "fills up"
    limit(4096)
    x = np.arange(1 << 16, dtype=np.float32)  # 256 KiB: the pool must make a new segment, and cannot
    for _ in range(3):
        y = client.infer("scale", {"x": x})["y"]
        assert (y == x * 2).all()
    print("transport:", client.transport, "left:", mine())
    client.close()
    """, server.unix_target)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert "transport: shm left: []" in out
    assert "shared memory failed" in err and "go over gRPC" in err
    assert not owned_by(child.pid, registered_names(v2_stub(server.unix_target)))
    assert not owned_by(child.pid, our_shm_entries({child.pid}))


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_signal_right_after_ready_stops_the_server_cleanly(model_repo: Path, tmp_path: Path, signame: str) -> None:
    server = ServerProcess(model_repo, tmp_path, "--models", "scale").start()
    try:
        server.signal(getattr(signal, signame))
        assert server.wait(30) == 0
    finally:
        server.kill()
    assert not owned_by(server.pid, our_shm_entries({server.pid}))
    with pytest.raises(grpc.RpcError):
        v2_stub(server.unix_target).ServerLive(pb.ServerLiveRequest(), timeout=2)
