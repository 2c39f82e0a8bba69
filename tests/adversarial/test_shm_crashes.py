"""A caller's shared memory cannot kill the server: sparse objects on a full /dev/shm, pages punched out of
a registered object, an object truncated while a call reads or writes it. Each used to end the daemon
with SIGBUS; now the call fails (RESOURCE_EXHAUSTED at register, ABORTED for the call) and it serves on.

    pytest tests/adversarial/test_shm_crashes.py

The full-/dev/shm cases run a server and the attacker in a mount namespace of their own whose /dev/shm
is an 8 MiB tmpfs (`unshare -m`; skipped where the machine does not allow it).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from onnx import TensorProto, helper

from shm_client.shared._proto import edgecow_pb2, edgecow_pb2_grpc
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from shm_client.shared.segments import SHM_DIR
from tests.support import models
from tests.support.processes import REPO_ROOT, ServerProcess
from tests.support.shm import owned_segments

WORKER = Path(__file__).resolve().parent / "shm_tmpfs_worker.py"
PRIVATE_SHM = "mount -t tmpfs -o size=8m tmpfs /dev/shm"
KEY_PREFIX = f"edgecow-test-{os.getpid()}-crash-"
COUNT = 4096  # floats in the truncated regions: 16 KiB
ATTEMPTS = 5


# -- a full /dev/shm, in a private mount namespace ----------------------------------------------------
def _private_shm_or_skip() -> None:
    try:
        probe = subprocess.run(["unshare", "-m", "sh", "-c", PRIVATE_SHM], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.skip("unshare(1) is not installed, so no private /dev/shm can be made")
    if probe.returncode != 0:
        pytest.skip(f"a private /dev/shm needs unshare -m and mount: {probe.stderr.strip()}")


def _attack(scenario: str, workdir: Path) -> dict:
    _private_shm_or_skip()
    command = [
        "unshare", "-m", "sh", "-c", f'{PRIVATE_SHM} && exec "$@"', "sh",
        sys.executable, str(WORKER), scenario, str(workdir),
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}  # the worker imports tests.support
    done = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout + done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_sparse_object_larger_than_free_shm_is_refused_at_register(tmp_path: Path) -> None:
    seen = _attack("sparse", tmp_path)
    assert seen["register_whole"] == "RESOURCE_EXHAUSTED", seen
    assert seen["input_call"] == "NOT_FOUND" and seen["output_call"] == "NOT_FOUND", seen
    assert seen["serves_after_whole"] and seen["regions_after_whole"] == [], seen
    # A range of the same object that fits is reserved at register and then serves both ways.
    assert seen["register_small"] == "OK", seen
    assert seen["small_input_call"] == "OK" and seen["small_output_call"] == "OK", seen
    assert seen["serves_at_end"] and seen["server_alive"], seen
    assert not seen["server_log_has_traceback"], seen


def test_pages_punched_out_of_registered_regions_fail_the_call_not_the_server(tmp_path: Path) -> None:
    seen = _attack("holes", tmp_path)
    assert seen["register_in"] == "OK" and seen["register_out"] == "OK", seen
    assert seen["input_call"] == "ABORTED" and seen["output_call"] == "ABORTED", seen
    assert seen["serves_after"] and seen["regions_after"] == [], seen  # both retired
    assert seen["reregister_in"] == "OK" and seen["reregister_out"] == "OK", seen
    assert seen["call_after"] == "OK" and seen["output_after"], seen
    assert seen["serves_at_end"] and seen["server_alive"], seen
    assert not seen["server_log_has_traceback"], seen


# -- an object truncated while a call uses it ---------------------------------------------------------
def touching_gate_model(max_rounds: int = 5_000_000) -> object:
    """y = x, returned once the INT32 input `gate` is non-zero; every round also sums all of `x`.

    The Loop re-reads `gate` and `x` each round, so a test that passes them in shared memory holds the
    call in flight, reading `x`, until it writes 1 into the gate; the result is written to `y` at the end.
    """
    body = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["gate"], ["level"], keepdims=0),
            helper.make_node("Equal", ["level", "closed"], ["cond_out"]),
            helper.make_node("Identity", ["acc_in"], ["acc_out"]),
            helper.make_node("ReduceSum", ["x"], ["sum_out"], keepdims=0),
        ],
        "wait",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("sum_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("sum_out", TensorProto.FLOAT, []),
        ],
        initializer=[helper.make_tensor("closed", TensorProto.INT32, [], [0])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["max_rounds", "true", "x", "zero"], ["y", "sum"], body=body)],
        "touching_gate",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("gate", TensorProto.INT32, [1]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("sum", TensorProto.FLOAT, []),
        ],
        initializer=[
            helper.make_tensor("max_rounds", TensorProto.INT64, [], [max_rounds]),
            helper.make_tensor("true", TensorProto.BOOL, [], [True]),
            helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0]),
        ],
    )
    return models.onnx_model(graph)


@pytest.fixture(scope="module")
def gate_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repo = tmp_path_factory.mktemp("crash-repo")
    models.write_model(repo, "touching_gate", 1, touching_gate_model())
    server = ServerProcess(repo, tmp_path_factory.mktemp("crash-srv")).start()
    yield server
    server.stop()


class Caller:
    def __init__(self, server: ServerProcess) -> None:
        channel = grpc.insecure_channel(server.unix_target)
        self.stub = pb_grpc.GRPCInferenceServiceStub(channel)
        self.edgecow = edgecow_pb2_grpc.EdgecowServiceStub(channel)

    def register(self, name: str, key: str, byte_size: int) -> None:
        request = pb.SystemSharedMemoryRegisterRequest(name=name, key="/" + key, byte_size=byte_size)
        self.stub.SystemSharedMemoryRegister(request, timeout=10)

    def unregister(self, name: str) -> None:
        self.stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=name), timeout=10)

    def regions(self) -> set[str]:
        return set(self.stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10).regions)

    def in_flight(self) -> int:
        status = self.edgecow.GetStatus(edgecow_pb2.GetStatusRequest(), timeout=10)
        return sum(m.in_flight for m in status.models if m.name == "touching_gate")

    def gated_call(self, x_region: str | None, y_region: str | None, gate_region: str) -> pb.ModelInferRequest:
        request = pb.ModelInferRequest(model_name="touching_gate")
        x = request.inputs.add(name="x", datatype="FP32", shape=[COUNT])
        if x_region:
            x.parameters["shared_memory_region"].string_param = x_region
            x.parameters["shared_memory_byte_size"].int64_param = COUNT * 4
        else:
            request.raw_input_contents.append(np.ones(COUNT, np.float32).tobytes())
        gate = request.inputs.add(name="gate", datatype="INT32", shape=[1])
        gate.parameters["shared_memory_region"].string_param = gate_region
        gate.parameters["shared_memory_byte_size"].int64_param = 4
        if y_region:
            y = request.outputs.add(name="y")
            y.parameters["shared_memory_region"].string_param = y_region
            y.parameters["shared_memory_byte_size"].int64_param = COUNT * 4
        request.outputs.add(name="sum")
        return request


def _run_in_thread(caller: Caller, request: pb.ModelInferRequest) -> tuple[threading.Thread, dict]:
    outcome: dict = {}

    def call() -> None:
        try:
            caller.stub.ModelInfer(request, timeout=60)
            outcome["code"] = grpc.StatusCode.OK
        except grpc.RpcError as err:
            outcome["code"], outcome["details"] = err.code(), err.details()

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    return thread, outcome


@pytest.mark.parametrize("victim", ["input", "output"])
def test_object_truncated_during_a_call_fails_that_call_and_the_server_serves_on(
    gate_server: ServerProcess, victim: str, wait_until
) -> None:
    caller = Caller(gate_server)
    codes = []
    with owned_segments(KEY_PREFIX) as make:
        for attempt in range(ATTEMPTS):
            gate = make(f"gate-{victim}-{attempt}", 4096)
            data = make(f"data-{victim}-{attempt}", COUNT * 4, fill=np.ones(COUNT, np.float32).tobytes())
            caller.register("gate", gate.key, 4)
            caller.register("data", data.key, COUNT * 4)
            request = caller.gated_call("data" if victim == "input" else None,
                                        "data" if victim == "output" else None, "gate")
            thread, outcome = _run_in_thread(caller, request)
            assert wait_until(lambda t=thread: caller.in_flight() == 1 or not t.is_alive(), timeout=30,
                              interval=0.002)
            os.ftruncate(data.fd, 0)  # the caller takes its object away under the running call
            gate.array(np.int32, (1,))[0] = 1  # and lets the call finish
            thread.join(90)
            assert not thread.is_alive()
            codes.append(outcome["code"])
            assert gate_server.alive(), gate_server.log
            assert outcome["code"] in (grpc.StatusCode.ABORTED, grpc.StatusCode.INVALID_ARGUMENT), outcome
            if outcome["code"] == grpc.StatusCode.INVALID_ARGUMENT:
                # Truncated before the call's size check ran: the region is still registered; try again.
                assert "shrank" in outcome["details"]
                caller.unregister("data")
                caller.unregister("gate")
                continue
            assert outcome["details"] == "shared-memory region 'data' shrank during the call; re-create and " \
                                         "re-register it"
            assert caller.regions() == {"gate"}  # the shrunk region is retired, the gate is untouched
            break
        assert grpc.StatusCode.ABORTED in codes, f"the truncation never landed during a run: {codes}"
        # The name registers again on a new object and the model runs on it.
        fresh = make(f"fresh-{victim}", COUNT * 4, fill=np.ones(COUNT, np.float32).tobytes())
        caller.register("data", fresh.key, COUNT * 4)
        gate.array(np.int32, (1,))[0] = 1
        caller.stub.ModelInfer(request, timeout=60)
        if victim == "output":
            assert (fresh.array(np.float32, (COUNT,)) == 1).all()
        caller.unregister("data")
        caller.unregister("gate")
    assert gate_server.alive()


FLIPPER = textwrap.dedent("""
    import os, sys
    fd, token = os.open(sys.argv[1], os.O_RDWR), bytes.fromhex(sys.argv[2])
    for _ in range(int(sys.argv[3])):  # bounded; the test kills it once its probes are done
        os.ftruncate(fd, 0)
        os.ftruncate(fd, 4096)
        os.pwrite(fd, token, 0)
