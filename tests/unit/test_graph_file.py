"""Reading which graph tensors declare no shape straight from an ONNX file, and the specs built on it.

    pytest tests/unit/test_graph_file.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from edge_server.graph_file import unshaped_tensors
from edge_server.runtime import ModelOptions, ModelRuntime
from shm_client.shared import wire
from shm_client.shared._proto import inference_pb2 as pb
from tests.support import models


def _declared_unshaped(model: onnx.ModelProto) -> frozenset[str]:
    """The answer according to onnx's own parser."""
    return frozenset(
        value.name
        for value in (*model.graph.input, *model.graph.output)
        if value.type.HasField("tensor_type") and not value.type.tensor_type.HasField("shape")
    )


def _save(tmp_path: Path, model: onnx.ModelProto, name: str = "model.onnx") -> Path:
    path = tmp_path / name
    onnx.save(model, path)
    return path


def _mixed_model(with_sequence: bool = True) -> onnx.ModelProto:
    """Inputs with no shape, a scalar shape, named and unnamed dimensions; a big initializer to skip;
    and (`with_sequence`) a sequence output, which is not a tensor at all."""
    weights = numpy_helper.from_array(np.arange(1 << 16, dtype=np.float32), "weights")
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["free", "scalar"], ["free_out"]),
            helper.make_node("Identity", ["named"], ["named_out"]),
            helper.make_node("ReduceSum", ["weights"], ["total"], keepdims=0),
            *([helper.make_node("SequenceConstruct", ["named"], ["seq"])] if with_sequence else []),
        ],
        "mixed_shapes",
        [
            helper.make_tensor_value_info("free", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("scalar", TensorProto.FLOAT, []),
            helper.make_tensor_value_info("named", TensorProto.FLOAT, ["batch", None, 4]),
        ],
        [
            helper.make_tensor_value_info("free_out", TensorProto.FLOAT, None),
            helper.make_tensor_value_info("named_out", TensorProto.FLOAT, ["batch", None, 4]),
            helper.make_tensor_value_info("total", TensorProto.FLOAT, []),
            *([helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)] if with_sequence else []),
        ],
        initializer=[weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = models.IR_VERSION
    return model


@pytest.mark.parametrize(
    "build",
    [_mixed_model, models.any_rank_model, models.symbolic_dims_model, models.optional_inputs_model,
     models.detector_model, models.string_model],
)
def test_unshaped_tensors_match_onnx_itself(tmp_path: Path, build) -> None:
    model = build()
    assert unshaped_tensors(_save(tmp_path, model)) == _declared_unshaped(model)


def test_the_mixed_model_has_exactly_its_free_tensors(tmp_path: Path) -> None:
    assert unshaped_tensors(_save(tmp_path, _mixed_model())) == {"free", "free_out"}


def test_a_file_that_is_not_a_model_gives_none(tmp_path: Path) -> None:
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    assert unshaped_tensors(empty) == frozenset()
    assert unshaped_tensors(tmp_path / "missing.onnx") == frozenset()
    good = _save(tmp_path, models.any_rank_model()).read_bytes()
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(good[: len(good) // 2])
    assert unshaped_tensors(truncated) == frozenset()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_any_bytes_are_walked_without_raising(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "model.onnx"
    path.write_bytes(data)
    assert isinstance(unshaped_tensors(path), frozenset)


def test_fields_gives_each_value_span() -> None:
    message = pb.ModelInferRequest(model_name="m", id="abc", raw_input_contents=[b"xy", b""])
    message.inputs.add(name="x", shape=[2])
    data = memoryview(message.SerializeToString())
    spans = [(number, kind, bytes(data[start:end])) for number, kind, start, end in wire.fields(data)]
    assert [s for s in spans if s[0] in (1, 3, 7)] == [(1, 2, b"m"), (3, 2, b"abc"), (7, 2, b"xy"), (7, 2, b"")]
    inputs = [s for s in spans if s[0] == 5]
    assert pb.ModelInferRequest.InferInputTensor.FromString(inputs[0][2]).name == "x"
    with pytest.raises(wire.WireError):
        list(wire.fields(data[:-1]))


def test_specs_of_a_loaded_model(tmp_path: Path) -> None:
    """What the server reports: any rank as [-1], a scalar as [], optional inputs after required ones."""
    mixed = ModelRuntime.load("mixed", 1, _save(tmp_path, _mixed_model(False), "mixed.onnx"), ModelOptions())
    inputs = {spec.name: spec for spec in mixed.inputs}
    assert (inputs["free"].shape, inputs["free"].ranked) == ((-1,), False)
    assert (inputs["scalar"].shape, inputs["scalar"].ranked) == ((), True)
    assert (inputs["named"].shape, inputs["named"].symbols) == ((-1, -1, 4), ("batch", None, None))
    outputs = {spec.name: spec for spec in mixed.outputs}
    assert outputs["free_out"].shape == (-1,) and not outputs["free_out"].ranked
    assert outputs["total"].shape == () and outputs["total"].ranked

    optional = ModelRuntime.load("opt", 1, _save(tmp_path, models.optional_inputs_model(), "opt.onnx"), ModelOptions())
    assert [(s.name, s.shape, s.optional) for s in optional.inputs] == [
        ("x", (-1, 4), False), ("scale", (1,), True), ("bias", (4,), True),
    ]
