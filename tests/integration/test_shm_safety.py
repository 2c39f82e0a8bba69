"""What a careless or hostile caller can do with shared memory, over the wire: each case gets its status
code, the server keeps serving, and nothing is left registered or in /dev/shm.

    .venv/bin/pytest tests/integration/test_shm_safety.py
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from shm_client import EdgeClient
from shm_client.shared._proto import edgecow_pb2, edgecow_pb2_grpc
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from shm_client.shared.segments import SHM_DIR, Segment
from tests.support.gate import Call
from tests.support.processes import ServerProcess
from tests.support.shm import owned_segments
from tests.support.stubs import non_loopback_ipv4

KEY_PREFIX = f"edgecow-test-{os.getpid()}-safety-"
ONES = np.ones((1, 16), np.float32)


def _our_entries() -> list[str]:
    return sorted(name for name in os.listdir(SHM_DIR) if name.startswith(KEY_PREFIX))


def _grpc_target(target: str) -> str:
    return target.replace("unix://", "unix:")


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details() or ""


class Caller:
    """Raw v2 calls, so every field (even nonsense) can be sent as is."""

    def __init__(self, target: str) -> None:
        self.channel = grpc.insecure_channel(_grpc_target(target))
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)
        self.edgecow = edgecow_pb2_grpc.EdgecowServiceStub(self.channel)

    def register(self, name: str, key: str, offset: int = 0, byte_size: int = 64) -> None:
        request = pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset, byte_size=byte_size)
        self.stub.SystemSharedMemoryRegister(request, timeout=10)

    def unregister(self, name: str = "") -> None:
        self.stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=name), timeout=10)

    def regions(self) -> dict[str, pb.SystemSharedMemoryStatusResponse.RegionStatus]:
        return dict(self.stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10).regions)

    def infer(self, request: pb.ModelInferRequest, timeout: float = 60) -> pb.ModelInferResponse:
        return self.stub.ModelInfer(request, timeout=timeout)

    def add_sub_works(self) -> bool:
        request = _add_sub_request()
        request.raw_input_contents.extend([ONES.tobytes(), (ONES * 2).tobytes()])
        response = self.infer(request)
        return np.frombuffer(response.raw_output_contents[0], np.float32).tolist() == [3.0] * 16

    def in_flight(self, model: str) -> int:
        status = self.edgecow.GetStatus(edgecow_pb2.GetStatusRequest(), timeout=10)
        return next(m.in_flight for m in status.models if m.name == model)


def _add_sub_request() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add_sub")
    request.inputs.add(name="a", datatype="FP32", shape=[1, 16])
    request.inputs.add(name="b", datatype="FP32", shape=[1, 16])
    return request


def _shm(params, region: str, byte_size: int, offset: int | None = None) -> None:
    params["shared_memory_region"].string_param = region
    params["shared_memory_byte_size"].int64_param = byte_size
    if offset is not None:
        params["shared_memory_offset"].int64_param = offset


@pytest.fixture
def segments() -> Iterator[Callable[..., Segment]]:
    with owned_segments(KEY_PREFIX) as make:
        yield lambda suffix, size=3 * 4096: make(suffix, size)
    assert _our_entries() == []


@pytest.fixture
def caller(server: ServerProcess) -> Iterator[Caller]:
    caller = Caller(server.unix_target)
    yield caller
    # After every case: the server serves, and holds no registration.
    assert server.alive()
    assert caller.regions() == {}
    assert caller.add_sub_works()
    caller.channel.close()


# -- register ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["", "/", "/a//b", "//", "/../etc/passwd", "/..", "/a/../b", "/a\x00b", "/a\x01b", "/a\nb", "/" + "k" * 300],
    ids=["empty", "slash", "double-slash", "only-slashes", "dotdot-path", "dotdot", "dotdot-inner", "nul",
         "control", "newline", "300-chars"],
)
def test_bad_keys_are_invalid_argument(caller: Caller, key: str) -> None:
    code, details = _code(lambda: caller.register("bad", key))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "\x00" not in details


def test_the_servers_own_segment_is_permission_denied(caller: Caller, server: ServerProcess) -> None:
    beacon = f"edgecow-srv-{server.pid}-beacon"
    assert (SHM_DIR / beacon).exists()
    for key in ("/" + beacon, beacon, "///" + beacon):
        code, details = _code(lambda k=key: caller.register("beacon", k))
        assert code == grpc.StatusCode.PERMISSION_DENIED
    assert "/dev/shm" not in details


def test_an_object_that_does_not_exist_is_not_found_without_paths(caller: Caller) -> None:
    code, details = _code(lambda: caller.register("missing", f"/{KEY_PREFIX}missing"))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "/dev/shm" not in details and "/tmp" not in details and str(Path.cwd()) not in details


@pytest.mark.parametrize(
    "offset, byte_size",
    [(0, 3 * 4096 + 1), (3 * 4096, 1), (4096, 2 * 4096 + 1), (2**63, 64), (0, 2**63), (2**64 - 1, 1), (0, 0)],
    ids=["size-past-end", "offset-at-end", "both-past-end", "offset-2^63", "size-2^63", "offset-2^64-1", "size-0"],
)
def test_ranges_outside_the_object_are_invalid_argument(
    caller: Caller, segments: Callable[..., Segment], offset: int, byte_size: int
) -> None:
    segment = segments("range")
    code, _ = _code(lambda: caller.register("range", "/" + segment.key, offset, byte_size))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_double_register_is_already_exists(caller: Caller, segments: Callable[..., Segment]) -> None:
    segment = segments("twice")
    caller.register("twice", "/" + segment.key)
    code, _ = _code(lambda: caller.register("twice", "/" + segment.key))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert list(caller.regions()) == ["twice"]
    caller.unregister("twice")


def test_unregister_of_an_unknown_name_is_ok(caller: Caller) -> None:
    caller.unregister(f"{KEY_PREFIX}never-registered")
    caller.unregister("")
    code, _ = _code(lambda: caller.stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(name="nope")))
    assert code == grpc.StatusCode.NOT_FOUND


def test_region_count_limit_is_resource_exhausted(model_repo: Path, tmp_path: Path, segments) -> None:
    server = ServerProcess(model_repo, tmp_path, "--shm-max-regions", "3").start()
    caller = Caller(server.unix_target)
    try:
        segment = segments("limit")
        for i in range(3):
            caller.register(f"r{i}", "/" + segment.key, 64 * i, 64)
        code, details = _code(lambda: caller.register("r3", "/" + segment.key, 192, 64))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "3" in details
        caller.unregister("r0")
        caller.register("r3", "/" + segment.key, 192, 64)
        assert sorted(caller.regions()) == ["r1", "r2", "r3"]
        assert caller.add_sub_works()
        caller.unregister("")
        assert caller.regions() == {}
    finally:
        caller.channel.close()
        server.stop()


# -- infer ---------------------------------------------------------------------------------------------


def test_an_object_shrunk_after_register_is_invalid_argument_not_sigbus(
    caller: Caller, server: ServerProcess, segments: Callable[..., Segment]
) -> None:
    segment = segments("shrink")
    segment.write(ONES, offset=8192)
    segment.write(ONES, offset=8192 + 64)
    caller.register("shrink", "/" + segment.key, 0, segment.size)
    os.ftruncate(segment.fd, 4096)  # the client cuts its object to one page

    request = _add_sub_request()
    _shm(request.inputs[0].parameters, "shrink", 64, 8192)
    _shm(request.inputs[1].parameters, "shrink", 64, 8192 + 64)
    code, details = _code(lambda: caller.infer(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "shrank" in details

    request = _add_sub_request()
    request.raw_input_contents.extend([ONES.tobytes(), ONES.tobytes()])
    _shm(request.outputs.add(name="sum").parameters, "shrink", 64, 8192)
    code, _ = _code(lambda: caller.infer(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert server.alive()

    request = _add_sub_request()  # what still fits works
    request.raw_input_contents.extend([ONES.tobytes(), ONES.tobytes()])
    _shm(request.outputs.add(name="sum").parameters, "shrink", 64, 128)
    caller.infer(request)
    assert (segment.array(np.float32, (1, 16), offset=128) == 2.0).all()
    caller.unregister("shrink")


def _bad_shm_requests() -> dict[str, tuple[Callable[[pb.ModelInferRequest], None], grpc.StatusCode]]:
    def region(params, **fields) -> None:
        for key, (kind, value) in fields.items():
            setattr(params[f"shared_memory_{key}"], kind, value)

    def first(request: pb.ModelInferRequest):
        return request.inputs[0].parameters

    invalid, missing = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND
    return {
        "unknown-region": (lambda r: _shm(first(r), "no-such-region", 64), missing),
        "size-mismatch": (lambda r: _shm(first(r), "bad", 60), invalid),
        "offset-past-region": (lambda r: _shm(first(r), "bad", 64, 3 * 4096), invalid),
        "offset-2^63": (lambda r: region(first(r), region=("string_param", "bad"), byte_size=("int64_param", 64),
                                         offset=("uint64_param", 2**63)), invalid),
        "size-2^64-1": (lambda r: region(first(r), region=("string_param", "bad"),
                                         byte_size=("uint64_param", 2**64 - 1)), invalid),
        "negative-offset": (lambda r: _shm(first(r), "bad", 64, -64), invalid),
        "size-without-region": (lambda r: region(first(r), byte_size=("int64_param", 64)), invalid),
        "region-without-size": (lambda r: region(first(r), region=("string_param", "bad")), invalid),
        "region-not-a-string": (lambda r: region(first(r), region=("int64_param", 1),
                                                 byte_size=("int64_param", 64)), invalid),
        "size-not-an-int": (lambda r: region(first(r), region=("string_param", "bad"),
                                             byte_size=("string_param", "64")), invalid),
    }


@pytest.mark.parametrize("case", list(_bad_shm_requests()))
def test_bad_shm_references_in_infer(caller: Caller, segments: Callable[..., Segment], case: str) -> None:
    segment = segments("infer")
    caller.register("bad", "/" + segment.key, 0, segment.size)
    request = _add_sub_request()
    request.raw_input_contents.append(ONES.tobytes())
    setter, expected = _bad_shm_requests()[case]
    setter(request)
    code, details = _code(lambda: caller.infer(request))
    assert code == expected, details
    assert "/dev/shm" not in details
    caller.unregister("bad")


def test_unregister_during_inference_waits_for_the_call(
    caller: Caller, segments: Callable[..., Segment], wait_until
) -> None:
    x = np.arange(4096, dtype=np.float32)
    region = segments("held", 10 * 4096)
    region.write(x)
    region.write(np.int32([0]), offset=x.nbytes)  # the gate, shut: the call holds until it reads 1
    caller.register("held_in", "/" + region.key, 0, x.nbytes + 4)
    caller.register("held_out", "/" + region.key, 6 * 4096, 4 * 4096)  # apart from the inputs

    request = pb.ModelInferRequest(model_name="gate")
    _shm(request.inputs.add(name="x", datatype="FP32", shape=[x.size]).parameters, "held_in", x.nbytes)
    _shm(request.inputs.add(name="gate", datatype="INT32", shape=[1]).parameters, "held_in", 4, x.nbytes)
    _shm(request.outputs.add(name="y").parameters, "held_out", x.nbytes)
    request.outputs.add(name="rounds")
    call = Call(lambda: caller.infer(request, timeout=120))
    try:
        assert wait_until(lambda: caller.in_flight("gate") == 1, timeout=30)
        caller.unregister("held_in")
        caller.unregister("held_out")
        assert set(caller.regions()) == {"held_in", "held_out"}  # listed until the call ends, as in Triton
        assert caller.in_flight("gate") == 1  # while the call still runs on the mapping
    finally:
        region.write(np.int32([1]), offset=x.nbytes)  # read through the server's mapping: the call ends
    response = call.result(120)
    assert isinstance(response, pb.ModelInferResponse)
    assert [o.name for o in response.outputs] == ["y", "rounds"]
    assert response.raw_output_contents[0] == b""
    np.testing.assert_array_equal(region.array(np.float32, (x.size,), offset=6 * 4096), x)
    assert caller.regions() == {}


# -- who may use shared memory -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def outside_address() -> str:
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to call from")
    return address


def test_a_non_local_peer_is_refused_shared_memory(
    model_repo: Path, tmp_path: Path, outside_address: str, segments: Callable[..., Segment]
) -> None:
    server = ServerProcess(model_repo, tmp_path, "--listen", f"{outside_address}:0").start()
    remote, local = Caller(server.tcp_target), Caller(server.unix_target)
    try:
        assert server.tcp_target.startswith(outside_address)
        segment = segments("remote")
        segment.write(ONES)
        code, _ = _code(lambda: remote.register("remote", "/" + segment.key, 0, 64))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        code, _ = _code(lambda: remote.unregister(""))
        assert code == grpc.StatusCode.PERMISSION_DENIED

        local.register("remote", "/" + segment.key, 0, 64)  # the same region is fine from the unix socket
        request = _add_sub_request()
        _shm(request.inputs[0].parameters, "remote", 64)
        request.raw_input_contents.append(ONES.tobytes())
        code, _ = _code(lambda: remote.infer(request))
        assert code == grpc.StatusCode.PERMISSION_DENIED
        local.infer(request)

        probe = remote.edgecow.ProbeSharedMemory(
            edgecow_pb2.ProbeSharedMemoryRequest(key="/" + segment.key, token=bytes(ONES)[:32]), timeout=10
        )
        assert not probe.matched and not probe.beacon_key
        with EdgeClient(server.tcp_target) as client:
            assert client.transport == "grpc"
            np.testing.assert_array_equal(client.infer("add_sub", {"a": ONES, "b": ONES})["sum"], ONES * 2)
        assert remote.add_sub_works()
        local.unregister("")
        assert local.regions() == {}
    finally:
        remote.channel.close()
        local.channel.close()
        server.stop()


def test_shm_allow_remote_lets_a_non_local_peer_register(
    model_repo: Path, tmp_path: Path, outside_address: str, segments: Callable[..., Segment]
) -> None:
    server = ServerProcess(model_repo, tmp_path, "--listen", f"{outside_address}:0", "--shm-allow-remote").start()
    remote = Caller(server.tcp_target)
    try:
        segment = segments("allowed")
        remote.register("allowed", "/" + segment.key, 0, 64)
        assert list(remote.regions()) == ["allowed"]
        remote.unregister("")
        assert remote.regions() == {}
    finally:
        remote.channel.close()
        server.stop()