""")


def test_probe_of_an_object_that_keeps_shrinking_never_faults(gate_server: ServerProcess) -> None:
    """The probe reads the caller's object with pread, not through a mapping: an object truncated
    between the server's size check and its read makes a mismatch, never a SIGBUS."""
    stub = edgecow_pb2_grpc.EdgecowServiceStub(grpc.insecure_channel(gate_server.unix_target))
    token = os.urandom(32)
    with owned_segments(KEY_PREFIX) as make:
        probe = make("probe", 4096, fill=token)
        request = edgecow_pb2.ProbeSharedMemoryRequest(key="/" + probe.key, token=token)
        assert stub.ProbeSharedMemory(request, timeout=10).matched
        flipper = subprocess.Popen([sys.executable, "-c", FLIPPER, str(SHM_DIR / probe.key), token.hex(), "10000000"])
        try:
            answers = [stub.ProbeSharedMemory(request, timeout=10) for _ in range(2000)]
        finally:
            flipper.kill()
            flipper.wait(10)
    assert gate_server.alive()
    mismatches = {reply.reason for reply in answers if not reply.matched}
    assert mismatches <= {"the probe segment is smaller than the token", "the server read different bytes"}


# -- the guard itself ----------------------------------------------------------------------------------
GUARD_CHILD = textwrap.dedent("""
    import mmap, os, sys
    import numpy as np
    from edge_server import _sigbus_guard as guard
    fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.unlink(sys.argv[1])
    os.ftruncate(fd, 1 << 20)
    mapping = mmap.mmap(fd, 1 << 20)
    view = np.frombuffer(mapping, np.uint8)
    view[:] = 7
    slot = guard.guard(view.ctypes.data, 1 << 20) if sys.argv[2] == "guarded" else None
    os.ftruncate(fd, 4096)  # the object loses all but its first page
    total = int(view.sum())  # reads the first page, then the pages that are gone
    view[-1] = 9  # and writes one
    print(total, int(view[0]), int(view[-1]), slot is not None and guard.faulted(slot), flush=True)
""")


