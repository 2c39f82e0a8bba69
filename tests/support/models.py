"""ONNX models the tests build with onnx.helper, written into a repository layout.

    root = tmp_path / "models"
    write_model(root, "identity", 1, identity_model())      # root/identity/1/model.onnx
    build_repository(tmp_path / "shared")                    # the repository most tests share
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

OPSET = 17
IR_VERSION = 8


def onnx_model(graph: onnx.GraphProto, extra_opsets: dict[str, int] | None = None,
               check: bool = True) -> onnx.ModelProto:
    """`graph` as a model at the tests' opset (plus `extra_opsets`, domain: version), checked by onnx
    unless `check` is False (onnx knows no schema for some domains, nor graphs without shapes)."""
    opsets = [helper.make_opsetid("", OPSET)]
    opsets += [helper.make_opsetid(domain, version) for domain, version in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="edgecow-tests")
    model.ir_version = IR_VERSION
    if check:
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
    return onnx_model(graph)


def identity_model(dtype: int = TensorProto.FLOAT, shape: list | None = None) -> onnx.ModelProto:
    """y = Identity(x): works for every element type including BOOL, FP16 and STRING."""
    shape = ["n"] if shape is None else shape
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", dtype, shape)],
        [helper.make_tensor_value_info("y", dtype, shape)],
    )
    return onnx_model(graph)


def add_sub_model(dtype: int = TensorProto.FLOAT, shape: list | None = None) -> onnx.ModelProto:
    """Two inputs a, b and two outputs sum = a + b, diff = a - b (Triton's classic simple model)."""
    shape = [1, 16] if shape is None else shape
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["sum"]), helper.make_node("Sub", ["a", "b"], ["diff"])],
        "add_sub",
        [helper.make_tensor_value_info("a", dtype, shape), helper.make_tensor_value_info("b", dtype, shape)],
        [helper.make_tensor_value_info("sum", dtype, shape), helper.make_tensor_value_info("diff", dtype, shape)],
    )
    return onnx_model(graph)


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
    return onnx_model(graph)


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
    return onnx_model(graph)


GATE_MAX_ROUNDS = 2**31 - 1  # minutes of rounds even on a fast CPU: a shut gate is a call that never ends


def gate_model(max_rounds: int = GATE_MAX_ROUNDS) -> onnx.ModelProto:
    """y = x, returned once the INT32 input `gate` holds a non-zero value; `rounds` (INT64 scalar) says
    how many times the gate was read.

    A Loop re-reads `gate` every round, so a test that passes `gate` in shared memory (the server hands
    onnxruntime a pointer into the region) holds the call in flight until it writes 1 there: no model
    calibrated to be slow on today's CPU (see support/gate.py). A gate of 0 sent in the request itself
    never opens: that call runs until it is cancelled or `max_rounds` rounds have passed.
    """
    body = helper.make_graph(
        [
            helper.make_node("ReduceMax", ["gate"], ["level"], keepdims=0),
            helper.make_node("Equal", ["level", "closed"], ["cond_out"]),
            helper.make_node("Identity", ["acc_in"], ["acc_out"]),
            helper.make_node("Add", ["rounds_in", "one"], ["rounds_out"]),
        ],
        "wait",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_in", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("rounds_in", TensorProto.INT64, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("acc_out", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("rounds_out", TensorProto.INT64, []),
        ],
        initializer=[
            helper.make_tensor("closed", TensorProto.INT32, [], [0]),
            helper.make_tensor("one", TensorProto.INT64, [], [1]),
        ],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["max_rounds", "true", "x", "zero"], ["y", "rounds"], body=body)],
        "gate",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("gate", TensorProto.INT32, [1]),
        ],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("rounds", TensorProto.INT64, []),
        ],
        initializer=[
            helper.make_tensor("max_rounds", TensorProto.INT64, [], [max_rounds]),
            helper.make_tensor("true", TensorProto.BOOL, [], [True]),
            helper.make_tensor("zero", TensorProto.INT64, [], [0]),
        ],
    )
    return onnx_model(graph)


def write_model(root: Path, name: str, version: int, model: onnx.ModelProto, config: str | None = None) -> Path:
    """Save `model` as root/name/version/model.onnx (and root/name/config.toml if given)."""
    target = Path(root) / name / str(version) / "model.onnx"
    target.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, target)
    if config is not None:
        (Path(root) / name / "config.toml").write_text(config)
    return target


