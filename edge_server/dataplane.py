"""The transport-agnostic core: an InferRequest in, an InferResponse out.

    plane = DataPlane(store, registry, settings)
    response = plane.infer(InferRequest("scale", inputs=[InputTensor("x", "FP32", (4,), raw=data)]), local=True)

It resolves the model, turns every input into an ndarray (a view on the gRPC bytes or on a shared-memory
mapping, never a copy of either), runs onnxruntime, and places each output in the caller's region or
hands it back for the transport to serialise. It never knows which transport a request came on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort

from shm_client.shared import datatypes
from shm_client.shared.errors import (
    DeadlineExceeded,
    EdgecowError,
    InvalidArgument,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)

from .admission import Admission
from .batching import batch_size, check_batch_size
from .classification import check_classifiable, classify
from .config import Settings
from .deadlines import Alarms
from .messages import (
    INT64_MAX,
    InferRequest,
    InferResponse,
    InputTensor,
    OutputTensor,
    RequestedOutput,
    ShmRef,
)
from .regions import Region, RegionRegistry
from .repository import ModelStore
from .runtime import ModelRuntime, TensorSpec
from .statistics import StatisticsBook

log = logging.getLogger(__name__)
ALIGNMENT = 64  # onnxruntime's CPU allocator aligns to 64 bytes
# What the server holds for one BYTES element beside its data, counted against the limits: its slot
# in two object arrays (bytes, then the str onnxruntime takes), the Python bytes and str objects'
# headers, and onnxruntime's std::string. Without it an empty element, 4 bytes on the wire, would
# count as nothing while costing about 100 (a 64 MiB request of empty strings took 4.5 GiB).
BYTES_ELEMENT_COST = 128
# A region by name for one call, held until the call ends (the `region` function DataPlane._run makes).
RegionLookup = Callable[[str], Region]


class DataPlane:
    """Runs inference requests against the model store, with shared memory from the registry."""

    def __init__(self, store: ModelStore, registry: RegionRegistry, settings: Settings) -> None:
        self.store = store
        self.registry = registry
        self.settings = settings
        self.admission = Admission(settings)
        self.statistics = StatisticsBook()
        self._alarms = Alarms()

    # -- inference -------------------------------------------------------------------------------------
    def infer(self, request: InferRequest, local: bool) -> InferResponse:
        """Run one request; raises EdgecowError with the status code for anything the caller got wrong."""
        admission = self.admission
        admission.admit()
        try:
            model = self.store.get(request.model, request.version)
            stats = self.statistics.of(model)
            start = time.monotonic_ns()
            try:
                gate = admission.gate(model.name)
                gate.acquire(request.deadline)
                try:
                    queued = time.monotonic_ns()
                    response, timings = self._run(model, request, local)
                finally:
                    gate.release()
            except EdgecowError as err:
                self.statistics.failure(stats, time.monotonic_ns() - start, err.code.name)
                raise
            self.statistics.success(
                stats, queued - start, timings, time.monotonic_ns() - start, batch_size(model, request.inputs)
            )
            return response
        finally:
            admission.leave()

    def _run(
        self, model: ModelRuntime, request: InferRequest, local: bool
    ) -> tuple[InferResponse, tuple[int, int, int]]:
        uses_shm = any(t.shm for t in request.inputs) or any(o.shm for o in request.outputs)
        if uses_shm and not local and not self.settings.shm_allow_remote:
            raise PermissionDenied("shared memory can only be used by callers on this machine")
        if uses_shm and not self.settings.shm_enabled:
            raise Unavailable("shared memory is disabled on this server; send the tensors in the request")
        t0 = time.monotonic_ns()
        region = HeldRegions(self.registry)
        try:
            checked = request.memo.get(model) if request.memo is not None else None
            if isinstance(checked, _Checked):  # this very request was checked for this model before
                wanted = checked.wanted
                _check_deadline(request, "before its tensors were read")
                _check_no_overlap(request, region)
                feeds = checked.feeds(region)
                out_buffers = self._bound_outputs(model, wanted, feeds, region, checked.output_shapes)
            else:
                # Names first: a request can list any number of tensors, but once each must be one of the
                # model's, at most one per model input and output is left for the region and pairwise work.
                _check_input_names(model, request.inputs)
                check_batch_size(model, request.inputs)
                wanted = self._wanted_outputs(model, request.outputs)
                _check_deadline(request, "before its tensors were read")
                _check_no_overlap(request, region)
                feeds = self._feeds(model, request.inputs, region)
                out_buffers = self._bound_outputs(model, wanted, feeds, region)
                if request.memo is not None:
                    self._remember_checked(model, request, wanted, feeds)
            t1 = time.monotonic_ns()
            results = self._execute(model, feeds, [o.name for o in wanted], out_buffers, request)
            t2 = time.monotonic_ns()
            outputs = [
                _classified(model, o, results[o.name]) if o.classification
                else self._place(model.spec(o.name), o, results[o.name], out_buffers, region)
                for o in wanted
            ]
            del feeds, results, out_buffers
        finally:
            region.release_all()
        t3 = time.monotonic_ns()
        response = InferResponse(model.name, str(model.version), request.id, outputs)
        return response, (t1 - t0, t2 - t1, t3 - t2)

    def _execute(
        self,
        model: ModelRuntime,
        feeds: dict[str, np.ndarray],
        names: list[str],
        out_buffers: dict[str, np.ndarray],
        request: InferRequest,
    ) -> dict[str, np.ndarray]:
        options = ort.RunOptions()
        if request.cancellation is not None:
            # A caller that went away (killed, or gave up) frees its model slot and regions at once.
            request.cancellation.on_cancel(lambda: setattr(options, "terminate", True))
        alarm = None
        if request.deadline is not None:
            if request.deadline <= time.monotonic():
                raise DeadlineExceeded("the call's deadline passed before the model ran")
            alarm = self._alarms.at(request.deadline, lambda: setattr(options, "terminate", True))
        try:
            return model.run(feeds, names, out_buffers, options)
        finally:
            if alarm is not None:
                self._alarms.cancel(alarm)
            if request.cancellation is not None:
                request.cancellation.clear()

    # -- inputs ----------------------------------------------------------------------------------------
    def _feeds(self, model: ModelRuntime, inputs: list[InputTensor], region: RegionLookup) -> dict[str, np.ndarray]:
        feeds: dict[str, np.ndarray] = {}
        held = _HeldBytes(self.settings.max_request_bytes)
        for tensor in inputs:  # names were checked by _check_input_names
            spec = model.spec(tensor.name)
            assert spec is not None
            feeds[tensor.name] = self._input_array(spec, tensor, region, held)
        missing = [s.name for s in model.inputs if not s.optional and s.name not in feeds]
        if missing:
            raise InvalidArgument(f"model {model.name!r} needs input(s) {', '.join(missing)} which the request lacks")
        return feeds

    def _input_array(
        self, spec: TensorSpec, tensor: InputTensor, region: RegionLookup, held: _HeldBytes
    ) -> np.ndarray:
        """The input as an array, after its shape and size are checked against the model and the limits.
        Nothing proportional to its element count is allocated before those checks."""
        what = f"input {tensor.name!r}"
        dt = datatypes.lookup(tensor.datatype)
        if dt.name != spec.datatype.name:
            raise InvalidArgument(f"{what} must be {spec.datatype.name}, not {dt.name}")
        dtype = datatypes.numpy_dtype(dt)
        shape = check_shape(spec, tensor.shape, what, self.settings.max_elements)
        count = datatypes.element_count(shape)
        if not dt.variable_size:
            self._check_tensor_bytes(count * dt.itemsize, what)
        if tensor.contents is not None:
            if tensor.contents.count != count:
                raise InvalidArgument(f"{what} has {tensor.contents.count} values in contents but shape "
                                      f"{list(shape)} needs {count}")
            size = count * dt.itemsize
            if dt.variable_size:
                size = self._bytes_tensor_size(count, tensor.contents.data_bytes, what)
            held.add(size, what)
            return tensor.contents.decode().reshape(shape)
        if tensor.shm is not None:
            ref = tensor.shm
            region_held = region(ref.region)
            if dt.variable_size:
                buffer = region_held.raw(ref.offset, ref.byte_size, what)
                return self._bytes_input(buffer, count, what, held).reshape(shape)
            expected = count * dt.itemsize
            if ref.byte_size != expected:
                raise InvalidArgument(
                    f"{what} has shared_memory_byte_size {ref.byte_size} but shape {list(shape)} of {dt.name} "
                    f"needs {expected} bytes"
                )
            # A view on the caller's mapping: the server holds none of it, so it is not added to `held`.
            return region_held.view(ref.offset, expected, dtype, shape, what)
        if tensor.raw is None:
            if not count:  # typed contents of no values are no field at all on the wire
                return np.empty(shape, dtype=dtype)
            raise InvalidArgument(f"{what} has no data: give contents, a raw entry or a shared-memory region")
        if dt.variable_size:
            return self._bytes_input(tensor.raw, count, what, held).reshape(shape)
        expected = count * dt.itemsize
        if len(tensor.raw) != expected:
            raise InvalidArgument(
                f"{what} has {len(tensor.raw)} raw bytes but shape {list(shape)} of {dt.name} needs {expected}"
            )
        held.add(expected, what)
        array = np.frombuffer(tensor.raw, dtype=dtype, count=count).reshape(shape)
        if array.ctypes.data % ALIGNMENT:
            # A view into the received message sits wherever protobuf framing put it; onnxruntime's kernels
            # take other (numerically different) paths for unaligned data, so it gets its own aligned copy.
            return aligned_copy(array)
        return array

    def _check_tensor_bytes(self, size: int, what: str) -> None:
        if size > self.settings.max_tensor_bytes:
            raise ResourceExhausted(
                f"{what} is {size} bytes; this server takes tensors up to {self.settings.max_tensor_bytes} bytes "
                "(max_tensor_bytes)"
            )

    def _bytes_tensor_size(self, count: int, data_bytes: int, what: str) -> int:
        """What a BYTES tensor of `count` elements holding `data_bytes` costs the server, checked
        against max_tensor_bytes."""
        size = data_bytes + count * BYTES_ELEMENT_COST
        if size > self.settings.max_tensor_bytes:
            raise ResourceExhausted(
                f"{what} takes {size} bytes in the server ({count} BYTES elements at {BYTES_ELEMENT_COST} bytes "
                f"each plus {data_bytes} bytes of data); this server takes tensors up to "
                f"{self.settings.max_tensor_bytes} bytes (max_tensor_bytes)"
            )
        return size

    def _bytes_input(self, buffer: bytes | memoryview, count: int, what: str, held: _HeldBytes) -> np.ndarray:
        """A BYTES tensor in the v2 layout (4-byte length, then the data, per element), decoded once
        its cost is within the limits."""
        try:
            data_bytes = datatypes.bytes_data_size(memoryview(buffer).nbytes, count)
        except InvalidArgument as err:
            raise InvalidArgument(f"{what}: {err.message}") from None
        held.add(self._bytes_tensor_size(count, data_bytes, what), what)
        return _decode_bytes(buffer, count, what)

    # -- outputs ---------------------------------------------------------------------------------------
    def _wanted_outputs(self, model: ModelRuntime, requested: list[RequestedOutput]) -> list[RequestedOutput]:
        if not requested:
            return [RequestedOutput(spec.name) for spec in model.outputs]
        seen = set()
        for output in requested:
            spec = model.spec(output.name)
            if output.name in model.unserved_outputs:
                raise _unserved(model, output.name)
            if spec is None or spec not in model.outputs:
                known = ", ".join(s.name for s in model.outputs)
                raise InvalidArgument(
                    f"model {model.name!r} has no output {output.name!r}; its outputs are: {known}"
                )
            if output.classification:
                check_classifiable(spec.datatype, f"output {output.name!r}")
            if output.name in seen:
                raise InvalidArgument(f"output {output.name!r} is requested more than once")
            seen.add(output.name)
        return requested

    def _bound_outputs(
        self,
        model: ModelRuntime,
        wanted: list[RequestedOutput],
        feeds: dict[str, np.ndarray],
        region: RegionLookup,
        shapes: Mapping[str, tuple[int, ...] | None] | None = None,
    ) -> dict[str, np.ndarray]:
        """Views on the caller's regions for outputs whose shape is known before the run (from `shapes`
        where given, else from the feeds), so that onnxruntime writes there directly."""
        buffers = {}
        for output in wanted:
            if output.shm is None:
                continue
            spec = model.spec(output.name)
            assert spec is not None
            if shapes is not None:
                shape = shapes[output.name]
            else:
                shape = None if spec.datatype.variable_size else model.output_shape(output.name, feeds)
            needed = None if shape is None else datatypes.byte_size(spec.datatype, shape)
            what = f"output {output.name!r}"
            held = region(output.shm.region)
            dtype = datatypes.numpy_dtype(spec.datatype)
            # An unaligned slot cannot be bound: Region.view would hand back a copy and the result would
            # never reach the region. Such outputs (and those of unknown shape) get one copy in _place.
            unaligned = (held.offset + output.shm.offset) % max(dtype.itemsize, 1) != 0
            if shape is None or needed is None or unaligned:
                held.check(output.shm.offset, output.shm.byte_size, what)
                continue
            if output.shm.byte_size < needed:
                raise InvalidArgument(
                    f"{what} needs {needed} bytes but its shared-memory slot has {output.shm.byte_size}"
                )
            buffers[output.name] = held.view(output.shm.offset, needed, dtype, shape, what)
        return buffers

    @staticmethod
    def _remember_checked(
        model: ModelRuntime, request: InferRequest, wanted: list[RequestedOutput], feeds: dict[str, np.ndarray]
    ) -> None:
        """Keep what this request's checks found for `model` in its memo, when every input is a plain view
        on shared memory (BYTES inputs are decoded per call, unaligned ones copied)."""
        assert request.memo is not None
        inputs = []
        for tensor in request.inputs:
            array = feeds[tensor.name]
            if tensor.shm is None or array.dtype == object or tensor.shm.byte_size != array.nbytes:
                return
            inputs.append((tensor.name, tensor.shm, array.dtype, array.shape, f"input {tensor.name!r}"))
        shapes = {o.name: model.output_shape(o.name, feeds) for o in wanted if o.shm is not None}
        for name in shapes:
            spec = model.spec(name)
            if spec is None or spec.datatype.variable_size:
                return
        if len(request.memo) >= _MEMO_MODELS:
            request.memo.clear()  # versions swapped in and out many times
        request.memo[model] = _Checked(wanted, inputs, shapes)

    def _place(
        self,
        spec: TensorSpec | None,
        output: RequestedOutput,
        value: np.ndarray,
        out_buffers: dict[str, np.ndarray],
        region: RegionLookup,
    ) -> OutputTensor:
        assert spec is not None
        shape = tuple(int(d) for d in value.shape)
        result = OutputTensor(output.name, spec.datatype.name, shape, value)
        if output.shm is None:
            return result
        result.array = None
        result.shm = output.shm
        if out_buffers.get(output.name) is value:
            return result  # onnxruntime wrote it in place
        what = f"output {output.name!r}"
        held = region(output.shm.region)
        data = datatypes.encode_bytes(value) if spec.datatype.variable_size else value
        size = len(data) if isinstance(data, bytes) else value.nbytes
        if size > output.shm.byte_size:
            raise InvalidArgument(f"{what} needs {size} bytes but its shared-memory slot has {output.shm.byte_size}")
        target = held.raw(output.shm.offset, size, what)
        target[:] = data if isinstance(data, bytes) else np.ascontiguousarray(value).reshape(-1).view(np.uint8).data
        return result


_MEMO_MODELS = 4  # models (versions) one remembered request keeps checks for


@dataclass
class _Checked:
    """What one request's names, types and shapes were found to mean for one model: the checks that
    depend on nothing else, kept in the request's memo so that a request repeated over the local lane is
    checked once. Regions are looked up, bounds-checked and held per call."""

    wanted: list[RequestedOutput]
    inputs: list[tuple[str, ShmRef, np.dtype, tuple[int, ...], str]]  # name, where, dtype, shape, what
    output_shapes: dict[str, tuple[int, ...] | None]  # of the outputs in shared memory

    def feeds(self, region: RegionLookup) -> dict[str, np.ndarray]:
        return {
            name: region(ref.region).view(ref.offset, ref.byte_size, dtype, shape, what)
            for name, ref, dtype, shape, what in self.inputs
        }


class HeldRegions:
    """The regions one call names, each held from its first use until release_all (a RegionLookup)."""

    def __init__(self, registry: RegionRegistry) -> None:
        self._registry = registry
        self._held: dict[str, Region] = {}

    def __call__(self, name: str) -> Region:
        region = self._held.get(name)
        if region is None:
            region = self._held[name] = self._registry.acquire(name)
        return region

    def release_all(self) -> None:
        """Release every region held; ABORTED (after releasing all) if one shrank during the call."""
        held, self._held = self._held, {}
        failure: EdgecowError | None = None
        for region in held.values():
            try:
                self._registry.release(region)
            except EdgecowError as err:
                failure = failure or err
        if failure is not None:
            raise failure


class _HeldBytes:
    """The bytes the server holds for one request's inputs (the message's raw tensors, decoded contents
    and BYTES elements; not shared-memory views), against max_request_bytes: typed contents and BYTES
    take more room decoded than on the wire, so the message size alone does not bound them."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.total = 0

    def add(self, size: int, what: str) -> None:
        self.total += size
        if self.total > self.limit:
            raise ResourceExhausted(
                f"the request's inputs take {self.total} bytes in the server once {what} is decoded; this server "
                f"takes up to {self.limit} bytes per request (max_request_bytes)"
            )


