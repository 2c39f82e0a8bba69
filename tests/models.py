"""ONNX models the tests build with onnx.helper, written into a repository layout.

    root = tmp_path / "models"
    write_model(root, "identity", 1, identity_model())      # root/identity/1/model.onnx
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 17
IR_VERSION = 8


def _model(graph: onnx.GraphProto) -> onnx.ModelProto:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edgecow-tests")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def scale_model(dtype: int = TensorProto.FLOAT, shape: list | None = None, factor: float = 1.0) -> onnx.ModelProto:
    """y = x * factor, for any numeric element type; shape defaults to one variable dimension."""
    shape = ["n"] if shape is None else shape
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    k = helper.make_tensor("k", dtype, [], np.array([factor], dtype=np_type).tobytes(), raw=True)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "k"], ["y"])],
        "scale",
        [helper.make_tensor_value_info("x", dtype, shape)],
        [helper.make_tensor_value_info("y", dtype, shape)],
        initializer=[k],
    )
    return _model(graph)


def identity_model(dtype: int = TensorProto.FLOAT, shape: list | None = None) -> onnx.ModelProto:
    """y = Identity(x): works for every element type including BOOL, FP16 and STRING."""
    shape = ["n"] if shape is None else shape
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", dtype, shape)],
        [helper.make_tensor_value_info("y", dtype, shape)],
    )
    return _model(graph)


def add_sub_model(dtype: int = TensorProto.FLOAT, shape: list | None = None) -> onnx.ModelProto:
    """Two inputs a, b and two outputs sum = a + b, diff = a - b (Triton's classic simple model)."""
    shape = [1, 16] if shape is None else shape
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Sub", ["a", "b"], ["diff"])],
        "add_sub",
        [helper.make_tensor_value_info("a", dtype, shape), helper.make_tensor_value_info("b", dtype, shape)],
        [helper.make_tensor_value_info("sum", dtype, shape), helper.make_tensor_value_info("diff", dtype, shape)],
    )
    return _model(graph)


def mixed_model() -> onnx.ModelProto:
    """Inputs of several dtypes: features FP32[-1,4], ids INT64[-1], mask BOOL[-1].

    Outputs: total FP32[-1] (row sums of features), ids_twice INT64[-1], mask_not BOOL[-1].
    """
    two = helper.make_tensor("two", TensorProto.INT64, [], [2])
    axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["features", "axes"], ["total"], keepdims=0),
            helper.make_node("Mul", ["ids", "two"], ["ids_twice"]),
            helper.make_node("Not", ["mask"], ["mask_not"]),
        ],
        "mixed",
        [
            helper.make_tensor_value_info("features", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["m"]),
            helper.make_tensor_value_info("mask", TensorProto.BOOL, ["k"]),
        ],
        [
            helper.make_tensor_value_info("total", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("ids_twice", TensorProto.INT64, ["m"]),
            helper.make_tensor_value_info("mask_not", TensorProto.BOOL, ["k"]),
        ],
        initializer=[two, axes],
    )
    return _model(graph)


def string_model() -> onnx.ModelProto:
    """A string (v2 BYTES) tensor in, the same strings out, plus their count as INT64."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["text"], ["echo"]), helper.make_node("Size", ["text"], ["count"])],
        "strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
        [
            helper.make_tensor_value_info("echo", TensorProto.STRING, ["n"]),
            helper.make_tensor_value_info("count", TensorProto.INT64, []),
        ],
    )
    return _model(graph)


def slow_model(size: int = 192) -> onnx.ModelProto:
    """y = x after `iterations` (an INT64 scalar input) rounds of a size-by-size MatMul.

    The run time grows with `iterations`, so a test can hold a call in flight for as long as it needs.
    Output `y` is `x` unchanged; `work` carries the loop's result so onnxruntime cannot skip it.
    """
    w = helper.make_tensor("w", TensorProto.FLOAT, [size, size], np.eye(size, dtype=np.float32).reshape(-1))
    body = helper.make_graph(
        [
            helper.make_node("MatMul", ["acc_in", "w"], ["acc_out"]),
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, [size, size]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, [size, size]),
        ],
    )
    start = helper.make_tensor("start", TensorProto.FLOAT, [size, size], np.ones(size * size, dtype=np.float32))
    true = helper.make_tensor("true", TensorProto.BOOL, [], [True])
    graph = helper.make_graph(
        [
            helper.make_node("Loop", ["iterations", "true", "start"], ["work_full"], body=body),
            helper.make_node("ReduceMax", ["work_full"], ["work"], keepdims=0),
            helper.make_node("Identity", ["x"], ["y"]),
        ],
        "slow",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("iterations", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("work", TensorProto.FLOAT, []),
        ],
        initializer=[w, start, true],
    )
    return _model(graph)


def gate_model(max_rounds: int = 20_000_000) -> onnx.ModelProto:
    """y = x, returned once the INT32 input `gate` holds a non-zero value.

    A Loop re-reads `gate` every round, so a test that passes `gate` in shared memory (the server hands
    onnxruntime a pointer into the region) holds the call in flight until it writes 1 there: no model
    calibrated to be slow on today's CPU. `max_rounds` bounds a call whose test never opens the gate.
    """
    body = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["gate"], ["level"], keepdims=0),
            helper.make_node("Equal", ["level", "closed"], ["cond_out"]),
            helper.make_node("Identity", ["acc_in"], ["acc_out"]),
        ],
        "wait",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, ["n"]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["n"]),
        ],
        initializer=[helper.make_tensor("closed", TensorProto.INT32, [], [0])],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["max_rounds", "true", "x"], ["y"], body=body)],
        "gate",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("gate", TensorProto.INT32, [1]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
        initializer=[
            helper.make_tensor("max_rounds", TensorProto.INT64, [], [max_rounds]),
            helper.make_tensor("true", TensorProto.BOOL, [], [True]),
        ],
    )
    return _model(graph)


def write_model(root: Path, name: str, version: int, model: onnx.ModelProto, config: str | None = None) -> Path:
    """Save `model` as root/name/version/model.onnx (and root/name/config.toml if given)."""
    target = Path(root) / name / str(version) / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, target)
    if config is not None:
        (Path(root) / name / "config.toml").write_text(config)
    return target
