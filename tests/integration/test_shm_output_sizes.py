"""Output slots sized from an earlier call: a value-dependent output size must not fail the call.

    pytest tests/integration/test_shm_output_sizes.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from shm_client import EdgeClient
from tests.support import models
from tests.support.processes import ServerProcess


def _nonzero_model():
    """indices = NonZero(x): its length depends on x's values, not on x's shape."""
    graph = helper.make_graph(
        [helper.make_node("NonZero", ["x"], ["indices"])],
        "nonzero",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("indices", TensorProto.INT64, [1, "k"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = models.IR_VERSION
    return model


def test_value_dependent_output_size_falls_back_once_and_relearns(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    models.write_model(repo, "nonzero", 1, _nonzero_model())
    server = ServerProcess(repo, tmp_path).start()
    try:
        with EdgeClient(server.unix_target, transport="shm") as client:
            few = np.array([0, 1, 0, 2, 0, 0, 0, 0], np.float32)
            many = np.array([1, 1, 1, 1, 1, 0, 0, 0], np.float32)
            for x in (few, few, many, many, few):
                got = client.infer("nonzero", {"x": x})["indices"]
                np.testing.assert_array_equal(got, np.nonzero(x)[0][None, :])
            assert client.transport == "shm"
    finally:
        assert server.stop() == 0
