"""Helpers for the reliability suite: raw v2 stubs, shm snapshots that ignore other suites, segments.

    stub = v2_stub(server.unix_target); assert registered_names(stub) == set()
    before = our_shm_entries({server.pid}); ...; assert our_shm_entries({server.pid}) == before

A module rather than a conftest: tests/conftest.py is imported as `conftest`, and a second one would clash.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import grpc
import psutil
import pytest
from conftest import owned_segments

from shm_client.shared._proto import edgecow_pb2, edgecow_pb2_grpc
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from shm_client.shared.segments import Segment, owner_pid

SHM_DIR = Path("/dev/shm")
# Keys the tests create themselves carry this prefix and the test process's pid.
TEST_PREFIX = f"reltest-{os.getpid()}-"


def v2_stub(target: str) -> pb_grpc.GRPCInferenceServiceStub:
    channel = grpc.insecure_channel(target, options=[("grpc.max_send_message_length", -1)])
    return pb_grpc.GRPCInferenceServiceStub(channel)


def edgecow_stub(target: str) -> edgecow_pb2_grpc.EdgecowServiceStub:
    return edgecow_pb2_grpc.EdgecowServiceStub(grpc.insecure_channel(target))


def registered_names(stub: pb_grpc.GRPCInferenceServiceStub) -> set[str]:
    reply = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10)
    return set(reply.regions)


def in_flight(target: str, model: str) -> int:
    reply = edgecow_stub(target).GetStatus(edgecow_pb2.GetStatusRequest(), timeout=10)
    return sum(m.in_flight for m in reply.models if m.name == model)


def answers(stub: pb_grpc.GRPCInferenceServiceStub) -> bool:
    return stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live


def our_shm_entries(pids: Iterable[int] = ()) -> set[str]:
    """/dev/shm entries this test run is responsible for: its own keys and those of `pids` and this
    process. Other suites may run beside this one, so the rest of /dev/shm is none of our business."""
    owners = {os.getpid(), *pids}
    names = set()
    for name in os.listdir(SHM_DIR):
        if name.startswith(TEST_PREFIX) or owner_pid(name) in owners:
            names.add(name)
    return names


def make_segment(suffix: str, size: int, fill: bytes = b"") -> Segment:
    segment = Segment.create(TEST_PREFIX + suffix, size)
    if fill:
        segment.write(fill)
    return segment


def non_loopback_ipv4() -> str | None:
    """An address of this box that is not loopback, so a TCP peer there counts as remote."""
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            if addr.family.name == "AF_INET" and not addr.address.startswith("127."):
                return addr.address
    return None


def rpc_error(call: Callable[[], object]) -> grpc.RpcError | None:
    try:
        call()
    except grpc.RpcError as err:
        return err
    return None


@pytest.fixture(name="segments")
def segments_fixture() -> Iterator[Callable[..., Segment]]:
    """`segments(suffix, size)`: make_segment whose segments are closed and unlinked after the test.
    A test module imports `segments_fixture` to use it."""
    with owned_segments(TEST_PREFIX) as make:
        yield make