def _decode_bytes(buffer: bytes | memoryview, count: int, what: str) -> np.ndarray:
    """decode_bytes, with the input's name in the error so a caller with several inputs knows which."""
    try:
        return datatypes.decode_bytes(buffer, count)
    except InvalidArgument as err:
        raise InvalidArgument(f"{what}: {err.message}") from None


def _unserved(model: ModelRuntime, name: str) -> InvalidArgument:
    """The error for a request of an output the v2 protocol cannot carry (a sequence, map or optional)."""
    kind = model.unserved_outputs[name]
    served = ", ".join(spec.name for spec in model.outputs) or "none"
    # skl2onnx's classifiers end in a ZipMap (a sequence of maps) unless converted without it.
    hint = (" (skl2onnx writes probabilities as a ZipMap; convert with options={id(model): {'zipmap': False}} "
            "to get them as a tensor)") if kind.startswith("seq(map(") else ""
    return InvalidArgument(
        f"output {name!r} of model {model.name!r} is {kind}, not a tensor, so the v2 protocol cannot carry it"
        f"{hint}; request its tensor outputs instead: {served}"
    )


def _classified(model: ModelRuntime, output: RequestedOutput, value: np.ndarray) -> OutputTensor:
    """The top `output.classification` entries of `value` as BYTES (see classification.py)."""
    result = classify(value, output.classification, model.max_batch_size > 0, model.labels_of(output.name))
    return OutputTensor(output.name, "BYTES", tuple(result.shape), result)


