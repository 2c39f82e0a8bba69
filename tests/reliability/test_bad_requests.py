"""A table of malformed or hostile requests: each gets its exact status and a message that names the problem,
the server keeps answering, and no registration or segment outlives the case.

    pytest tests/reliability/test_bad_requests.py -k shm_key
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest

from edge_server.grpc_service import is_local_peer
from shm_client.shared._proto import inference_pb2 as pb
from tests.support.gate import Call, Gate
from tests.support.processes import ServerProcess
from tests.support.shm import TEST_PREFIX, make_segment, our_shm_entries
from tests.support.stubs import live, non_loopback_ipv4, registered_names, rpc_error, v2_stub

C = grpc.StatusCode
F32_16 = np.arange(16, dtype=np.float32).reshape(1, 16)
RAW64 = F32_16.tobytes()
REGION = "battery-good"  # registered for the whole module over a 4096-byte segment
REMOTE_ADDRESS = non_loopback_ipv4()


@dataclass
class Env:
    server: ServerProcess
    stub: Any
    remote_stub: Any | None
    segments: dict[str, Any] = field(default_factory=dict)

    @property
    def beacon_key(self) -> str:
        return f"edgecow-srv-{self.server.pid}-beacon"


@dataclass
class Case:
    id: str
    rpc: str
    build: Callable[[Env], Any]
    code: grpc.StatusCode
    words: tuple[str, ...]
    remote: bool = False
    # A context manager around the call: makes what the case needs and removes it afterwards.
    around: Callable[[Env], contextlib.AbstractContextManager[None]] | None = None


# -- request builders --------------------------------------------------------------------------------------
def infer(model: str = "add_sub", inputs: list[tuple] | None = None, raw: list[bytes] | None = None,
          version: str = "", outputs: list[tuple] | None = None, params: dict | None = None) -> pb.ModelInferRequest:
    """inputs: (name, datatype, shape[, params]); raw: the raw_input_contents entries."""
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    if inputs is None:
        inputs = [("a", "FP32", [1, 16]), ("b", "FP32", [1, 16])]
    if raw is None:
        raw = [RAW64] * len(inputs)
    for name, dtype, shape, *rest in inputs:
        tensor = request.inputs.add(name=name, datatype=dtype, shape=shape)
        for key, value in (rest[0] if rest else {}).items():
            _set_param(tensor.parameters[key], value)
    request.raw_input_contents.extend(raw)
    for name, *rest in outputs or []:
        output = request.outputs.add(name=name)
        for key, value in (rest[0] if rest else {}).items():
            _set_param(output.parameters[key], value)
    for key, value in (params or {}).items():
        _set_param(request.parameters[key], value)
    return request


def _set_param(param: pb.InferParameter, value: Any) -> None:
    if isinstance(value, tuple):  # ("uint64_param", 5) and the like pick the oneof member
        setattr(param, value[0], value[1])
    elif isinstance(value, bool):
        param.bool_param = value
    elif isinstance(value, int):
        param.int64_param = value
    elif isinstance(value, float):
        param.double_param = value
    else:
        param.string_param = value


def shm(region: str = REGION, size: Any = 64, offset: Any = None) -> dict:
    params = {"shared_memory_region": region, "shared_memory_byte_size": size}
    if offset is not None:
        params["shared_memory_offset"] = offset
    return params


def shm_inputs(a: dict, b: dict | None = None) -> list[tuple]:
    return [("a", "FP32", [1, 16], a), ("b", "FP32", [1, 16], b or shm(offset=64))]


def contents_input(name: str, dtype: str, shape: list[int], field_name: str, values: list) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=f"identity_{_IDENTITY[dtype]}")
    tensor = request.inputs.add(name=name, datatype=dtype, shape=shape)
    getattr(tensor.contents, field_name).extend(values)
    return request


_IDENTITY = {"FP32": "float", "UINT8": "uint8", "FP16": "float16", "INT32": "int32"}


def register(name: str, key: str, offset: int = 0, byte_size: int = 64) -> pb.SystemSharedMemoryRegisterRequest:
    return pb.SystemSharedMemoryRegisterRequest(name=name, key=key, offset=offset, byte_size=byte_size)


def bytes_elements(*items: bytes) -> bytes:
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


# -- cases that need something made first -------------------------------------------------------------------
@contextlib.contextmanager
def _registered(env: Env, suffix: str, name: str, shrink_to: int | None = None) -> Iterator[None]:
    """A 4096-byte segment registered as `name` (and cut to `shrink_to` bytes afterwards), removed after."""
    segment = make_segment(suffix, 4096)
    env.segments[suffix] = segment
    env.stub.SystemSharedMemoryRegister(register(name, "/" + segment.key, 0, 4096), timeout=10)
    if shrink_to is not None:
        os.ftruncate(segment.fd, shrink_to)
    try:
        yield
    finally:
        env.stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=name))
        segment.close()
        segment.unlink()


def shrunk_region(env: Env) -> contextlib.AbstractContextManager[None]:
    """A region registered at 4096 bytes whose object the client then cuts to 16 bytes."""
    return _registered(env, "shrink", "battery-shrunk", shrink_to=16)


def registered_twice(env: Env) -> contextlib.AbstractContextManager[None]:
    return _registered(env, "dup", "battery-dup")


@contextlib.contextmanager
def spare_segment(env: Env) -> Iterator[None]:
    segment = make_segment("spare", 4096)
    env.segments["spare"] = segment
    try:
        yield
    finally:
        segment.close()
        segment.unlink()


def spare_key(env: Env) -> str:
    return "/" + env.segments["spare"].key


def huge_bytes_tensor() -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="strings")
    request.inputs.add(name="text", datatype="BYTES", shape=[2**31 - 1])
    request.raw_input_contents.append(b"")
    return request


def bytes_tensor(raw: bytes, count: int = 1, **region: Any) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="strings")
    tensor = request.inputs.add(name="text", datatype="BYTES", shape=[count])
    if region:
        for key, value in shm(**region).items():
            _set_param(tensor.parameters[key], value)
    else:
        request.raw_input_contents.append(raw)
    return request


def both_shm_and_contents() -> pb.ModelInferRequest:
    request = infer(inputs=shm_inputs(shm(offset=0)), raw=[])
    request.inputs[0].contents.fp32_contents.extend([1.0] * 16)
    return request


I64_MAX = 2**63 - 1

CASES = [
    # ---- ModelInfer: model, version, names ----
    Case("unknown_model", "ModelInfer", lambda e: infer(model="no_such_model"), C.NOT_FOUND,
         ("no_such_model", "not loaded")),
    Case("unknown_version", "ModelInfer", lambda e: infer(model="scale", version="7", inputs=[("x", "FP32", [4])],
         raw=[bytes(16)]), C.NOT_FOUND, ("no loaded version 7", "1, 2")),
    Case("version_not_a_number", "ModelInfer", lambda e: infer(version="latest"), C.INVALID_ARGUMENT,
         ("'latest'", "positive integer")),
    Case("unknown_input", "ModelInfer", lambda e: infer(inputs=[("a", "FP32", [1, 16]), ("c", "FP32", [1, 16])]),
         C.INVALID_ARGUMENT, ("no input 'c'", "a, b")),
    Case("missing_input", "ModelInfer", lambda e: infer(inputs=[("a", "FP32", [1, 16])], raw=[RAW64]),
         C.INVALID_ARGUMENT, ("needs input", "b")),
    Case("input_twice", "ModelInfer", lambda e: infer(inputs=[("a", "FP32", [1, 16])] * 2), C.INVALID_ARGUMENT,
         ("'a'", "more than once")),
    Case("unknown_output", "ModelInfer", lambda e: infer(outputs=[("product",)]), C.INVALID_ARGUMENT,
         ("no output 'product'", "sum, diff")),
    Case("output_twice", "ModelInfer", lambda e: infer(outputs=[("sum",), ("sum",)]), C.INVALID_ARGUMENT,
         ("'sum'", "more than once")),
    # ---- datatypes, shapes, sizes ----
    Case("wrong_dtype", "ModelInfer", lambda e: infer(inputs=[("a", "INT32", [1, 16]), ("b", "FP32", [1, 16])]),
         C.INVALID_ARGUMENT, ("'a'", "must be FP32", "INT32")),
    Case("unknown_dtype", "ModelInfer", lambda e: infer(inputs=[("a", "FLOAT", [1, 16]), ("b", "FP32", [1, 16])]),
         C.INVALID_ARGUMENT, ("unknown datatype 'FLOAT'",)),
    Case("wrong_rank", "ModelInfer", lambda e: infer(inputs=[("a", "FP32", [16]), ("b", "FP32", [1, 16])]),
         C.INVALID_ARGUMENT, ("'a'", "2 dimension", "[16]")),
    Case("wrong_static_dim", "ModelInfer", lambda e: infer(inputs=[("a", "FP32", [1, 15]), ("b", "FP32", [1, 16])],
         raw=[RAW64[:60], RAW64]), C.INVALID_ARGUMENT, ("'a'", "[1, 16]", "[1, 15]")),
    Case("negative_dim", "ModelInfer", lambda e: infer(model="scale", inputs=[("x", "FP32", [-4])], raw=[b""]),
         C.INVALID_ARGUMENT, ("negative dimension", "[-4]")),
    Case("huge_dim", "ModelInfer", lambda e: infer(model="scale", inputs=[("x", "FP32", [I64_MAX])], raw=[b""]),
         C.RESOURCE_EXHAUSTED, ("elements", "at most")),
    Case("element_count_overflow", "ModelInfer", lambda e: infer(model="mixed", inputs=[
         ("features", "FP32", [2**62, 4]), ("ids", "INT64", [1]), ("mask", "BOOL", [1])], raw=[b"", bytes(8), b"\1"]),
         C.INVALID_ARGUMENT, ("'features'", "64 bits")),
    Case("raw_byte_size_short", "ModelInfer", lambda e: infer(raw=[RAW64[:60], RAW64]), C.INVALID_ARGUMENT,
         ("'a'", "60 raw bytes", "needs 64")),
    Case("raw_byte_size_long", "ModelInfer", lambda e: infer(raw=[RAW64, RAW64 + b"\0"]), C.INVALID_ARGUMENT,
         ("'b'", "65 raw bytes", "needs 64")),
    Case("too_many_raw_entries", "ModelInfer", lambda e: infer(raw=[RAW64] * 3), C.INVALID_ARGUMENT,
         ("3 raw_input_contents", "2 inputs")),
    Case("too_few_raw_entries", "ModelInfer", lambda e: infer(raw=[RAW64]), C.INVALID_ARGUMENT,
         ("1 raw_input_contents", "2 inputs")),
    Case("raw_mixed_with_contents", "ModelInfer",
         lambda e: _with_contents(infer(raw=[RAW64]), 1, "fp32_contents", [1.0] * 16),
         C.INVALID_ARGUMENT, ("mixes raw_input_contents", "typed contents")),
    Case("contents_wrong_field", "ModelInfer", lambda e: contents_input("x", "FP32", [2], "int_contents", [1, 2]),
         C.INVALID_ARGUMENT, ("fp32_contents", "not int_contents")),
    Case("contents_count_mismatch", "ModelInfer",
         lambda e: contents_input("x", "FP32", [3], "fp32_contents", [1.0, 2.0]),
         C.INVALID_ARGUMENT, ("2 values", "needs 3")),
    Case("contents_out_of_range", "ModelInfer", lambda e: contents_input("x", "UINT8", [2], "uint_contents", [1, 300]),
         C.INVALID_ARGUMENT, ("outside the range of UINT8",)),
    Case("contents_for_fp16", "ModelInfer", lambda e: contents_input("x", "FP16", [1], "fp32_contents", [1.0]),
         C.INVALID_ARGUMENT, ("FP16", "no typed contents", "raw bytes")),
    Case("bytes_truncated_prefix", "ModelInfer", lambda e: bytes_tensor(b"\x05\x00"), C.INVALID_ARGUMENT,
         ("BYTES", "truncated", "length prefix")),
    Case("bytes_truncated_payload", "ModelInfer", lambda e: bytes_tensor(b"\x09\x00\x00\x00abc"), C.INVALID_ARGUMENT,
         ("truncated", "claims 9 bytes")),
    Case("bytes_trailing_garbage", "ModelInfer", lambda e: bytes_tensor(bytes_elements(b"ab") + b"zz"),
         C.INVALID_ARGUMENT, ("2 bytes after", "1 elements")),
    Case("bytes_not_utf8", "ModelInfer", lambda e: bytes_tensor(bytes_elements(b"\xff\xfe")), C.INVALID_ARGUMENT,
         ("UTF-8",)),
    Case("bytes_count_far_beyond_data", "ModelInfer", lambda e: huge_bytes_tensor(), C.INVALID_ARGUMENT,
         ("BYTES", "truncated", "2147483647 elements")),
    Case("timeout_not_an_integer", "ModelInfer", lambda e: infer(params={"timeout": "soon"}), C.INVALID_ARGUMENT,
         ("'timeout'", "microseconds")),
    Case("timeout_negative", "ModelInfer", lambda e: infer(params={"timeout": -5}), C.INVALID_ARGUMENT,
         ("'timeout'", "non-negative")),
    # ---- ModelInfer: shared-memory references ----
    Case("shm_unknown_region", "ModelInfer", lambda e: infer(inputs=shm_inputs(shm("battery-nope")), raw=[]),
         C.NOT_FOUND, ("'battery-nope'", "not registered")),
    Case("shm_region_not_a_string", "ModelInfer", lambda e: infer(inputs=shm_inputs(shm(region=7)), raw=[]),
         C.INVALID_ARGUMENT, ("shared_memory_region", "string parameter")),
    Case("shm_size_missing", "ModelInfer",
         lambda e: infer(inputs=shm_inputs({"shared_memory_region": REGION}), raw=[]),
         C.INVALID_ARGUMENT, ("shared_memory_byte_size", "required")),
    Case("shm_offset_without_region", "ModelInfer",
         lambda e: infer(inputs=shm_inputs({"shared_memory_offset": 0}), raw=[]),
         C.INVALID_ARGUMENT, ("no shared_memory_region",)),
    Case("shm_size_is_a_string", "ModelInfer", lambda e: infer(inputs=shm_inputs(shm(size="64")), raw=[]),
         C.INVALID_ARGUMENT, ("shared_memory_byte_size", "integer parameter", "string_param")),
    Case("shm_offset_2_63", "ModelInfer",
         lambda e: infer(inputs=shm_inputs(shm(offset=("uint64_param", 2**63))), raw=[]),
         C.INVALID_ARGUMENT, ("shared_memory_offset", "2^63-1", str(2**63))),
    Case("shm_offset_negative", "ModelInfer", lambda e: infer(inputs=shm_inputs(shm(offset=-64)), raw=[]),
         C.INVALID_ARGUMENT, ("shared_memory_offset", "between 0")),
    Case("shm_offset_plus_size_overflows", "ModelInfer",
         lambda e: infer(inputs=shm_inputs(shm(offset=I64_MAX)), raw=[]),
         C.INVALID_ARGUMENT, (str(I64_MAX), "runs past the end", REGION)),
    Case("shm_slice_past_region_end", "ModelInfer", lambda e: infer(inputs=shm_inputs(shm(offset=4064)), raw=[]),
         C.INVALID_ARGUMENT, ("offset 4064", "4096 bytes")),
    Case("shm_size_does_not_match_shape", "ModelInfer",
         lambda e: infer(inputs=shm_inputs(shm(size=60, offset=0)), raw=[]),
         C.INVALID_ARGUMENT, ("shared_memory_byte_size 60", "needs 64")),
    Case("shm_and_contents_together", "ModelInfer", lambda e: both_shm_and_contents(), C.INVALID_ARGUMENT,
         ("both a shared-memory region and contents",)),
    Case("shm_output_slot_too_small", "ModelInfer",
         lambda e: infer(outputs=[("sum", shm(size=32, offset=128))]), C.INVALID_ARGUMENT,
         ("'sum'", "needs 64 bytes", "has 32")),
    Case("shm_bytes_slot_garbage", "ModelInfer", lambda e: bytes_tensor(b"", 3, region=REGION, size=8, offset=3072),
         C.INVALID_ARGUMENT, ("BYTES", "truncated")),
    Case("shm_region_shrunk_after_register", "ModelInfer",
         lambda e: infer(inputs=shm_inputs(shm("battery-shrunk", offset=0), shm("battery-shrunk", offset=64)),
                         raw=[]),
         C.INVALID_ARGUMENT, ("'battery-shrunk'", "shrank to 16 bytes", "re-register"), around=shrunk_region),
    Case("shm_infer_from_remote_peer", "ModelInfer", lambda e: infer(inputs=shm_inputs(shm(offset=0)), raw=[]),
         C.PERMISSION_DENIED, ("shared memory", "this machine"), remote=True),
    # ---- SystemSharedMemoryRegister / Unregister / Status ----
    Case("key_with_double_slash", "SystemSharedMemoryRegister", lambda e: register("battery-k1", "/a//b"),
         C.INVALID_ARGUMENT, ("key", "'/'")),
    Case("key_with_dotdot_slash", "SystemSharedMemoryRegister", lambda e: register("battery-k2", "/../etc/passwd"),
         C.INVALID_ARGUMENT, ("key", "'/'")),
    Case("key_dotdot", "SystemSharedMemoryRegister", lambda e: register("battery-k3", "/.."), C.INVALID_ARGUMENT,
         ("key", "'..'")),
    Case("key_with_nul", "SystemSharedMemoryRegister", lambda e: register("battery-k4", "/abc\0def"),
         C.INVALID_ARGUMENT, ("key", "control")),
    Case("key_300_characters", "SystemSharedMemoryRegister", lambda e: register("battery-k5", "/" + "k" * 300),
         C.INVALID_ARGUMENT, ("300 characters", "255")),
    Case("key_empty", "SystemSharedMemoryRegister", lambda e: register("battery-k6", "/"), C.INVALID_ARGUMENT,
         ("key is empty",)),
    Case("key_of_server_beacon", "SystemSharedMemoryRegister", lambda e: register("battery-k7", "/" + e.beacon_key),
         C.PERMISSION_DENIED, ("server's own segments",)),
    Case("key_of_other_server_segment", "SystemSharedMemoryRegister",
         lambda e: register("battery-k8", "edgecow-srv-1-beacon"), C.PERMISSION_DENIED, ("server's own segments",)),
    Case("key_does_not_exist", "SystemSharedMemoryRegister",
         lambda e: register("battery-k9", f"/{TEST_PREFIX}missing"), C.NOT_FOUND, ("does not exist",)),
    Case("region_name_empty", "SystemSharedMemoryRegister", lambda e: register("", spare_key(e)),
         C.INVALID_ARGUMENT, ("name is empty",), around=spare_segment),
    Case("region_name_not_printable", "SystemSharedMemoryRegister", lambda e: register("bad\nname", spare_key(e)),
         C.INVALID_ARGUMENT, ("name", "printable"), around=spare_segment),
    Case("byte_size_zero", "SystemSharedMemoryRegister", lambda e: register("battery-z", spare_key(e), 0, 0),
         C.INVALID_ARGUMENT, ("byte_size is 0",), around=spare_segment),
    Case("register_past_object_end", "SystemSharedMemoryRegister",
         lambda e: register("battery-big", spare_key(e), 4000, 200), C.INVALID_ARGUMENT,
         ("4096 bytes", "offset 4000", "byte size 200"), around=spare_segment),
    Case("register_offset_2_63", "SystemSharedMemoryRegister",
         lambda e: register("battery-o", spare_key(e), 2**63, 64), C.INVALID_ARGUMENT,
         ("offset or byte size", "out of range"), around=spare_segment),
    Case("register_offset_plus_size_overflows", "SystemSharedMemoryRegister",
         lambda e: register("battery-o2", spare_key(e), I64_MAX, I64_MAX), C.INVALID_ARGUMENT,
         ("too small", "4096 bytes"), around=spare_segment),
    Case("register_twice", "SystemSharedMemoryRegister",
         lambda e: register("battery-dup", "/" + e.segments["dup"].key, 0, 64), C.ALREADY_EXISTS,
         ("'battery-dup'", "already registered"), around=registered_twice),
    Case("register_from_remote_peer", "SystemSharedMemoryRegister",
         lambda e: register("battery-r", spare_key(e)), C.PERMISSION_DENIED, ("this machine",),
         remote=True, around=spare_segment),
    Case("unregister_from_remote_peer", "SystemSharedMemoryUnregister",
         lambda e: pb.SystemSharedMemoryUnregisterRequest(name=REGION), C.PERMISSION_DENIED, ("this machine",),
         remote=True),
    Case("unregister_all_from_remote_peer", "SystemSharedMemoryUnregister",
         lambda e: pb.SystemSharedMemoryUnregisterRequest(name=""), C.PERMISSION_DENIED, ("this machine",),
         remote=True),
    Case("status_of_unknown_region", "SystemSharedMemoryStatus",
         lambda e: pb.SystemSharedMemoryStatusRequest(name="battery-nope"), C.NOT_FOUND, ("not registered",)),
    Case("cuda_register", "CudaSharedMemoryRegister",
         lambda e: pb.CudaSharedMemoryRegisterRequest(name="gpu", raw_handle=b"x", byte_size=64), C.UNIMPLEMENTED,
         ("CUDA",)),
    # ---- repository and metadata ----
    Case("index_of_other_repository", "RepositoryIndex", lambda e: pb.RepositoryIndexRequest(repository_name="x"),
         C.NOT_FOUND, ("repository 'x'", "leave repository_name empty")),
    Case("load_empty_name", "RepositoryModelLoad", lambda e: pb.RepositoryModelLoadRequest(model_name=""),
         C.INVALID_ARGUMENT, ("model_name is empty",)),
    Case("load_unknown_model", "RepositoryModelLoad", lambda e: pb.RepositoryModelLoadRequest(model_name="nope"),
         C.NOT_FOUND, ("'nope'", "not in the repository")),
    Case("load_path_traversal", "RepositoryModelLoad",
         lambda e: pb.RepositoryModelLoadRequest(model_name="../models/scale"), C.NOT_FOUND,
         ("not in the repository",)),
    Case("load_with_parameters", "RepositoryModelLoad", lambda e: _load_with_parameters(), C.UNIMPLEMENTED,
         ("parameters",)),
    Case("load_from_remote_peer", "RepositoryModelLoad", lambda e: pb.RepositoryModelLoadRequest(model_name="scale"),
         C.PERMISSION_DENIED, ("this machine", "load models"), remote=True),
    Case("unload_empty_name", "RepositoryModelUnload", lambda e: pb.RepositoryModelUnloadRequest(model_name=""),
         C.INVALID_ARGUMENT, ("model_name is empty",)),
    Case("unload_unknown_model", "RepositoryModelUnload", lambda e: pb.RepositoryModelUnloadRequest(model_name="nope"),
         C.NOT_FOUND, ("'nope'", "not loaded")),
    Case("unload_from_remote_peer", "RepositoryModelUnload",
         lambda e: pb.RepositoryModelUnloadRequest(model_name="scale"), C.PERMISSION_DENIED, ("unload models",),
         remote=True),
    Case("metadata_unknown_model", "ModelMetadata", lambda e: pb.ModelMetadataRequest(name="nope"), C.NOT_FOUND,
         ("'nope'",)),
    Case("config_unknown_version", "ModelConfig", lambda e: pb.ModelConfigRequest(name="scale", version="9"),
         C.NOT_FOUND, ("version 9",)),
    Case("statistics_unknown_model", "ModelStatistics", lambda e: pb.ModelStatisticsRequest(name="nope"),
         C.NOT_FOUND, ("'nope'",)),
]


def _with_contents(request: pb.ModelInferRequest, index: int, field_name: str, values: list) -> pb.ModelInferRequest:
    getattr(request.inputs[index].contents, field_name).extend(values)
    return request


def _load_with_parameters() -> pb.RepositoryModelLoadRequest:
    request = pb.RepositoryModelLoadRequest(model_name="scale")
    request.parameters["config"].string_param = "{}"
    return request


def test_the_battery_is_big_enough() -> None:
    assert len(CASES) >= 40
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.fixture(scope="module")
def env(model_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    # TCP on a non-loopback address of this box, so calls there come from a remote peer.
    listen = f"{REMOTE_ADDRESS}:0" if REMOTE_ADDRESS else "127.0.0.1:0"
    server = ServerProcess(model_repo, tmp_path_factory.mktemp("battery"), "--listen", listen).start()
    stub = v2_stub(server.unix_target)
    remote_stub = v2_stub(server.tcp_target) if REMOTE_ADDRESS else None
    segment = make_segment("good", 4096, F32_16.tobytes() * 2)
    stub.SystemSharedMemoryRegister(register(REGION, "/" + segment.key, 0, 4096), timeout=10)
    try:
        yield Env(server, stub, remote_stub)
    finally:
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=""), timeout=10)
        segment.close()
        segment.unlink()
        server.stop()


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_bad_request_is_refused_cleanly(env: Env, case: Case) -> None:
    if case.remote and env.remote_stub is None:
        pytest.skip("this box has no non-loopback address; test_is_local_peer covers the decision")
    names_before = registered_names(env.stub)
    shm_before = our_shm_entries({env.server.pid})
    with case.around(env) if case.around else contextlib.nullcontext():
        stub = env.remote_stub if case.remote else env.stub
        err = rpc_error(lambda: getattr(stub, case.rpc)(case.build(env), timeout=30))
    assert err is not None, f"{case.id}: the server accepted it"
    assert err.code() == case.code, f"{case.id}: {err.code().name}: {err.details()}"
    details = err.details() or ""
    for word in case.words:
        assert word in details, f"{case.id}: {word!r} not in {details!r}"
    assert "/dev/shm" not in details and str(env.server.repo) not in details
    assert live(env.stub)
    assert registered_names(env.stub) == names_before
    assert our_shm_entries({env.server.pid}) == shm_before
    assert env.server.alive()


def test_good_requests_still_work_after_the_battery(env: Env) -> None:
    """The same server, a shm call and a raw call: nothing in the battery broke it."""
    reply = env.stub.ModelInfer(infer(inputs=shm_inputs(shm(offset=0)), raw=[]), timeout=10)
    total = np.frombuffer(reply.raw_output_contents[0], np.float32)
    np.testing.assert_array_equal(total, (F32_16 * 2).ravel())
    reply = env.stub.ModelInfer(infer(), timeout=10)
    np.testing.assert_array_equal(np.frombuffer(reply.raw_output_contents[1], np.float32), np.zeros(16))
    assert "Traceback" not in env.server.log


def test_remote_peer_may_still_infer_without_shm(env: Env) -> None:
    if env.remote_stub is None:
        pytest.skip("this box has no non-loopback address")
    reply = env.remote_stub.ModelInfer(infer(), timeout=10)
    assert np.frombuffer(reply.raw_output_contents[0], np.float32)[3] == 6.0


def test_unregister_during_inference_waits_for_the_call(
    env: Env, segments: Callable[..., Any], wait_until: Callable[..., Any]
) -> None:
    """Unregister of a region a call is reading succeeds at once; the call still gets its data and the
    mapping goes when the call ends."""
    x = np.arange(1024, dtype=np.float32)
    segment = segments("inuse", x.nbytes, x.tobytes())
    env.stub.SystemSharedMemoryRegister(register("battery-inuse", "/" + segment.key, 0, x.nbytes), timeout=10)
    with Gate(env.server.unix_target) as gate:
        request = pb.ModelInferRequest(model_name="gate")
        tensor = request.inputs.add(name="x", datatype="FP32", shape=[1024])
        for key, value in shm("battery-inuse", size=x.nbytes, offset=0).items():
            _set_param(tensor.parameters[key], value)
        call = Call(lambda: env.stub.ModelInfer(gate.add_input(request), timeout=60))
        try:
            assert wait_until(lambda: gate.in_flight() == 1, interval=0.01)
            env.stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="battery-inuse"),
                                                  timeout=10)
            # Listed until the call ends, as in Triton (the shut gate holds the call: it is still running).
            assert "battery-inuse" in registered_names(env.stub)
            assert gate.in_flight() == 1
        finally:
            gate.open()
        reply = call.result(60)
    y = np.frombuffer(reply.raw_output_contents[0], np.float32)
    np.testing.assert_array_equal(y, x)
    assert "battery-inuse" not in registered_names(env.stub)


def test_is_local_peer() -> None:
    """The decision behind every PERMISSION_DENIED above, for peer strings grpc produces."""
    loopback_too = ("unix", "loopback")
    assert is_local_peer("unix:/run/edgecow/edgecow.sock")
    assert is_local_peer("unix-abstract:edgecow")
    assert not is_local_peer("ipv4:127.0.0.1:5000")  # loopback is remote unless the operator opts in
    assert is_local_peer("ipv4:127.0.0.1:5000", loopback_too)
    assert is_local_peer("ipv4:127.8.9.10:1", loopback_too)
    assert is_local_peer("ipv6:[::1]:5000", loopback_too)
    assert is_local_peer("ipv6:[::ffff:127.0.0.1]:5000", loopback_too)
    assert not is_local_peer("ipv4:192.0.2.7:5000", loopback_too)
    assert not is_local_peer("ipv4:10.127.0.1:5000", loopback_too)
    assert not is_local_peer("ipv6:[2001:db8::1]:5000", loopback_too)
    assert not is_local_peer("ipv6:[::ffff:10.0.0.1]:5000", loopback_too)
    assert not is_local_peer("", loopback_too)
    assert not is_local_peer("vsock:3:5000", loopback_too)
