"""One loaded model version: an onnxruntime session, its tensor metadata, and runs with bound buffers.

    model = ModelRuntime.load("scale", 1, Path("models/scale/1/model.onnx"), ModelOptions())
    outputs = model.run({"x": np.ones(4, np.float32)}, ["y"])           # {"y": array([...])}

Inputs are handed to onnxruntime as OrtValues over the caller's memory (a shared-memory view stays a
view), and an output given a buffer is written by onnxruntime straight into it when its shape is known
before the run.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import re
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _pybind

from shm_client.shared import datatypes
from shm_client.shared.datatypes import DataType
from shm_client.shared.errors import (
    DeadlineExceeded,
    EdgecowError,
    FailedPrecondition,
    InvalidArgument,
    Unavailable,
    Unimplemented,
)

from . import batching
from .classification import read_labels
from .custom_ops import register_custom_ops
from .graph_file import unshaped_tensors

log = logging.getLogger(__name__)

# What onnxruntime raises for a run it rejects (its pybind types do not derive from RuntimeError).
_ORT_ERRORS = (RuntimeError, _pybind.Fail, _pybind.InvalidArgument, _pybind.RuntimeException)
GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")
PROBE_MODEL = Path(__file__).parent / "examples" / "probe.onnx"
# onnxruntime's log severities (0 verbose .. 4 fatal).
ORT_LOG_ERROR = 3
ORT_LOG_FATAL = 4
# Bindings each thread keeps per model (see ModelRuntime._reused_binding): callers that alternate
# between a few sets of buffers (double buffering, a pool handing segments out in turn) reuse them too.
BINDINGS_PER_THREAD = 4
# numpy kinds bound to onnxruntime by address: booleans, integers and floats (not strings or objects).
_BINDABLE_KINDS = frozenset("biuf")
# The session config key for intra-op workers busy-waiting between runs (onnxruntime's default is "1").
ALLOW_SPINNING = "session.intra_op.allow_spinning"
# onnxruntime logs at WARNING by default, which includes harmless notes about node placement.
ort.set_default_logger_severity(ORT_LOG_ERROR)


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output as the v2 protocol describes it (-1 for a variable dimension)."""

    name: str
    datatype: DataType
    shape: tuple[int, ...]
    # The model's names for its variable dimensions ("batch", "n"), None where it gives none.
    symbols: tuple[str | None, ...] = ()
    # False for a tensor whose type declares no shape: it takes any rank, and says so as [-1] as Triton does.
    ranked: bool = True
    # True for an input backed by an initializer: a request may override it or omit it for the model's default.
    optional: bool = False


@dataclass(frozen=True)
class ModelOptions:
    """How to build a session; comes from the model's config.toml over the server's settings."""

    providers: tuple[str, ...] = ("auto",)
    intra_op_threads: int = 0
    inter_op_threads: int = 0
    intra_op_spinning: bool = False
    require_gpu: bool = False
    warmup: bool = False
    model_dir: Path | None = None  # where the file names below are found: <root>/<name>
    max_batch_size: int | None = None  # None: detected from the shapes (see batching.py)
    labels: tuple[tuple[str, str], ...] = ()  # (output, labels file) for classification; "" is every output
    custom_op_libraries: tuple[str, ...] = ()
    onnxruntime_extensions: bool | None = None  # None: when the model imports ai.onnx.contrib


def session_options_for(options: ModelOptions) -> ort.SessionOptions:
    """onnxruntime's session options for `options` (the bench builds its in-process baseline with these)."""
    session_options = ort.SessionOptions()
    session_options.log_severity_level = ORT_LOG_ERROR
    if options.intra_op_threads:
        session_options.intra_op_num_threads = options.intra_op_threads
    if options.inter_op_threads:
        session_options.inter_op_num_threads = options.inter_op_threads
    session_options.add_session_config_entry(ALLOW_SPINNING, "1" if options.intra_op_spinning else "0")
    return session_options