def _check_input_names(model: ModelRuntime, inputs: list[InputTensor]) -> None:
    """Every input is one of the model's and is given once."""
    seen: set[str] = set()
    for tensor in inputs:
        spec = model.spec(tensor.name)
        if spec is None or spec not in model.inputs:
            known = ", ".join(s.name for s in model.inputs)
            raise InvalidArgument(f"model {model.name!r} has no input {tensor.name!r}; its inputs are: {known}")
        if tensor.name in seen:
            raise InvalidArgument(f"input {tensor.name!r} is given more than once")
        seen.add(tensor.name)


def _check_deadline(request: InferRequest, when: str) -> None:
    if request.deadline is not None and time.monotonic() >= request.deadline:
        raise DeadlineExceeded(f"the call's deadline passed {when}")


@dataclass(frozen=True, order=True)
class _Span:
    """Bytes [start, end) of one object (by device and inode, so two keys or a hard link of one object
    compare equal) that a tensor occupies."""

    identity: tuple[int, int]
    start: int
    end: int
    is_output: bool
    what: str


def _check_no_overlap(request: InferRequest, region: RegionLookup) -> None:
    """Refuse an output slot that shares bytes with an input or another output: onnxruntime would
    overwrite data it has not read yet (or two outputs each other). Inputs may share bytes.

    One sort and one sweep per object: O(n log n) in the number of tensors.
    """
    placed: list[tuple[bool, InputTensor | RequestedOutput, Region]] = []
    for is_output, items in ((False, request.inputs), (True, request.outputs)):
        for item in items:
            if item.shm is not None and item.shm.byte_size:
                placed.append((is_output, item, region(item.shm.region)))
    if len({held.identity for _, _, held in placed}) == len(placed):
        return  # every tensor in an object of its own (the usual case): nothing can overlap
    spans = []
    for is_output, item, held in placed:
        assert item.shm is not None
        start = held.offset + item.shm.offset
        what = f"{'output' if is_output else 'input'} {item.name!r}"
        spans.append(_Span(held.identity, start, start + item.shm.byte_size, is_output, what))
    spans.sort()
    reach: _Span | None = None  # of the spans so far on this object, the one that ends last
    output_reach: _Span | None = None  # the same among outputs
    for span in spans:
        if reach is not None and reach.identity != span.identity:
            reach = output_reach = None
        other = reach if span.is_output else output_reach
        if other is not None and span.start < other.end:
            raise InvalidArgument(
                f"{other.what} and {span.what} overlap in shared memory; give each output its own bytes"
            )
        if reach is None or span.end > reach.end:
            reach = span
        if span.is_output and (output_reach is None or span.end > output_reach.end):
            output_reach = span