def test_guard_turns_sigbus_into_zero_pages_and_leaves_other_faults_fatal(tmp_path: Path) -> None:
    """In a child: a guarded mapping whose object shrinks reads zeros and is marked faulted; an unguarded
    one still dies of SIGBUS (the guard passes faults outside its ranges on to the default action)."""
    env = {**os.environ, "PYTHONFAULTHANDLER": ""}
    name = str(SHM_DIR / f"{KEY_PREFIX}guard")
    guarded = subprocess.run([sys.executable, "-c", GUARD_CHILD, name, "guarded"], cwd=REPO_ROOT, env=env,
                             capture_output=True, text=True, timeout=60)
    assert guarded.returncode == 0, guarded.stderr
    # The sum saw the page that was left (7 * 4096), then zeros: at the fault the whole range became
    # writable zero pages, the first one included.
    assert guarded.stdout.split() == [str(7 * 4096), "0", "9", "True"]
    bare = subprocess.run([sys.executable, "-c", GUARD_CHILD, name, "bare"], cwd=REPO_ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    assert bare.returncode == -signal.SIGBUS, (bare.returncode, bare.stderr)


MISSING_GUARD_CHILD = textwrap.dedent("""
    import logging, sys
    sys.modules["edge_server._sigbus_guard"] = None  # as if the extension had not been built
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from edge_server.regions import RegionRegistry, probe_client_segment
    from shm_client.shared.errors import EdgecowError
    from shm_client.shared.segments import Segment
    segment = Segment.create(sys.argv[1], 4096)
    try:
        registry = RegionRegistry()
        try:
            registry.register("r", segment.key, 0, 64)
            print("registered")
        except EdgecowError as err:
            print(err.code.name)
        print(probe_client_segment(segment.key, b"x" * 16))
    finally:
        segment.close()
        segment.unlink()
""")


def test_without_the_guard_shared_memory_is_refused_with_one_log_line() -> None:
    done = subprocess.run([sys.executable, "-c", MISSING_GUARD_CHILD, f"{KEY_PREFIX}noguard"], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["UNAVAILABLE", "(False, 'shared memory is unavailable on this server')"]
    assert [line for line in done.stderr.splitlines() if "_sigbus_guard" in line] == [
        "edge_server._sigbus_guard is not built, so shared memory is refused (a caller could crash the server "
        "with SIGBUS); reinstall edgecow where a C compiler and the Python headers are present"
    ]
