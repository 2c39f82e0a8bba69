"""A live EdgeClient on shared memory across a hot swap of its model: the first call after the swap
already answers from the new version, with no error, no fallback to gRPC and no new client.

    client.infer("grow", {"x": x})["y"]     # [4] before; the repository swaps in a [8] output; [8] at once
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from shm_client import EdgeClient
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from shm_client.shared.errors import EdgecowError
from tests.support.models import onnx_model, write_model
from tests.support.processes import ServerProcess
from tests.support.waiting import wait_until

X = np.array([1.0, 2.0, 3.0, 4.0], np.float32)


def repeated(times: int, output: str = "y") -> onnx.ModelProto:
    """`output` = x repeated `times` times: a static [4] input and a static [4 * times] output."""
    node = (helper.make_node("Concat", ["x"] * times, [output], axis=0) if times > 1
            else helper.make_node("Identity", ["x"], [output]))
    graph = helper.make_graph(
        [node], "repeated",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, [4 * times])],
    )
    return onnx_model(graph)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, ServerProcess]]:
    root = tmp_path / "models"
    write_model(root, "grow", 1, repeated(1))
    proc = ServerProcess(root, tmp_path, "--poll-interval", "0.2").start()
    yield root, proc
    proc.stop()


def _serves(target: str, version: str, output: str, size: int) -> bool:
    """Whether `version` of grow is loaded with the one output `output` of [size] elements."""
    with grpc.insecure_channel(target) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            meta = stub.ModelMetadata(pb.ModelMetadataRequest(name="grow", version=version), timeout=10)
        except grpc.RpcError:
            return False
    return [(o.name, list(o.shape)) for o in meta.outputs] == [(output, [size])]


@pytest.mark.parametrize(
    ("swap", "version", "times", "output"),
    [
        ("larger_output_in_a_new_version", 2, 2, "y"),
        ("larger_output_rewritten_in_place", 1, 3, "y"),
        ("renamed_output_in_a_new_version", 2, 1, "z"),
        ("smaller_output_in_a_new_version", 2, 1, "y"),
    ],
)
def test_a_live_edgeclient_follows_a_hot_swap_by_itself(
    served: tuple[Path, ServerProcess], swap: str, version: int, times: int, output: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    root, server = served
    if swap == "smaller_output_in_a_new_version":
        write_model(root, "grow", 1, repeated(2))  # start from [8] so that the new version is smaller
        assert wait_until(lambda: _serves(server.unix_target, "1", "y", 8), timeout=30)
    with EdgeClient(server.unix_target, transport="shm") as client:
        before = client.infer("grow", {"x": X})
        assert list(before) == ["y"]
        # The swap: a polling server replaces the model under the client's cached metadata.
        staged = write_model(root.parent / "staging", "grow", version, repeated(times, output))
        target = root / "grow" / str(version) / "model.onnx"
        target.parent.mkdir(exist_ok=True)
        staged.replace(target)
        assert wait_until(lambda: _serves(server.unix_target, str(version), output, 4 * times), timeout=30)
        if version == 2:
            assert wait_until(lambda: not _serves(server.unix_target, "1", "y", 4), timeout=30)
        with caplog.at_level(logging.WARNING, logger="edgecow.client"):
            after = client.infer("grow", {"x": X})  # the first call after the swap
            again = client.infer("grow", {"x": X})
        assert list(after) == [output]
        np.testing.assert_array_equal(after[output], np.tile(X, times))
        np.testing.assert_array_equal(again[output], np.tile(X, times))
        assert client.transport == "shm"
        assert not [r for r in caplog.records if "shared memory failed" in r.getMessage()], caplog.text
        assert client.metadata("grow")["outputs"] == [{"name": output, "datatype": "FP32", "shape": [4 * times]}]


def test_a_request_that_is_wrong_is_refused_once_not_retried_forever(
    served: tuple[Path, ServerProcess],
) -> None:
    _, server = served
    with EdgeClient(server.unix_target, transport="shm") as client:
        client.infer("grow", {"x": X})
        with pytest.raises(EdgecowError) as wrong:
            client.infer("grow", {"x": X[:3]})  # the model's input is [4]
        assert wrong.value.code == grpc.StatusCode.INVALID_ARGUMENT
        np.testing.assert_array_equal(client.infer("grow", {"x": X})["y"], X)
