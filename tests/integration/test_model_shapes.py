"""Models whose inputs are not a fixed list of ranked tensors: inputs of any rank (no shape in the
model), symbolic dimensions, and optional inputs backed by an initializer.

    pytest tests/integration/test_model_shapes.py

Each answer is compared bit for bit with onnxruntime run in this process on the same file.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto
from tritonclient.utils import InferenceServerException

from shm_client import EdgeClient, EdgecowError
from tests.support import models
from tests.support.processes import ServerProcess, serving
from tests.support.triton import triton_client


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shapes") / "models"
    models.write_model(root, "any_rank", 1, models.any_rank_model())
    models.write_model(root, "any_rank_int32", 1, models.any_rank_model(TensorProto.INT32))
    models.write_model(root, "symbolic", 1, models.symbolic_dims_model())
    # Warm-up runs a model once at load; optional inputs are left to their defaults there.
    models.write_model(root, "optional_inputs", 1, models.optional_inputs_model(), config="warmup = true\n")
    models.write_model(root, "detector", 1, models.detector_model(), config="warmup = true\n")
    models.write_model(root, "scalar", 1, models.scale_model(shape=[], factor=4.0))
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serving(repo, tmp_path_factory.mktemp("srv"))


@pytest.fixture
def triton(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    yield from triton_client(server)


def _reference(repo: Path, name: str, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(repo / name / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, feeds)))


def _assert_identical(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> None:
    assert set(got) == set(want)
    for name, expected in want.items():
        assert got[name].shape == expected.shape and got[name].dtype == expected.dtype, name
        assert got[name].tobytes() == expected.tobytes(), name


# -- any rank ------------------------------------------------------------------------------------------
def test_an_input_without_a_shape_is_described_as_any_rank(server: ServerProcess, triton) -> None:
    meta = triton.get_model_metadata("any_rank", as_json=True)
    assert meta["inputs"] == [{"name": "x", "datatype": "FP32", "shape": ["-1"]}]
    assert meta["outputs"] == [{"name": "y", "datatype": "FP32", "shape": ["-1"]}]
    config = triton.get_model_config("any_rank", as_json=True)["config"]
    assert [i["dims"] for i in config["input"]] == [["-1"]]
    assert [o["dims"] for o in config["output"]] == [["-1"]]
    # A real scalar stays a scalar: its shape is [] and only rank 0 is taken.
    scalar = triton.get_model_metadata("scalar", as_json=True)
    assert scalar["inputs"][0].get("shape", []) == []


@pytest.mark.parametrize("transport", ["grpc", "shm"])
@pytest.mark.parametrize("model", ["any_rank", "any_rank_int32"])
def test_an_input_without_a_shape_takes_any_rank(server: ServerProcess, repo: Path, transport: str,
                                                 model: str) -> None:
    dtype = np.float32 if model == "any_rank" else np.int32
    rng = np.random.default_rng(7)
    with EdgeClient(server.unix_target, transport=transport) as client:
        for shape in [(), (5,), (2, 3), (2, 3, 4), (1, 0, 2)]:
            x = np.asarray(rng.standard_normal(shape) * 100, dtype=dtype)
            for _ in range(2):  # over shm the second call has an output slot of the size learned from the first
                _assert_identical(client.infer(model, {"x": x}), _reference(repo, model, {"x": x}))


def test_tritonclient_sends_any_rank(triton: grpcclient.InferenceServerClient, repo: Path) -> None:
    for shape in [(3,), (2, 2), (1, 2, 3)]:
        x = np.arange(np.prod(shape), dtype=np.float32).reshape(shape)
        inp = grpcclient.InferInput("x", list(shape), "FP32")
        inp.set_data_from_numpy(x)
        got = triton.infer("any_rank", [inp]).as_numpy("y")
        assert got.tobytes() == _reference(repo, "any_rank", {"x": x})["y"].tobytes() and got.shape == shape


def test_a_ranked_input_still_refuses_another_rank(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target, transport="grpc") as client:
        with pytest.raises(EdgecowError) as wrong:
            client.infer("scalar", {"x": np.ones(1, np.float32)})
        assert wrong.value.code == grpc.StatusCode.INVALID_ARGUMENT and "0 dimension" in wrong.value.message
        with pytest.raises(EdgecowError) as wrong:
            client.infer("symbolic", {"x": np.ones((2, 4, 1), np.float32)})
        assert wrong.value.code == grpc.StatusCode.INVALID_ARGUMENT and "[-1, 3, -1]" in wrong.value.message


# -- symbolic dimensions -------------------------------------------------------------------------------
def test_symbolic_and_unnamed_dimensions_are_variable(triton: grpcclient.InferenceServerClient, repo: Path,
                                                      server: ServerProcess) -> None:
    meta = triton.get_model_metadata("symbolic", as_json=True)
    assert meta["inputs"][0]["shape"] == ["-1", "3", "-1"]
    assert meta["outputs"][0]["shape"] == ["-1", "3", "-1"]
    config = triton.get_model_config("symbolic", as_json=True)["config"]
    # A batching model's config leaves the batch dimension out of dims, as Triton's does.
    dims = ["3", "-1"] if int(config.get("max_batch_size", 0)) > 0 else ["-1", "3", "-1"]
    assert config["input"][0]["dims"] == dims and config["output"][0]["dims"] == dims
    x = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5)
    with EdgeClient(server.unix_target) as client:
        _assert_identical(client.infer("symbolic", {"x": x}), _reference(repo, "symbolic", {"x": x}))


# -- optional inputs backed by an initializer ------------------------------------------------------------
def test_optional_inputs_are_listed_and_marked_optional(triton: grpcclient.InferenceServerClient) -> None:
    meta = triton.get_model_metadata("optional_inputs", as_json=True)
    assert [(i["name"], i["shape"]) for i in meta["inputs"]] == [("x", ["-1", "4"]), ("scale", ["1"]), ("bias", ["4"])]
    config = triton.get_model_config("optional_inputs", as_json=True)["config"]
    assert {i["name"]: i.get("optional", False) for i in config["input"]} == {"x": False, "scale": True, "bias": True}
    detector = triton.get_model_config("detector", as_json=True)["config"]
    assert [i["name"] for i in detector["input"] if i.get("optional")] == ["threshold"]


@pytest.mark.parametrize("transport", ["grpc", "shm"])
def test_optional_inputs_omitted_or_overridden(server: ServerProcess, repo: Path, transport: str) -> None:
    x = np.random.default_rng(3).standard_normal((3, 4)).astype(np.float32)
    scale = np.array([-1.5], np.float32)
    bias = np.array([1, 2, 3, 4], np.float32)
    cases = [{"x": x}, {"x": x, "scale": scale}, {"x": x, "bias": bias}, {"x": x, "scale": scale, "bias": bias}]
    with EdgeClient(server.unix_target, transport=transport) as client:
        for feeds in cases:
            _assert_identical(client.infer("optional_inputs", feeds), _reference(repo, "optional_inputs", feeds))
        # The default holds again after a call that overrode it.
        _assert_identical(client.infer("optional_inputs", {"x": x}), _reference(repo, "optional_inputs", {"x": x}))
        # The detector's threshold: its default finds two boxes, a lower one finds three.
        feeds = {"boxes": np.arange(12, dtype=np.float32).reshape(4, 3),
                 "scores": np.array([0.9, 0.3, 0.7, 0.1], np.float32), "k": np.array([1], np.int64)}
        assert client.infer("detector", feeds)["kept"].shape == (2, 3)
        lower = {**feeds, "threshold": np.array(0.2, np.float32)}
        _assert_identical(client.infer("detector", lower), _reference(repo, "detector", lower))
        assert client.infer("detector", lower)["kept"].shape == (3, 3)


def test_an_optional_input_is_still_checked(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target, transport="grpc") as client:
        x = np.ones((1, 4), np.float32)
        with pytest.raises(EdgecowError) as wrong:
            client.infer("optional_inputs", {"x": x, "bias": np.ones(3, np.float32)})
        assert wrong.value.code == grpc.StatusCode.INVALID_ARGUMENT and "[4]" in wrong.value.message
        with pytest.raises(EdgecowError) as wrong:
            client.infer("optional_inputs", {"x": x, "scale": np.ones(1, np.float64)})
        assert wrong.value.code == grpc.StatusCode.INVALID_ARGUMENT and "FP32" in wrong.value.message


def test_a_missing_required_input_is_named(server: ServerProcess, triton: grpcclient.InferenceServerClient) -> None:
    with EdgeClient(server.unix_target, transport="grpc") as client:
        with pytest.raises(EdgecowError) as missing:
            client.infer("optional_inputs", {"scale": np.ones(1, np.float32)})
        assert missing.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "x" in missing.value.message and "bias" not in missing.value.message
        with pytest.raises(EdgecowError) as missing:
            client.infer("detector", {"boxes": np.ones((1, 3), np.float32), "threshold": np.array(0.1, np.float32)})
        assert missing.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert "scores, k" in missing.value.message and "threshold" not in missing.value.message
    inp = grpcclient.InferInput("bias", [4], "FP32")
    inp.set_data_from_numpy(np.ones(4, np.float32))
    with pytest.raises(InferenceServerException) as missing:
        triton.infer("optional_inputs", [inp])
    assert missing.value.status() == "StatusCode.INVALID_ARGUMENT" and "'x'" not in missing.value.message()


def test_tritonclient_overrides_an_optional_input(triton: grpcclient.InferenceServerClient, repo: Path) -> None:
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    scale = np.array([0.5], np.float32)
    inputs = [grpcclient.InferInput("x", [2, 4], "FP32"), grpcclient.InferInput("scale", [1], "FP32")]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(scale)
    got = triton.infer("optional_inputs", inputs).as_numpy("y")
    assert got.tobytes() == _reference(repo, "optional_inputs", {"x": x, "scale": scale})["y"].tobytes()
    got = triton.infer("optional_inputs", inputs[:1]).as_numpy("y")
    assert got.tobytes() == _reference(repo, "optional_inputs", {"x": x})["y"].tobytes()
