"""EdgeClient against a real server: gRPC transport explicitly, and the default `auto` for a few.

    with EdgeClient(server.unix_target, transport="grpc") as client:
        client.infer("scale", {"x": np.ones(4, np.float32)})["y"]
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from shm_client import EdgeClient
from shm_client.shared.errors import EdgecowError, InvalidArgument
from tests.support.arrays import random_array
from tests.support.processes import ServerProcess

pytestmark = pytest.mark.shared_server  # calls only: see tests/conftest.py

IDENTITY_DTYPES = {
    "identity_float": "float32",
    "identity_double": "float64",
    "identity_float16": "float16",
    "identity_bool": "bool",
    "identity_int8": "int8",
    "identity_int16": "int16",
    "identity_int32": "int32",
    "identity_int64": "int64",
    "identity_uint8": "uint8",
    "identity_uint16": "uint16",
    "identity_uint32": "uint32",
    "identity_uint64": "uint64",
    "identity_string": "object",
}


@pytest.fixture
def client(server: ServerProcess) -> Iterator[EdgeClient]:
    with EdgeClient(server.unix_target, transport="grpc", timeout=30) as c:
        yield c


def _own_segments() -> set[str]:
    prefix = f"edgecow-cli-{os.getpid()}-"
    return {p.name for p in Path("/dev/shm").iterdir() if p.name.startswith(prefix)}


@pytest.mark.parametrize(("model", "dtype"), IDENTITY_DTYPES.items(), ids=list(IDENTITY_DTYPES))
def test_grpc_infer_round_trips_every_datatype(client: EdgeClient, model: str, dtype: str) -> None:
    data = random_array((6,), dtype, seed=5)
    out = client.infer(model, {"x": data})["y"]
    assert client.transport == "grpc"
    assert out.shape == data.shape
    if dtype == "object":
        assert out.tolist() == data.tolist()
    else:
        assert out.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(out, data)


def test_grpc_infer_with_several_inputs_returns_every_output_by_name(client: EdgeClient) -> None:
    features = random_array((5, 4), "float32", seed=2)
    ids = np.array([3, 0, -9], np.int64)
    mask = np.array([True, True, False, False])
    out = client.infer("mixed", {"features": features, "ids": ids, "mask": mask})
    assert set(out) == {"total", "ids_twice", "mask_not"}
    np.testing.assert_allclose(out["total"], features.sum(axis=1), rtol=1e-6)
    np.testing.assert_array_equal(out["ids_twice"], ids * 2)
    np.testing.assert_array_equal(out["mask_not"], ~mask)


def test_asking_for_one_output_returns_just_that_one(client: EdgeClient) -> None:
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    out = client.infer("add_sub", {"a": a, "b": np.ones_like(a)}, outputs=["diff"])
    assert list(out) == ["diff"]
    np.testing.assert_array_equal(out["diff"], a - 1)


def test_python_strings_and_lists_are_sent_as_bytes(client: EdgeClient) -> None:
    out = client.infer("strings", {"text": ["naïve", "", "x"]})
    assert out["echo"].tolist() == ["naïve".encode(), b"", b"x"]
    assert int(out["count"]) == 3


def test_models_lists_every_model_with_version_and_state(client: EdgeClient) -> None:
    rows = {(m["name"], m["version"]): m for m in client.models()}
    assert rows[("scale", "2")]["state"] == "READY"
    assert rows[("identity_string", "1")] == {
        "name": "identity_string", "version": "1", "state": "READY", "reason": "",
    }
    assert rows[("scale", "1")]["state"] == "READY"  # scale/config.toml serves every version


def test_metadata_describes_inputs_and_outputs(client: EdgeClient) -> None:
    meta = client.metadata("add_sub")
    assert meta["name"] == "add_sub"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [
        {"name": "a", "datatype": "FP32", "shape": [1, 16]},
        {"name": "b", "datatype": "FP32", "shape": [1, 16]},
    ]
    assert [o["name"] for o in meta["outputs"]] == ["sum", "diff"]
    assert client.metadata("strings", version=1)["inputs"] == [{"name": "text", "datatype": "BYTES", "shape": [-1]}]


def test_ready_is_true_for_served_models_and_false_for_unknown_ones(client: EdgeClient) -> None:
    assert client.ready()
    assert client.ready("scale")
    assert client.ready("scale", "2")
    assert not client.ready("scale", "5")
    assert not client.ready("no_such_model")


def test_ready_is_false_when_no_server_listens(tmp_path: Path) -> None:
    with EdgeClient(f"unix://{tmp_path}/nothing.sock", transport="grpc", timeout=5) as client:
        assert not client.ready()


def test_unknown_model_raises_edgecow_error_with_not_found(client: EdgeClient) -> None:
    with pytest.raises(EdgecowError) as raised:
        client.infer("no_such_model", {"x": np.ones(2, np.float32)})
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert "no_such_model" in raised.value.message
    with pytest.raises(EdgecowError) as raised:
        client.metadata("no_such_model")
    assert raised.value.code == grpc.StatusCode.NOT_FOUND
    assert client.ready()


def test_wrong_dtype_raises_invalid_argument_naming_the_input(client: EdgeClient) -> None:
    with pytest.raises(EdgecowError) as raised:
        client.infer("scale", {"x": np.ones(2, np.float64)})
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "'x'" in raised.value.message and "FP32" in raised.value.message and "FP64" in raised.value.message


def test_array_without_a_v2_datatype_is_refused_before_sending(client: EdgeClient) -> None:
    with pytest.raises(InvalidArgument, match="input 'x' has dtype complex64"):
        client.infer("scale", {"x": np.ones(2, np.complex64)})


def test_unknown_transport_name_is_refused() -> None:
    with pytest.raises(ValueError, match="transport must be one of"):
        EdgeClient("localhost:1", transport="carrier-pigeon")


@pytest.mark.parametrize("transport", ["grpc", "auto"])
def test_version_selection_defaults_to_highest_and_honours_the_asked_version(
    server: ServerProcess, transport: str
) -> None:
    x = np.array([1.5, -2.0, 4.0], np.float32)
    with EdgeClient(server.unix_target, transport=transport, timeout=30) as client:
        np.testing.assert_array_equal(client.infer("scale", {"x": x})["y"], x * 2)
        np.testing.assert_array_equal(client.infer("scale", {"x": x}, version=1)["y"], x)
        np.testing.assert_array_equal(client.infer("scale", {"x": x}, version="2")["y"], x * 2)
        assert client.metadata("scale")["versions"] == ["1", "2"]
        assert client.ready("scale", "1")
        with pytest.raises(EdgecowError) as raised:
            client.infer("scale", {"x": x}, version=3)
        assert raised.value.code == grpc.StatusCode.NOT_FOUND
        assert "loaded versions: 1, 2" in raised.value.message


def test_auto_transport_gives_the_same_results_as_grpc(server: ServerProcess) -> None:
    features = random_array((4, 4), "float32", seed=9)
    inputs = {"features": features, "ids": np.arange(4, dtype=np.int64), "mask": np.array([True, False])}
    with EdgeClient(server.unix_target, transport="grpc") as plain, EdgeClient(server.unix_target) as auto:
        expected = plain.infer("mixed", inputs)
        for _ in range(2):  # the second call reuses pooled segments and learned output sizes
            got = auto.infer("mixed", inputs)
            assert set(got) == set(expected)
            for name in expected:
                np.testing.assert_array_equal(got[name], expected[name])
        text = auto.infer("strings", {"text": ["a", "bc"]})
        assert text["echo"].tolist() == [b"a", b"bc"]
        assert auto.transport in ("shm", "grpc")


def test_context_manager_closes_the_channel_and_removes_its_segments(server: ServerProcess) -> None:
    before = _own_segments()
    with EdgeClient(server.unix_target) as client:
        np.testing.assert_array_equal(client.infer("static", {"x": np.ones((4, 256), np.float32)})["y"], 3.0)
    assert _own_segments() == before
    with pytest.raises(EdgecowError, match="closed") as err:
        client.infer("static", {"x": np.ones((4, 256), np.float32)})
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert client.ready() is False
    client.close()  # a second close is harmless


def test_edgecow_target_environment_variable_is_used_when_no_target_is_given(
    server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EDGECOW_TARGET", server.unix_target)
    with EdgeClient(transport="grpc") as client:
        assert client.target == f"unix:{server.socket}"
        np.testing.assert_array_equal(client.infer("scale", {"x": np.array([2.0], np.float32)})["y"], [4.0])
    monkeypatch.setenv("EDGECOW_TARGET", f"grpc://{server.tcp_target}")
    with EdgeClient() as client:
        assert client.target == server.tcp_target
        assert client.ready("strings")


def test_explicit_target_wins_over_the_environment(server: ServerProcess, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGECOW_TARGET", "unix:///nonexistent/edgecow.sock")
    with EdgeClient(server.tcp_target, transport="grpc") as client:
        assert client.target == server.tcp_target
        assert client.ready()
