"""Property-based fuzzing of ModelInferRequest and the shared-memory RPCs: a malformed request is the
caller's fault, so the server never answers INTERNAL or UNKNOWN for one, and never dies.

    pytest tests/reliability/test_fuzz.py --hypothesis-show-statistics
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from typing import Any

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared.datatypes import DATATYPES
from tests.support.processes import ServerProcess
from tests.support.shm import TEST_PREFIX, make_segment, our_shm_entries
from tests.support.stubs import registered_names, v2_stub

REGION = "fuzz-region"
REGION_BYTES = 1 << 16
SERVER_FAULTS = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN}
# Not "gate": a gate of 0 holds a worker until the call is cancelled, which is the model working as made.
MODELS = ["scale", "add_sub", "add_sub_int32", "mixed", "strings", "static", "identity_float", "identity_float16",
          "identity_bool", "identity_string", "identity_uint8", "identity_int64", "identity_uint64", "nope", ""]
NAMES = ["x", "a", "b", "text", "features", "ids", "mask", "y", "sum", "diff", "echo", "count", "total"]
SHM_KEYS = ["shared_memory_region", "shared_memory_offset", "shared_memory_byte_size"]
REQUEST_KEYS = ["timeout", "priority", "sequence_id", "sequence_start", "binary_data_output", "triton_x", "headers"]
INT64 = st.integers(-(2**63), 2**63 - 1)
UINT64 = st.integers(0, 2**64 - 1)

texts = st.text(max_size=12)
dims = st.one_of(st.integers(0, 20), st.sampled_from([-1, -(2**63), 2**31, 2**32 + 1, 2**62, 2**63 - 1]), INT64)
parameter_values = st.one_of(
    st.tuples(st.just("bool_param"), st.booleans()),
    st.tuples(st.just("int64_param"), st.one_of(st.integers(-8, REGION_BYTES + 8), INT64)),
    st.tuples(st.just("string_param"), st.one_of(st.just(REGION), texts)),
    st.tuples(st.just("double_param"), st.floats(allow_nan=True)),
    st.tuples(st.just("uint64_param"), st.one_of(st.integers(0, REGION_BYTES + 8), UINT64)),
    st.just(None),  # a parameter with no member of the oneof set
)
parameters = st.dictionaries(st.one_of(st.sampled_from(SHM_KEYS), texts), parameter_values, max_size=4)
contents = st.one_of(
    st.none(),
    st.tuples(st.just("bool_contents"), st.lists(st.booleans(), max_size=8)),
    st.tuples(st.just("int_contents"), st.lists(st.integers(-(2**31), 2**31 - 1), max_size=8)),
    st.tuples(st.just("int64_contents"), st.lists(INT64, max_size=8)),
    st.tuples(st.just("uint_contents"), st.lists(st.integers(0, 2**32 - 1), max_size=8)),
    st.tuples(st.just("uint64_contents"), st.lists(UINT64, max_size=8)),
    st.tuples(st.just("fp32_contents"), st.lists(st.floats(width=32), max_size=8)),
    st.tuples(st.just("fp64_contents"), st.lists(st.floats(), max_size=8)),
    st.tuples(st.just("bytes_contents"), st.lists(st.binary(max_size=8), max_size=8)),
)
input_tensors = st.fixed_dictionaries({
    "name": st.one_of(st.sampled_from(NAMES), texts),
    "datatype": st.one_of(st.sampled_from(list(DATATYPES)), texts),
    "shape": st.lists(dims, max_size=4),
    "parameters": parameters,
    "contents": contents,
})
raw_entries = st.lists(
    st.one_of(st.binary(max_size=64), st.integers(0, 300).map(lambda n: bytes(range(256)) * 2 + bytes(n))),
    max_size=4,
)
requests = st.fixed_dictionaries({
    "model_name": st.one_of(st.sampled_from(MODELS), texts),
    "model_version": st.one_of(st.sampled_from(["", "1", "2", "0", "-1", "99999999999999999999"]), texts),
    "id": texts,
    "inputs": st.lists(input_tensors, max_size=3),
    "outputs": st.lists(st.tuples(st.one_of(st.sampled_from(NAMES), texts), parameters), max_size=3),
    "raw": raw_entries,
    "parameters": st.dictionaries(st.one_of(st.sampled_from(REQUEST_KEYS), texts), parameter_values, max_size=3),
})

# Requests that are nearly right for a real model, so the fuzzing reaches the data paths (raw sizes,
# typed contents, BYTES decoding, shm slices in and out) rather than stopping at the model name.
SPECS = {
    "scale": [("x", "FP32", [-1])],
    "add_sub": [("a", "FP32", [1, 16]), ("b", "FP32", [1, 16])],
    "mixed": [("features", "FP32", [-1, 4]), ("ids", "INT64", [-1]), ("mask", "BOOL", [-1])],
    "strings": [("text", "BYTES", [-1])],
    "identity_uint8": [("x", "UINT8", [-1])],
    "identity_float16": [("x", "FP16", [-1])],
    "static": [("x", "FP32", [4, 256])],
}
OUTPUTS = {"scale": ["y"], "add_sub": ["sum", "diff"], "mixed": ["total", "ids_twice", "mask_not"],
           "strings": ["echo", "count"], "identity_uint8": ["y"], "identity_float16": ["y"], "static": ["y"]}
ITEMSIZE = {"FP32": 4, "INT64": 8, "BOOL": 1, "BYTES": 1, "UINT8": 1, "FP16": 2}
CONTENTS_FIELD = {"FP32": "fp32_contents", "INT64": "int64_contents", "BOOL": "bool_contents",
                  "BYTES": "bytes_contents", "UINT8": "uint_contents", "FP16": "fp32_contents"}


often = st.sampled_from([True] * 5 + [False])  # mostly the right thing, sometimes not


@st.composite
def shm_ref(draw: st.DrawFn, size: int) -> dict[str, tuple[str, Any]]:
    offset = draw(st.one_of(st.integers(0, REGION_BYTES), st.sampled_from([0, 1, 3, 64, REGION_BYTES - size]), INT64))
    byte_size = size if draw(often) else draw(st.one_of(st.integers(0, size + 16), UINT64))
    ref = {"shared_memory_region": ("string_param", REGION if draw(often) else "fuzz-missing")}
    ref["shared_memory_byte_size"] = draw(st.sampled_from(["int64_param", "uint64_param"])), byte_size % 2**63
    if draw(st.booleans()):
        ref["shared_memory_offset"] = "int64_param", max(min(offset, 2**63 - 1), -(2**63))
    return ref


@st.composite
def near_valid_requests(draw: st.DrawFn) -> dict[str, Any]:
    model = draw(st.sampled_from(sorted(SPECS)))
    spec: dict[str, Any] = {"model_name": model, "model_version": "", "id": "", "inputs": [], "outputs": [],
                            "raw": [], "parameters": {}}
    n = draw(st.integers(0, 8))
    how = draw(st.sampled_from(["raw", "contents", "shm"]))
    exact = draw(often)
    for name, datatype, shape in SPECS[model]:
        shape = [n if d < 0 else d for d in shape]
        if not draw(often):
            shape = draw(st.lists(dims, max_size=3))
        count = 1
        for d in shape:
            count *= max(d, 0)
        size = min(count, 1 << 12) * ITEMSIZE[datatype]
        tensor: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape, "parameters": {},
                                  "contents": None}
        if how == "raw" or (how == "contents" and datatype == "FP16"):
            length = size if exact else draw(st.integers(0, size + 8))
            if datatype == "BYTES":
                spec["raw"].append(draw(st.binary(min_size=length, max_size=length + 8)))
            else:
                spec["raw"].append(bytes(length))
        elif how == "contents":
            length = count if exact else draw(st.integers(max(count - 1, 0), count + 1))
            values = draw(st.lists(st.integers(0, 1), min_size=length, max_size=length)) if length <= 64 else []
            field = CONTENTS_FIELD[datatype]
            converted = [bool(v) if field == "bool_contents" else bytes([v]) if field == "bytes_contents"
                         else float(v) if field.startswith("fp") else v for v in values]
            tensor["contents"] = (field, converted)
        else:
            tensor["parameters"] = draw(shm_ref(size))
        spec["inputs"].append(tensor)
    for name in draw(st.lists(st.sampled_from(OUTPUTS[model]), max_size=2, unique=True)):
        spec["outputs"].append((name, draw(shm_ref(64)) if draw(st.booleans()) else {}))
    if not draw(often):
        spec["parameters"]["timeout"] = draw(st.one_of(st.tuples(st.just("uint64_param"), st.integers(0, 10**7)),
                                                        parameter_values)) or ("int64_param", 0)
    return spec


def _set(target: Any, choice: tuple[str, Any] | None) -> None:
    if choice is None:
        target.SetInParent()
    else:
        setattr(target, choice[0], choice[1])


def build(spec: dict[str, Any]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=spec["model_name"], model_version=spec["model_version"], id=spec["id"])
    for tensor_spec in spec["inputs"]:
        tensor = request.inputs.add(name=tensor_spec["name"], datatype=tensor_spec["datatype"],
                                    shape=tensor_spec["shape"])
        for key, value in tensor_spec["parameters"].items():
            _set(tensor.parameters[key], value)
        if tensor_spec["contents"] is not None:
            field, values = tensor_spec["contents"]
            getattr(tensor.contents, field).extend(values)
    for name, params in spec["outputs"]:
        output = request.outputs.add(name=name)
        for key, value in params.items():
            _set(output.parameters[key], value)
    request.raw_input_contents.extend(spec["raw"])
    for key, value in spec["parameters"].items():
        _set(request.parameters[key], value)
    return request


@pytest.fixture(scope="module")
def fuzz_target(server: ServerProcess) -> Iterator[tuple[ServerProcess, Any]]:
    stub = v2_stub(server.unix_target)
    segment = make_segment("fuzz", REGION_BYTES, bytes(range(256)) * (REGION_BYTES // 256))
    stub.SystemSharedMemoryRegister(
        pb.SystemSharedMemoryRegisterRequest(name=REGION, key=segment.key, byte_size=REGION_BYTES), timeout=10
    )
    try:
        yield server, stub
    finally:
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=REGION), timeout=10)
        segment.close()
        segment.unlink()


SEEN: Counter[str] = Counter()  # status codes the fuzzers got, to show they reach past the first check


def _outcome(call: Any) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        assert err.code() not in SERVER_FAULTS, f"{err.code().name}: {err.details()}"
        SEEN[err.code().name] += 1
        return err.code()
    SEEN["OK"] += 1
    return grpc.StatusCode.OK


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=requests)
def test_malformed_infer_requests_never_fault_the_server(fuzz_target: tuple[ServerProcess, Any],
                                                         spec: dict[str, Any]) -> None:
    server, stub = fuzz_target
    _outcome(lambda: stub.ModelInfer(build(spec), timeout=30))
    assert server.alive()


@settings(max_examples=250, deadline=None, suppress_health_check=list(HealthCheck))
@given(spec=near_valid_requests())
def test_nearly_valid_infer_requests_never_fault_the_server(fuzz_target: tuple[ServerProcess, Any],
                                                            spec: dict[str, Any]) -> None:
    server, stub = fuzz_target
    _outcome(lambda: stub.ModelInfer(build(spec), timeout=30))
    assert server.alive()


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(
    name=st.one_of(st.just("fuzz-reg"), texts),
    key=st.one_of(st.sampled_from(["fuzz", "beacon", "/", "//", "/..", "../x", "a\x00b", "k" * 300]), texts),
    offset=st.one_of(st.integers(0, REGION_BYTES + 1), UINT64),
    byte_size=st.one_of(st.integers(0, REGION_BYTES + 1), UINT64),
)
def test_malformed_registrations_never_fault_the_server(
    fuzz_target: tuple[ServerProcess, Any], name: str, key: str, offset: int, byte_size: int
) -> None:
    server, stub = fuzz_target
    key = {"fuzz": f"/{TEST_PREFIX}fuzz", "beacon": f"/edgecow-srv-{server.pid}-beacon"}.get(key, key)
    request = pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset, byte_size=byte_size)
    code = _outcome(lambda: stub.SystemSharedMemoryRegister(request, timeout=30))
    if code == grpc.StatusCode.OK:
        assert key.lstrip("/") == f"{TEST_PREFIX}fuzz" and offset + byte_size <= REGION_BYTES
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=name), timeout=10)
    assert registered_names(stub) == {REGION}


def test_server_is_whole_after_fuzzing(fuzz_target: tuple[ServerProcess, Any]) -> None:
    server, stub = fuzz_target
    assert server.alive() and stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live
    assert registered_names(stub) == {REGION}
    assert f"{TEST_PREFIX}fuzz" in our_shm_entries({server.pid})
    assert "unexpected error" not in server.log and "Traceback" not in server.log
    if sum(SEEN.values()) >= 300:  # the fuzzers above ran in this session
        assert {"OK", "INVALID_ARGUMENT", "NOT_FOUND"} <= set(SEEN), SEEN
    print("fuzz outcomes:", dict(SEEN))