def aligned_copy(array: np.ndarray) -> np.ndarray:
    """A copy of `array` whose data starts on an ALIGNMENT boundary, as onnxruntime's own buffers do."""
    raw = np.empty(array.nbytes + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    out = raw[start : start + array.nbytes].view(array.dtype).reshape(array.shape)
    out[...] = array
    return out


def check_shape(spec: TensorSpec, shape: tuple[int, ...], what: str, max_elements: int) -> tuple[int, ...]:
    """`shape` after checking it against the model's spec and the server's element limit."""
    if any(dim < 0 for dim in shape):
        raise InvalidArgument(f"{what} has a negative dimension in shape {list(shape)}")
    if spec.ranked and len(shape) != len(spec.shape):
        raise InvalidArgument(
            f"{what} must have {len(spec.shape)} dimension(s) like {_fmt(spec.shape)}, not shape {list(shape)}"
        )
    for got, want in zip(shape, spec.shape):
        if want >= 0 and got != want:
            raise InvalidArgument(f"{what} must have shape {_fmt(spec.shape)}, not {list(shape)}")
    count = datatypes.element_count(shape)
    if count > INT64_MAX:
        raise InvalidArgument(f"{what} shape {list(shape)} has more elements than fit in 64 bits")
    if count > max_elements:
        raise ResourceExhausted(f"{what} has {count} elements; this server takes at most {max_elements}")
    return shape


def _fmt(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join("-1" if d < 0 else str(d) for d in shape) + "]"