@functools.cache
def gpu_usable() -> bool:
    """True when a CUDA session really starts here (a driver, the CUDA libraries, a device).

    onnxruntime-gpu lists the CUDA provider even on a box without a GPU and then logs errors when a
    session asks for it, so the driver library is looked for first and a tiny session tried quietly.
    """
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    options = ort.SessionOptions()
    options.log_severity_level = ORT_LOG_FATAL  # a failed probe is reported by the caller
    try:
        session = ort.InferenceSession(str(PROBE_MODEL), options, providers=["CUDAExecutionProvider"])
    except Exception:  # any failure to start CUDA means "not usable"; the reason is logged by the caller
        return False
    return "CUDAExecutionProvider" in session.get_providers()


def usable_providers() -> list[str]:
    """The execution providers of this onnxruntime that can really start here (GPU ones need a GPU)."""
    gpu = gpu_usable()
    return [p for p in ort.get_available_providers() if gpu or p not in GPU_PROVIDERS]


def resolve_providers(requested: Sequence[str], require_gpu: bool) -> list[str]:
    """The provider list to ask onnxruntime for: 'auto' means CUDA when usable, then CPU."""
    available = ort.get_available_providers()
    wanted: list[str] = []
    for name in requested:
        if name == "auto":
            wanted.extend(["CUDAExecutionProvider"] if gpu_usable() else [])
            wanted.append("CPUExecutionProvider")
        elif name not in available:
            raise FailedPrecondition(
                f"execution provider {name} is not available; this onnxruntime offers {', '.join(available)}"
            )
        elif name in GPU_PROVIDERS and not gpu_usable():
            log.warning("execution provider %s cannot start on this machine (no usable GPU); skipping it", name)
        else:
            wanted.append(name)
    if require_gpu and not any(p in GPU_PROVIDERS for p in wanted):
        raise FailedPrecondition("require_gpu is set but no GPU execution provider can start on this machine")
    if "CPUExecutionProvider" not in wanted:
        wanted.append("CPUExecutionProvider")
    return list(dict.fromkeys(wanted))


def _served_outputs(
    name: str, version: int, session: ort.InferenceSession
) -> tuple[list[ort.NodeArg], dict[str, str]]:
    """The outputs whose type is a v2 datatype, and the others' onnx types by name; Unavailable, naming
    them, when an input has a type no request could carry (a sequence, a map, an optional)."""
    refused = [f"{node.name!r} ({node.type})" for node in session.get_inputs() if not _carried(node)]
    if refused:
        raise Unavailable(
            f"model {name} version {version} cannot be loaded: input(s) {', '.join(refused)} have a type the v2 "
            "protocol cannot carry; only tensors of its datatypes can be sent"
        )
    served = [node for node in session.get_outputs() if _carried(node)]
    unserved = {node.name: node.type for node in session.get_outputs() if not _carried(node)}
    if unserved:
        log.warning(
            "model %s version %d: output(s) %s have a type the v2 protocol cannot carry and are not served",
            name, version, ", ".join(f"{out} ({kind})" for out, kind in unserved.items()),
        )
    return served, unserved


def _carried(node: ort.NodeArg) -> bool:
    try:
        datatypes.from_onnx(node.type)
    except Unimplemented:
        return False
    return True


def _specs(
    nodes: Sequence[ort.NodeArg], unshaped: frozenset[str] = frozenset(), optional: bool = False
) -> tuple[TensorSpec, ...]:
    specs = []
    for node in nodes:
        dims = node.shape or []
        if not dims and node.name in unshaped:  # onnxruntime shows "any rank" as [], like a scalar
            specs.append(TensorSpec(node.name, datatypes.from_onnx(node.type), (-1,), (None,), False, optional))
            continue
        shape = tuple(dim if isinstance(dim, int) and dim >= 0 else -1 for dim in dims)
        symbols = tuple(dim if isinstance(dim, str) and dim else None for dim in dims)
        specs.append(TensorSpec(node.name, datatypes.from_onnx(node.type), shape, symbols, optional=optional))
    return tuple(specs)


