"""Inputs preallocated in shared memory with EdgeClient.empty() travel as a reference, not a copy.

    x = client.empty((1 << 20,), np.float32); x[:] = frame; client.infer("identity", {"x": x})
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from shm_client import EdgeClient
from tests.support.processes import ServerProcess

pytestmark = pytest.mark.shared_server  # calls only: see tests/conftest.py


def test_preallocated_input_is_referenced_in_place_and_not_copied(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target, transport="shm") as client:
        x = client.empty((4096,), np.float32)
        x[:] = np.arange(4096, dtype=np.float32)
        (segment,) = client._session._owned.values()
        pooled_before = {s.key for s in client._session._pool.segments()}
        y = client.infer("scale", {"x": x}, version=1)["y"]
        np.testing.assert_array_equal(y, x)
        # The call referenced the preallocated segment (registered now) and wrote x nowhere else:
        # only an output segment was added to the pool.
        assert segment.key in client._session._registered
        added = {s.key for s in client._session._pool.segments()} - pooled_before
        assert segment.key not in added and len(added) <= 1
        # A slice in the middle of the segment is referenced with its offset.
        part = x[1024:2048]
        np.testing.assert_array_equal(client.infer("scale", {"x": part}, version=2)["y"], part * 2)


def test_preallocated_segment_returns_to_the_pool_when_every_view_is_gone(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target, transport="shm") as client:
        x = client.empty((256, 4), np.float32)
        view = x[10:20]
        del x
        gc.collect()
        assert len(client._session._owned) == 1, "a live view keeps the segment out of the pool"
        del view
        gc.collect()
        assert not client._session._owned


def test_empty_without_shared_memory_is_an_ordinary_array(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target, transport="grpc") as client:
        x = client.empty((8,), np.float32)
        x[:] = 3
        assert not client._session._owned
        np.testing.assert_array_equal(client.infer("scale", {"x": x}, version=1)["y"], x)


def test_an_output_slot_overlapping_an_input_is_refused(server: ServerProcess) -> None:
    import grpc

    from shm_client.shared._proto import inference_pb2 as pb
    from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
    from shm_client.shared.segments import Segment, unique_key

    segment = Segment.create(unique_key() + "-overlap", 8192)
    try:
        with grpc.insecure_channel(server.unix_target.replace("unix://", "unix:")) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            stub.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name="ov", key=segment.key, byte_size=8192), timeout=10
            )
            try:
                request = pb.ModelInferRequest(model_name="scale", model_version="1")
                tensor = request.inputs.add(name="x", datatype="FP32", shape=[256])
                tensor.parameters["shared_memory_region"].string_param = "ov"
                tensor.parameters["shared_memory_byte_size"].int64_param = 1024
                output = request.outputs.add(name="y")
                output.parameters["shared_memory_region"].string_param = "ov"
                output.parameters["shared_memory_byte_size"].int64_param = 1024
                output.parameters["shared_memory_offset"].int64_param = 512
                with pytest.raises(grpc.RpcError) as raised:
                    stub.ModelInfer(request, timeout=10)
                assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "overlap" in raised.value.details()
                output.parameters["shared_memory_offset"].int64_param = 1024  # adjacent, not overlapping
                stub.ModelInfer(request, timeout=10)
            finally:
                stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="ov"), timeout=10)
    finally:
        segment.close()
        segment.unlink()