def detector_model() -> onnx.ModelProto:
    """A detector's tail whose outputs are empty when nothing is found.

    Inputs: boxes FP32[n, 3], scores FP32[n], k INT64[1]; `threshold` FP32[] is an initializer that is
    also a graph input (default 0.5), so a request may override it. Outputs: kept FP32[hits, 3] (the
    boxes scoring above the threshold: [0, 3] when none does), hit_index INT64[1, hits] (NonZero of the
    mask: [1, 0] when none), top_scores FP32[k] and top_index INT64[k] (TopK: empty for k = 0).
    """
    graph = helper.make_graph(
        [
            helper.make_node("Greater", ["scores", "threshold"], ["mask"]),
            helper.make_node("Compress", ["boxes", "mask"], ["kept"], axis=0),
            helper.make_node("NonZero", ["mask"], ["hit_index"]),
            helper.make_node("TopK", ["scores", "k"], ["top_scores", "top_index"]),
        ],
        "detector",
        [
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, ["n", 3]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["n"]),
            helper.make_tensor_value_info("k", TensorProto.INT64, [1]),
            helper.make_tensor_value_info("threshold", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("kept", TensorProto.FLOAT, ["hits", 3]),
            helper.make_tensor_value_info("hit_index", TensorProto.INT64, [1, "hits"]),
            helper.make_tensor_value_info("top_scores", TensorProto.FLOAT, ["k"]),
            helper.make_tensor_value_info("top_index", TensorProto.INT64, ["k"]),
        ],
        initializer=[helper.make_tensor("threshold", TensorProto.FLOAT, [], [0.5])],
    )
    return onnx_model(graph)


def any_rank_model(dtype: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """y = x * 3 for a numeric element type, with neither tensor declaring a shape:
    onnxruntime takes x at any rank, as exporters that lose shapes leave it. onnx's checker asks every
    graph input and output for a shape these days, so this one model is not checked."""
    np_type = helper.tensor_dtype_to_np_dtype(dtype)
    three = helper.make_tensor("three", dtype, [], np.array([3], dtype=np_type).tobytes(), raw=True)
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "three"], ["y"])],
        "any_rank",
        [helper.make_tensor_value_info("x", dtype, None)],
        [helper.make_tensor_value_info("y", dtype, None)],
        initializer=[three],
    )
    return onnx_model(graph, check=False)


def symbolic_dims_model() -> onnx.ModelProto:
    """y = Identity(x) with x FP32["batch", 3, unnamed]: a named, a fixed and an unnamed dimension."""
    shape = helper.make_tensor_type_proto(TensorProto.FLOAT, ["batch", 3, None])
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "symbolic",
        [helper.make_value_info("x", shape)],
        [helper.make_value_info("y", shape)],
    )
    return onnx_model(graph)


def optional_inputs_model() -> onnx.ModelProto:
    """y = x * scale + bias, where scale FP32[1] (default 2) and bias FP32[4] (default 0.25 each) are
    initializers that are also graph inputs: a request may give x alone or override either."""
    graph = helper.make_graph(
        [helper.make_node("Mul", ["x", "scale"], ["scaled"]), helper.make_node("Add", ["scaled", "bias"], ["y"])],
        "optional_inputs",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4]),
            helper.make_tensor_value_info("scale", TensorProto.FLOAT, [1]),
            helper.make_tensor_value_info("bias", TensorProto.FLOAT, [4]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])],
        initializer=[
            helper.make_tensor("scale", TensorProto.FLOAT, [1], [2.0]),
            helper.make_tensor("bias", TensorProto.FLOAT, [4], [0.25] * 4),
        ],
    )
    return onnx_model(graph)


def zipmap_model(classes: int = 3) -> onnx.ModelProto:
    """The tail of a skl2onnx classifier as converted by default: float_input FP32[N, classes] in;
    output_label INT64[N] (ArgMax) and output_probability, the softmax as a ZipMap, a sequence of maps
    {class: probability} that is not a tensor."""
    zipped = helper.make_sequence_type_proto(
        helper.make_map_type_proto(TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, []))
    )
    graph = helper.make_graph(
        [
            helper.make_node("ArgMax", ["float_input"], ["output_label"], axis=1, keepdims=0),
            helper.make_node("Softmax", ["float_input"], ["probabilities"], axis=1),
            helper.make_node("ZipMap", ["probabilities"], ["output_probability"], domain="ai.onnx.ml",
                             classlabels_int64s=list(range(classes))),
        ],
        "zipmap",
        [helper.make_tensor_value_info("float_input", TensorProto.FLOAT, ["N", classes])],
        [
            helper.make_tensor_value_info("output_label", TensorProto.INT64, ["N"]),
            helper.make_value_info("output_probability", zipped),
        ],
    )
    return onnx_model(graph, {"ai.onnx.ml": 3})


