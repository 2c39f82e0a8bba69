"""What onnxruntime's session does not say about a model's graph, read from the ONNX file itself.

    unshaped_tensors(Path("models/any/1/model.onnx"))     # frozenset({"x", "y"}): no shape declared

onnxruntime reports a graph input or output whose type declares no shape (any rank is accepted) as
shape [], the same as a scalar. The file tells them apart: such a tensor's TypeProto.Tensor has no
`shape` field. The file is walked through mmap with the protobuf framing alone, so initializers and
nodes are skipped by their length, never read, and the onnx package is not needed.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Iterator
from pathlib import Path

from shm_client.shared.wire import WireError, fields

log = logging.getLogger(__name__)

# Field numbers of onnx.proto (ModelProto.graph, GraphProto.input/output, ValueInfoProto.name/type,
# TypeProto.tensor_type, TypeProto.Tensor.shape) and protobuf's wire type for a message or string.
_MODEL_GRAPH = 7
_GRAPH_INPUT, _GRAPH_OUTPUT = 11, 12
_VALUE_NAME, _VALUE_TYPE = 1, 2
_TYPE_TENSOR = 1
_TENSOR_SHAPE = 2
_LENGTH_DELIMITED = 2


def unshaped_tensors(path: Path) -> frozenset[str]:
    """Names of the graph inputs and outputs of the ONNX file at `path` whose tensor type declares no
    shape. A file that cannot be walked gives none (onnxruntime has loaded it, so this only costs the
    distinction between a scalar and any rank)."""
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return frozenset(_unshaped(view))
            finally:
                view.release()
    except (OSError, ValueError, WireError) as err:
        log.warning("cannot read the graph's tensor shapes from %s (%s); tensors without one count as scalars",
                    path.name, err)
        return frozenset()


def _unshaped(view: memoryview) -> Iterator[str]:
    for number, kind, start, end in fields(view):
        if number != _MODEL_GRAPH or kind != _LENGTH_DELIMITED:
            continue
        for item, item_kind, item_start, item_end in fields(view, start, end):
            if item in (_GRAPH_INPUT, _GRAPH_OUTPUT) and item_kind == _LENGTH_DELIMITED:
                name, shaped = _value_info(view, item_start, item_end)
                if not shaped:
                    yield name


def _value_info(view: memoryview, start: int, end: int) -> tuple[str, bool]:
    """A ValueInfoProto's name, and False when it is a tensor whose type has no shape (anything that is
    not a tensor counts as shaped: it is not this module's to judge). Repeated occurrences of a message
    field merge in protobuf, so any occurrence of a shape counts."""
    name = ""
    tensor = shaped = False
    for number, kind, value_start, value_end in fields(view, start, end):
        if kind != _LENGTH_DELIMITED:
            continue
        if number == _VALUE_NAME:
            name = bytes(view[value_start:value_end]).decode("utf-8", "replace")
        elif number == _VALUE_TYPE:
            for kind_number, type_kind, type_start, type_end in fields(view, value_start, value_end):
                if kind_number != _TYPE_TENSOR or type_kind != _LENGTH_DELIMITED:
                    continue
                tensor = True
                shaped = shaped or any(
                    field == _TENSOR_SHAPE for field, _, _, _ in fields(view, type_start, type_end)
                )
    return name, shaped or not tensor
