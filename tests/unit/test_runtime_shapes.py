"""Output shapes known before a run from named dimensions, and the fallback when a model's names lie.

    pytest tests/unit/test_runtime_shapes.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge_server.runtime import ModelOptions, ModelRuntime
from tests.support import models


def _load(tmp_path: Path, model: onnx.ModelProto) -> ModelRuntime:
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return ModelRuntime.load("m", 1, path, ModelOptions(providers=("CPUExecutionProvider",)))


def test_named_dimensions_fix_the_output_shape_before_the_run(tmp_path: Path) -> None:
    model = _load(tmp_path, models.mixed_model())
    feeds = {"features": np.ones((3, 4), np.float32), "ids": np.arange(5), "mask": np.ones(2, bool)}
    assert model.output_shape("total", feeds) == (3,)
    assert model.output_shape("ids_twice", feeds) == (5,)
    assert model.output_shape("mask_not", feeds) == (2,)


def test_dynamic_output_is_written_by_onnxruntime_into_the_given_buffer(tmp_path: Path) -> None:
    model = _load(tmp_path, models.scale_model(factor=3.0))
    x = np.arange(1000, dtype=np.float32)
    out = np.zeros(1000, np.float32)
    binding, _keep = model.bind({"x": x}, ["y"], {"y": out})
    model.session.run_with_iobinding(binding)
    assert binding.get_outputs()[0].data_ptr() == out.ctypes.data
    np.testing.assert_array_equal(out, x * 3)
    assert model.run({"x": x}, ["y"], {"y": out})["y"] is out


def test_a_model_whose_named_dimension_lies_still_answers_through_one_copy(tmp_path: Path) -> None:
    # Declares y as [n] like x, but really returns 2n elements.
    graph = helper.make_graph(
        [helper.make_node("Concat", ["x", "x"], ["y"], axis=0)],
        "liar",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
    )
    liar = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    liar.ir_version = models.IR_VERSION
    model = _load(tmp_path, liar)
    x = np.arange(4, dtype=np.float32)
    assert model.output_shape("y", {"x": x}) == (4,)
    out = np.zeros(4, np.float32)
    result = model.run({"x": x}, ["y"], {"y": out})["y"]
    assert result is not out
    np.testing.assert_array_equal(result, np.concatenate([x, x]))


def test_inputs_that_disagree_on_a_name_promise_nothing(tmp_path: Path) -> None:
    model = _load(tmp_path, models.add_sub_model(shape=["n"]))
    feeds = {"a": np.ones(3, np.float32), "b": np.ones(4, np.float32)}
    assert model.output_shape("sum", feeds) is None
