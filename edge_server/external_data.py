"""The files an ONNX model keeps its weights in beside the .onnx itself (external data).

    external_files(Path("models/big/1/model.onnx"))    # ("model.onnx.data",)

torch.onnx.export (and onnx.save_model(..., save_as_external_data=True)) writes a large model as
model.onnx plus one or more data files: each such initializer's TensorProto has data_location = EXTERNAL
and names its file in external_data["location"], relative to the directory of the .onnx file. The names
are read from the file with the protobuf framing alone (mmap, tensors skipped by their length), so the
server does not need the onnx package, and a name that could lead outside the model's directory (an
absolute path, or '..' climbing out) is refused before onnxruntime would open it.
"""

from __future__ import annotations

import logging
import mmap
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

from shm_client.shared.errors import InvalidArgument
from shm_client.shared.wire import WireError, fields

log = logging.getLogger(__name__)

_VARINT, _LENGTH_DELIMITED = 0, 2
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

# Where tensors can sit in onnx.proto: for each message kind, its fields that hold messages worth
# opening, and the kind of each. Field numbers are onnx.proto's.
_MODEL, _GRAPH, _NODE, _ATTRIBUTE, _SPARSE, _FUNCTION, _TRAINING, _TENSOR = range(8)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNCTION},  # graph, training_info, functions
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},  # node, initializer, sparse_initializer
    _NODE: {5: _ATTRIBUTE},  # attribute
    _ATTRIBUTE: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},  # t, g, tensors, ...
    _SPARSE: {1: _TENSOR, 2: _TENSOR},  # values, indices
    _FUNCTION: {7: _NODE, 11: _ATTRIBUTE},  # node, attribute_proto
    _TRAINING: {1: _GRAPH, 2: _GRAPH},  # initialization, algorithm
}
_TENSOR_EXTERNAL_DATA, _TENSOR_DATA_LOCATION = 13, 14
_ENTRY_KEY, _ENTRY_VALUE = 1, 2


def external_files(model: Path) -> tuple[str, ...]:
    """The external-data file names the ONNX file `model` gives (relative to its directory), each once,
    in the order they first appear. InvalidArgument names one that is absolute or climbs out of the
    directory with '..'. A file that is not a readable protobuf message names none: onnxruntime says
    what is wrong with it when it loads."""
    try:
        with open(model, "rb") as file:
            if not file.seek(0, 2):
                return ()
            with mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    names = list(dict.fromkeys(_locations(view)))
                finally:
                    view.release()
    except (OSError, ValueError, WireError) as err:
        log.debug("cannot read external-data names from %s (%s)", model.name, err)
        return ()
    for name in names:
        check_location(name)
    return tuple(names)


def check_location(name: str) -> None:
    """InvalidArgument unless `name` is a relative path that stays inside the model's directory."""
    path = PurePosixPath(name)
    depth = 0
    for part in path.parts:
        depth += -1 if part == ".." else 0 if part == "." else 1
        if depth < 0:
            break
    if not name or "\0" in name or path.is_absolute() or depth <= 0:
        raise InvalidArgument(
            f"the model names external data {name[:200]!r}, which is not a file inside the model's directory; "
            "save it with a location relative to the .onnx file, such as 'model.onnx.data'"
        )


def _locations(view: memoryview) -> Iterator[str]:
    """external_data["location"] of every tensor stored outside the file, walking the message tree
    with a stack (a model's nesting is the model's, not Python's recursion limit)."""
    stack = [(_MODEL, 0, len(view))]
    while stack:
        kind, start, end = stack.pop()
        if kind == _TENSOR:
            location = _tensor_location(view, start, end)
            if location is not None:
                yield location
            continue
        children = _CHILDREN[kind]
        found = [
            (children[number], value_start, value_end)
            for number, wire_type, value_start, value_end in fields(view, start, end)
            if wire_type == _LENGTH_DELIMITED and number in children
        ]
        stack.extend(reversed(found))  # popped in file order


def _tensor_location(view: memoryview, start: int, end: int) -> str | None:
    """The location of a TensorProto whose data lives in another file, else None."""
    external = False
    location = None
    for number, wire_type, value_start, value_end in fields(view, start, end):
        if number == _TENSOR_DATA_LOCATION and wire_type == _VARINT:
            external = _varint_value(view, value_start, value_end) == _EXTERNAL
        elif number == _TENSOR_EXTERNAL_DATA and wire_type == _LENGTH_DELIMITED:
            key, value = _entry(view, value_start, value_end)
            if key == "location":
                location = value
    return location if external and location is not None else None


def _entry(view: memoryview, start: int, end: int) -> tuple[str, str]:
    """A StringStringEntryProto's key and value."""
    key = value = ""
    for number, wire_type, value_start, value_end in fields(view, start, end):
        if wire_type != _LENGTH_DELIMITED:
            continue
        text = bytes(view[value_start:value_end]).decode("utf-8", "surrogateescape")
        if number == _ENTRY_KEY:
            key = text
        elif number == _ENTRY_VALUE:
            value = text
    return key, value


def _varint_value(view: memoryview, start: int, end: int) -> int:
    value = 0
    for shift, byte in enumerate(view[start:end]):
        value |= (byte & 0x7F) << (7 * shift)
    return value