@dataclass(eq=False)  # one object per load: statistics are keyed by it
class ModelRuntime:
    """A loaded model version. Thread-safe: onnxruntime sessions take concurrent runs."""

    name: str
    version: int
    path: Path
    session: ort.InferenceSession
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    providers: tuple[str, ...]
    max_batch_size: int = 0  # > 0: the first dimension of every input and output is the batch
    # Classification labels by output name ("" for every output), from the files config.toml names.
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict, repr=False)
    # Outputs the v2 protocol cannot carry (ZipMap's sequence of maps, optional, sequence), by their type.
    unserved_outputs: dict[str, str] = field(default_factory=dict)
    _by_name: dict[str, TensorSpec] = field(default_factory=dict, repr=False)
    _uses_strings: bool = False
    # Each thread's last few IOBindings with every tensor bound by address (see _reused_binding).
    _threads: threading.local = field(default_factory=threading.local, repr=False)

    @classmethod
    def load(cls, name: str, version: int, path: Path, options: ModelOptions) -> ModelRuntime:
        """Build the session; raises with a one-line reason when the file is not a usable ONNX model."""
        session_options = session_options_for(options)
        providers = resolve_providers(options.providers, options.require_gpu)
        try:
            register_custom_ops(
                session_options, options.model_dir, options.custom_op_libraries, options.onnxruntime_extensions, path
            )
            session = ort.InferenceSession(str(path), session_options, providers=providers)
        except Exception as err:  # onnxruntime raises several private exception types for bad files
            reason = str(err).strip().splitlines()[-1] if str(err).strip() else type(err).__name__
            reason = strip_paths(reason)  # callers should not learn the server's paths
            raise Unavailable(f"model {name} version {version} cannot be loaded: {reason}") from None
        used = tuple(session.get_providers())
        if options.require_gpu and not any(p in GPU_PROVIDERS for p in used):
            raise FailedPrecondition(f"model {name} version {version} did not start on a GPU and require_gpu is set")
        unshaped = unshaped_tensors(path)
        graph_outputs, unserved = _served_outputs(name, version, session)
        required = _specs(session.get_inputs(), unshaped)
        # Initializers a request may override come after the inputs it must give.
        inputs = required + _specs(session.get_overridable_initializers(), unshaped, optional=True)
        outputs = _specs(graph_outputs, unshaped)
        model = cls(name, version, path, session, inputs, outputs, used, unserved_outputs=unserved)
        model._by_name = {spec.name: spec for spec in (*model.inputs, *model.outputs)}
        model._uses_strings = any(spec.datatype.variable_size for spec in (*model.inputs, *model.outputs))
        try:
            model.max_batch_size = batching.max_batch_size(name, required, outputs, options.max_batch_size)
            model.labels = model._read_labels(options)
        except EdgecowError as err:
            raise Unavailable(f"model {name} version {version} cannot be loaded: {err.message}") from None
        if options.warmup:
            model.warm_up()
        return model

    def spec(self, name: str) -> TensorSpec | None:
        return self._by_name.get(name)

    def labels_of(self, output: str) -> tuple[str, ...]:
        """The classification labels of `output` (line i names class i); empty when it has none."""
        return self.labels.get(output, self.labels.get("", ()))

    def _read_labels(self, options: ModelOptions) -> dict[str, tuple[str, ...]]:
        labels = {}
        for output, file in options.labels:
            if output and output not in {spec.name for spec in self.outputs}:
                known = ", ".join(spec.name for spec in self.outputs)
                raise InvalidArgument(f"config.toml gives labels for output {output!r}, which the model does not "
                                      f"have; its outputs are: {known}")
            if options.model_dir is None:
                raise InvalidArgument(f"labels file {file!r} has no model directory to be found in")
            labels[output] = read_labels(options.model_dir / file, file)
        return labels

    def output_shape(self, name: str, feeds: Mapping[str, np.ndarray]) -> tuple[int, ...] | None:
        """The shape output `name` will have, when the model's declared shapes tell it before the run:
        fixed dimensions, and named ones ("n") that an input with the same name fixes for this call.
        """
        spec = self._by_name[name]
        bound: dict[str, int] = {}
        for tensor in self.inputs:
            array = feeds.get(tensor.name)
            if array is None or array.ndim != len(tensor.symbols):
                continue
            for symbol, size in zip(tensor.symbols, array.shape):
                if symbol is not None and bound.setdefault(symbol, size) != size:
                    return None  # the inputs disagree on the symbol, so it promises nothing
        shape = []
        for dim, symbol in zip(spec.shape, spec.symbols):
            if dim >= 0:
                shape.append(dim)
            elif symbol is not None and symbol in bound:
                shape.append(bound[symbol])
            else:
                return None
        return tuple(shape)

    def warm_up(self) -> None:
        """One run on zeros (variable dimensions as 1), so the first real call is not the slow one."""
        feeds = {}
        for spec in self.inputs:
            if spec.optional:
                continue
            shape = tuple(1 if dim < 0 else dim for dim in spec.shape)
            if spec.datatype.variable_size:
                feeds[spec.name] = np.full(shape, "", dtype=object)
            else:
                feeds[spec.name] = np.zeros(shape, dtype=datatypes.numpy_dtype(spec.datatype))
        try:
            self.session.run(None, feeds)
        except Exception as err:  # a model may reject zeros; warm-up is only an optimisation
            log.info("warm-up of %s version %d skipped: %s", self.name, self.version, err)

    def bind(
        self,
        feeds: Mapping[str, np.ndarray],
        output_names: Sequence[str],
        out_buffers: Mapping[str, np.ndarray],
    ) -> tuple[ort.IOBinding, list[ort.OrtValue]]:
        """An IOBinding whose inputs are OrtValues over `feeds` and whose outputs named in
        `out_buffers` are the buffers' own memory (no copy on either side).

        Returns the binding and the input OrtValues, which must outlive the run.
        """
        binding = self.session.io_binding()
        keep = []
        for name, array in feeds.items():
            value = ort.OrtValue.ortvalue_from_numpy(array)
            binding.bind_ortvalue_input(name, value)
            keep.append(value)
        for name in output_names:
            buffer = out_buffers.get(name)
            if buffer is None:
                binding.bind_output(name, "cpu")
            else:
                binding.bind_output(name, "cpu", 0, buffer.dtype, list(buffer.shape), buffer.ctypes.data)
        return binding, keep

    def _reused_binding(
        self,
        feeds: Mapping[str, np.ndarray],
        output_names: Sequence[str],
        out_buffers: Mapping[str, np.ndarray],
    ) -> ort.IOBinding | None:
        """A binding of every input and output by address, reused by this thread while a call's buffers
        are those of one of its last few calls: the usual case over shared memory, where a caller's regions
        stay put call after call, and binding costs more than a small model's run. None where the general path is
        needed: an output onnxruntime allocates, an empty or non-contiguous array.

        A binding holds addresses, not arrays, so it keeps no mapping alive; a call binds only buffers
        it holds for its whole run, and the key compares every address, shape and type.
        """
        if len(out_buffers) != len(output_names):
            return None
        arrays = [*feeds.items(), *((name, out_buffers[name]) for name in output_names)]
        for _, array in arrays:
            if not array.size or not array.flags.c_contiguous or array.dtype.kind not in _BINDABLE_KINDS:
                return None
        key = tuple((name, array.ctypes.data, array.shape, array.dtype) for name, array in arrays)
        bindings: dict[tuple[object, ...], ort.IOBinding] | None = getattr(self._threads, "bindings", None)
        if bindings is None:
            bindings = self._threads.bindings = {}
        binding = bindings.get(key)
        if binding is not None:
            return binding
        binding = self.session.io_binding()
        for name, address, shape, dtype in key[: len(feeds)]:
            binding.bind_input(name, "cpu", 0, dtype, list(shape), address)
        for name, address, shape, dtype in key[len(feeds) :]:
            binding.bind_output(name, "cpu", 0, dtype, list(shape), address)
        if len(bindings) >= BINDINGS_PER_THREAD:
            del bindings[next(iter(bindings))]  # the oldest
        bindings[key] = binding
        return binding

    def run(
        self,
        feeds: Mapping[str, np.ndarray],
        output_names: Sequence[str],
        out_buffers: Mapping[str, np.ndarray] | None = None,
        run_options: ort.RunOptions | None = None,
    ) -> dict[str, np.ndarray]:
        """Run the model. Outputs in `out_buffers` are written in place and returned as those same
        arrays; the others are onnxruntime's own arrays (no copy)."""
        out_buffers = out_buffers or {}
        if run_options is None:
            run_options = ort.RunOptions()
        # A rejected run is answered to the caller as a status; onnxruntime need not log it too.
        run_options.log_severity_level = ORT_LOG_FATAL
        # onnxruntime's Python run_with_iobinding looks this entry up on every call and, when it is
        # missing, pays for a C++ exception: about 25 µs, most of a small call. "0" is its default.
        run_options.add_run_config_entry("gpu_graph_id", "0")
        try:
            if self._uses_strings:
                values = self.session.run(list(output_names), _strings_to_text(feeds), run_options)
                results = {name: _text_to_bytes(v) for name, v in zip(output_names, values)}
                for name, buffer in out_buffers.items():
                    results[name] = _copy_into(buffer, results[name], name)
                return results
            reused = self._reused_binding(feeds, output_names, out_buffers)
            binding, _keep = (reused, []) if reused is not None else self.bind(feeds, output_names, out_buffers)
            try:
                self.session.run_with_iobinding(binding, run_options)
            except _ORT_ERRORS:
                if not out_buffers or run_options.terminate:
                    raise
                # A named dimension did not hold what the model declared, so a bound buffer had the
                # wrong shape; run again into onnxruntime's own memory and let the caller copy.
                out_buffers = {}
                binding, _keep = self.bind(feeds, output_names, out_buffers)
                self.session.run_with_iobinding(binding, run_options)
            if len(out_buffers) == len(output_names):
                return {name: out_buffers[name] for name in output_names}
            values = binding.get_outputs()
            return {
                name: out_buffers[name] if name in out_buffers else value.numpy()
                for name, value in zip(output_names, values)
            }
        except _ORT_ERRORS as err:
            if run_options.terminate:
                raise DeadlineExceeded(f"model {self.name} was stopped: the call ran past its deadline") from None
            raise InvalidArgument(f"model {self.name} rejected the inputs: {_short(str(err))}") from None


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~-])/(?:[^/\s'\"()\[\],:;]+/)*([^/\s'\"()\[\],:;]+)")


def strip_paths(message: str) -> str:
    """`message` with every absolute path cut to its last component (onnxruntime names the model file
    and its external-data files by their full path)."""
    return _ABSOLUTE_PATH.sub(r"\1", message)


def _short(message: str) -> str:
    message = message.strip().splitlines()[-1] if message.strip() else message
    return strip_paths(message.split(" : ", 2)[-1] if "ONNXRuntimeError" in message else message)


def _strings_to_text(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """onnxruntime string tensors take str; v2 BYTES arrive as bytes, which must be UTF-8 text."""
    converted = {}
    for name, array in feeds.items():
        if array.dtype != object:
            converted[name] = array
            continue
        flat = array.reshape(-1)
        text = np.empty(flat.shape, dtype=object)
        for i, item in enumerate(flat):
            try:
                text[i] = item.decode("utf-8") if isinstance(item, bytes) else str(item)
            except UnicodeDecodeError:
                raise InvalidArgument(
                    f"input {name!r} element {i} is not valid UTF-8; ONNX string tensors hold text"
                ) from None
        converted[name] = text.reshape(array.shape)
    return converted


def _text_to_bytes(array: np.ndarray) -> np.ndarray:
    return datatypes.to_bytes_array(array) if array.dtype == object else array


def _copy_into(buffer: np.ndarray, value: np.ndarray, name: str) -> np.ndarray:
    if buffer.shape != value.shape or buffer.dtype != value.dtype:
        raise InvalidArgument(f"output {name!r} does not fit the shared-memory slot given for it")
    buffer[...] = value
    return buffer