def sequence_outputs_model() -> onnx.ModelProto:
    """x FP32[n, 2] in; y = x (a tensor), parts = SplitToSequence(x) (a sequence of tensors) and
    maybe = Optional(x) (an optional tensor): two outputs the v2 protocol cannot carry beside one it can."""
    graph = helper.make_graph(
        [
            helper.make_node("Identity", ["x"], ["y"]),
            helper.make_node("SplitToSequence", ["x"], ["parts"], axis=0),
            helper.make_node("Optional", ["x"], ["maybe"]),
        ],
        "sequence_outputs",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2]),
            helper.make_value_info("parts", helper.make_sequence_type_proto(
                helper.make_tensor_type_proto(TensorProto.FLOAT, None))),
            helper.make_value_info("maybe", helper.make_optional_type_proto(
                helper.make_tensor_type_proto(TensorProto.FLOAT, ["n", 2]))),
        ],
    )
    return onnx_model(graph)


def sequence_input_model() -> onnx.ModelProto:
    """items, a sequence of FP32 tensors, in (no v2 request can carry it); count INT64[] out."""
    graph = helper.make_graph(
        [helper.make_node("SequenceLength", ["items"], ["count"])],
        "sequence_input",
        [helper.make_value_info("items", helper.make_sequence_type_proto(
            helper.make_tensor_type_proto(TensorProto.FLOAT, None)))],
        [helper.make_tensor_value_info("count", TensorProto.INT64, [])],
    )
    return onnx_model(graph)


CONTRIB_DOMAIN = "ai.onnx.contrib"


def contrib_strings_model() -> onnx.ModelProto:
    """onnxruntime-extensions string operators: text BYTES[n] in; shout = StringUpper(text) and
    dashed = StringRegexReplace(text, "\\s+", "-") out. Plain onnxruntime cannot load it."""
    graph = helper.make_graph(
        [
            helper.make_node("StringUpper", ["text"], ["shout"], domain=CONTRIB_DOMAIN),
            helper.make_node("StringRegexReplace", ["text", "pattern", "rewrite"], ["dashed"], domain=CONTRIB_DOMAIN),
        ],
        "contrib_strings",
        [helper.make_tensor_value_info("text", TensorProto.STRING, ["n"])],
        [
            helper.make_tensor_value_info("shout", TensorProto.STRING, ["n"]),
            helper.make_tensor_value_info("dashed", TensorProto.STRING, ["n"]),
        ],
        initializer=[
            helper.make_tensor("pattern", TensorProto.STRING, [1], [rb"\s+"]),
            helper.make_tensor("rewrite", TensorProto.STRING, [1], [b"-"]),
        ],
    )
    return onnx_model(graph, {CONTRIB_DOMAIN: 1}, check=False)  # onnx's checker knows no schema for it


def concat_model() -> onnx.ModelProto:
    """Two batched inputs, left FP32[batch, 2] and right FP32[batch, 3]; joined = their Concat along
    axis 1, FP32[batch, 5]."""
    graph = helper.make_graph(
        [helper.make_node("Concat", ["left", "right"], ["joined"], axis=1)],
        "concat",
        [
            helper.make_tensor_value_info("left", TensorProto.FLOAT, ["batch", 2]),
            helper.make_tensor_value_info("right", TensorProto.FLOAT, ["batch", 3]),
        ],
        [helper.make_tensor_value_info("joined", TensorProto.FLOAT, ["batch", 5])],
    )
    return onnx_model(graph)


def build_repository(root: Path) -> Path:
    """The repository most tests share: every datatype the tests need, two versions of `scale`, `gate`."""
    write_model(root, "scale", 1, scale_model(factor=1.0))
    write_model(root, "scale", 2, scale_model(factor=2.0), config='version_policy = "all"\n')
    write_model(root, "add_sub", 1, add_sub_model())
    write_model(root, "add_sub_int32", 1, add_sub_model(TensorProto.INT32))
    write_model(root, "mixed", 1, mixed_model())
    write_model(root, "strings", 1, string_model())
    write_model(root, "gate", 1, gate_model())
    for dtype in ("FLOAT", "DOUBLE", "FLOAT16", "BOOL", "INT8", "INT16", "INT32", "INT64",
                  "UINT8", "UINT16", "UINT32", "UINT64", "STRING"):
        write_model(root, f"identity_{dtype.lower()}", 1, identity_model(getattr(TensorProto, dtype)))
    write_model(root, "static", 1, scale_model(shape=[4, 256], factor=3.0))
    return root
