"""Custom operators for a model's session: libraries named in config.toml, and onnxruntime-extensions.

    register_custom_ops(options, model_dir, ("libmyops.so",), extensions=None, model_path=path)
    session = ort.InferenceSession(str(path), options, providers=...)

Libraries are named relative to the model's directory (repository.py refuses names that leave it).
onnxruntime-extensions (tokenizers, string and image ops in the `ai.onnx.contrib` domain) is registered
when config.toml says `onnxruntime_extensions = true`, or, with the key absent, when the model imports
that domain and names no libraries of its own: its opset imports are read from the file's top-level
fields, the graph is skipped.
"""

from __future__ import annotations

import importlib
import mmap
import os
from collections.abc import Sequence
from pathlib import Path

import onnxruntime as ort

from shm_client.shared.errors import FailedPrecondition
from shm_client.shared.wire import WireError, fields

EXTENSIONS_DOMAIN = "ai.onnx.contrib"
EXTENSIONS_HINT = "pip install 'edgecow[extensions]'"
_PROTOBUF_IMPLEMENTATION = "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"

# ModelProto.opset_import and OperatorSetIdProto.domain in onnx.proto; protobuf's wire type for both.
_OPSET_IMPORT_FIELD = 8
_DOMAIN_FIELD = 1
_LENGTH_DELIMITED = 2


def register_custom_ops(
    options: ort.SessionOptions,
    model_dir: Path | None,
    libraries: Sequence[str],
    extensions: bool | None,
    model_path: Path,
) -> None:
    """Load each library (named relative to `model_dir`) and, when asked or when the model needs it,
    onnxruntime-extensions into `options`; FailedPrecondition says which one could not be loaded."""
    for name in libraries:
        if model_dir is None:
            raise FailedPrecondition(f"custom op library {name!r} has no model directory to be found in")
        path = model_dir / name
        if not path.is_file():
            raise FailedPrecondition(
                f"custom op library {name!r} named in config.toml (custom_op_libraries) is not a file in the "
                "model's directory; put it there or fix the name"
            )
        _register(options, str(path), f"custom op library {name!r}")
    if extensions is None:
        # Libraries of its own may be a build of onnxruntime-extensions (a custom libortextensions.so with
        # the operators it needs): registering the domain twice fails, so then only `true` adds it.
        extensions = not libraries and EXTENSIONS_DOMAIN in model_domains(model_path)
    if extensions:
        _register(options, extensions_library(), "the onnxruntime-extensions library")


def extensions_library() -> str:
    """The path of onnxruntime-extensions' custom-op library; FailedPrecondition when it is not installed."""
    # Importing the package sets PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python for the whole process (its
    # model converters want pure-Python protobuf); anything started from here keeps the caller's choice.
    saved = os.environ.get(_PROTOBUF_IMPLEMENTATION)
    try:
        module = importlib.import_module("onnxruntime_extensions")
    except ImportError:
        raise FailedPrecondition(
            f"the model uses onnxruntime-extensions operators ({EXTENSIONS_DOMAIN}), which are not installed "
            f"on the server; run {EXTENSIONS_HINT} where the server runs"
        ) from None
    finally:
        if saved is None:
            os.environ.pop(_PROTOBUF_IMPLEMENTATION, None)
        else:
            os.environ[_PROTOBUF_IMPLEMENTATION] = saved
    return str(module.get_library_path())


def _register(options: ort.SessionOptions, path: str, what: str) -> None:
    """Load one library into `options`; the reason in the error may hold paths, which the caller strips."""
    try:
        options.register_custom_ops_library(path)
    except Exception as err:  # onnxruntime raises its private Fail type with dlopen's reason
        reason = str(err).strip().rsplit(" with error: ", 1)[-1].strip() or type(err).__name__
        raise FailedPrecondition(
            f"{what} could not be loaded ({reason}); check that it was built for this onnxruntime and platform"
        ) from None


def model_domains(path: Path) -> frozenset[str]:
    """The operator domains a model file imports ("" is the default ONNX domain). Only the top-level
    fields are walked (through mmap, with the protobuf framing alone), so the graph, which holds nearly
    all of the file, is never read. A file that cannot be walked gives none: onnxruntime will say what
    is wrong with it."""
    try:
        with open(path, "rb") as file, mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return frozenset(
                    _opset_domain(view, start, end)
                    for number, kind, start, end in fields(view)
                    if number == _OPSET_IMPORT_FIELD and kind == _LENGTH_DELIMITED
                )
            finally:
                view.release()
    except (OSError, ValueError, WireError):
        return frozenset()


def _opset_domain(view: memoryview, start: int, end: int) -> str:
    """OperatorSetIdProto.domain ("" when absent)."""
    for number, kind, value_start, value_end in fields(view, start, end):
        if number == _DOMAIN_FIELD and kind == _LENGTH_DELIMITED:
            return bytes(view[value_start:value_end]).decode("utf-8", "replace")
    return ""
