"""Batching models as Triton's onnxruntime backend reports them: ModelConfig.max_batch_size above 0 and
`dims` without the batch dimension, metadata shapes with -1 first; config.toml's max_batch_size decides.

    pytest tests/integration/test_batching_config.py

Read through tritonclient from a real server process; requests past the limit are refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto
from tritonclient.utils import InferenceServerException

from shm_client import EdgeClient, EdgecowError
from tests.support import models
from tests.support.processes import ServerProcess, serving


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batching") / "models"
    models.write_model(root, "images", 1, models.identity_model(TensorProto.FLOAT, ["batch", 3, 4]))
    models.write_model(root, "pairs", 1, models.concat_model())
    models.write_model(root, "wide", 1, models.identity_model(TensorProto.FLOAT, ["batch", 3]),
                       config="max_batch_size = 16\n")
    models.write_model(root, "unbatched", 1, models.identity_model(TensorProto.FLOAT, ["batch", 3]),
                       config="max_batch_size = 0\n")
    models.write_model(root, "lengths", 1, models.identity_model(TensorProto.FLOAT, ["n"]))
    models.write_model(root, "lengths_batched", 1, models.identity_model(TensorProto.FLOAT, ["n"]),
                       config="max_batch_size = 8\n")
    models.write_model(root, "fixed", 1, models.identity_model(TensorProto.FLOAT, [2, 3]))
    models.write_model(root, "fixed_asked", 1, models.identity_model(TensorProto.FLOAT, [2, 3]),
                       config="max_batch_size = 4\n")
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serving(repo, tmp_path_factory.mktemp("srv"))


@pytest.fixture
def triton(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(server.tcp_target)
    yield client
    client.close()


def _config(triton: grpcclient.InferenceServerClient, model: str) -> dict:
    return triton.get_model_config(model, as_json=True)["config"]


def _dims(tensors: list[dict]) -> list[list[int]]:
    return [[int(d) for d in t.get("dims", [])] for t in tensors]


def _infer(triton: grpcclient.InferenceServerClient, model: str, **arrays: np.ndarray) -> grpcclient.InferResult:
    inputs = []
    for name, array in arrays.items():
        tensor = grpcclient.InferInput(name, list(array.shape), "FP32")
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return triton.infer(model, inputs)


def _refused(triton: grpcclient.InferenceServerClient, model: str, **arrays: np.ndarray) -> str:
    with pytest.raises(InferenceServerException) as caught:
        _infer(triton, model, **arrays)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    return caught.value.message()


def test_a_model_with_a_variable_first_dimension_batches_by_default(triton: grpcclient.InferenceServerClient) -> None:
    config = _config(triton, "images")
    assert int(config["max_batch_size"]) == 4  # Triton's default-max-batch-size
    assert _dims(config["input"]) == [[3, 4]] and _dims(config["output"]) == [[3, 4]]
    metadata = triton.get_model_metadata("images", as_json=True)
    assert metadata["inputs"][0]["shape"] == ["-1", "3", "4"]
    assert metadata["outputs"][0]["shape"] == ["-1", "3", "4"]
    x = np.arange(4 * 12, dtype=np.float32).reshape(4, 3, 4)
    assert np.array_equal(_infer(triton, "images", x=x).as_numpy("y"), x)


def test_a_batch_past_max_batch_size_is_refused(
    triton: grpcclient.InferenceServerClient, server: ServerProcess
) -> None:
    message = _refused(triton, "images", x=np.zeros((5, 3, 4), np.float32))
    assert "5" in message and "4" in message and "max_batch_size" in message
    # The same refusal on the shared-memory path.
    with EdgeClient(server.unix_target) as client, pytest.raises(EdgecowError, match="max_batch_size"):
        client.infer("images", {"x": np.zeros((5, 3, 4), np.float32)})
    assert server.alive()


def test_every_input_carries_the_same_batch(triton: grpcclient.InferenceServerClient) -> None:
    config = _config(triton, "pairs")
    assert int(config["max_batch_size"]) == 4
    assert _dims(config["input"]) == [[2], [3]] and _dims(config["output"]) == [[5]]
    left, right = np.ones((3, 2), np.float32), np.zeros((3, 3), np.float32)
    assert _infer(triton, "pairs", left=left, right=right).as_numpy("joined").shape == (3, 5)
    message = _refused(triton, "pairs", left=np.ones((3, 2), np.float32), right=np.zeros((2, 3), np.float32))
    assert "batch size" in message


def test_max_batch_size_from_config_toml(triton: grpcclient.InferenceServerClient) -> None:
    config = _config(triton, "wide")
    assert int(config["max_batch_size"]) == 16 and _dims(config["input"]) == [[3]]
    x = np.arange(48, dtype=np.float32).reshape(16, 3)
    assert np.array_equal(_infer(triton, "wide", x=x).as_numpy("y"), x)
    assert "16" in _refused(triton, "wide", x=np.zeros((17, 3), np.float32))


def test_max_batch_size_zero_turns_batching_off(triton: grpcclient.InferenceServerClient) -> None:
    config = _config(triton, "unbatched")
    assert int(config.get("max_batch_size", 0)) == 0
    assert _dims(config["input"]) == [[-1, 3]] and _dims(config["output"]) == [[-1, 3]]
    x = np.ones((100, 3), np.float32)
    assert np.array_equal(_infer(triton, "unbatched", x=x).as_numpy("y"), x)


def test_a_lone_variable_dimension_batches_only_when_asked(triton: grpcclient.InferenceServerClient) -> None:
    """A model whose only dimension is variable (a length as often as a batch) is not capped at 4."""
    config = _config(triton, "lengths")
    assert int(config.get("max_batch_size", 0)) == 0 and _dims(config["input"]) == [[-1]]
    assert _infer(triton, "lengths", x=np.ones(1000, np.float32)).as_numpy("y").shape == (1000,)
    asked = _config(triton, "lengths_batched")
    assert int(asked["max_batch_size"]) == 8 and _dims(asked["input"]) == [[]]
    assert _infer(triton, "lengths_batched", x=np.ones(8, np.float32)).as_numpy("y").shape == (8,)
    assert "max_batch_size" in _refused(triton, "lengths_batched", x=np.ones(9, np.float32))


def test_a_fixed_shape_model_does_not_batch(triton: grpcclient.InferenceServerClient) -> None:
    config = _config(triton, "fixed")
    assert int(config.get("max_batch_size", 0)) == 0 and _dims(config["input"]) == [[2, 3]]


def test_max_batch_size_on_a_model_that_cannot_batch_is_a_load_error(
    triton: grpcclient.InferenceServerClient, server: ServerProcess
) -> None:
    index = {m["name"]: m for m in triton.get_model_repository_index(as_json=True)["models"]}
    assert index["fixed_asked"]["state"] == "UNAVAILABLE"
    reason = index["fixed_asked"]["reason"]
    assert "max_batch_size = 4" in reason and "'x'" in reason and "[2, 3]" in reason
    assert sum("fixed_asked" in line and "cannot be loaded" in line for line in server.lines) == 1  # logged once


def test_statistics_count_each_inference_of_a_batch(triton: grpcclient.InferenceServerClient) -> None:
    """As in Triton: inference_count grows by the batch size, execution_count by one per request."""

    def counts() -> tuple[int, int]:
        stats = triton.get_inference_statistics("wide", as_json=True)["model_stats"][0]
        return int(stats.get("inference_count", 0)), int(stats.get("execution_count", 0))

    before = counts()
    _infer(triton, "wide", x=np.ones((7, 3), np.float32))
    _infer(triton, "unbatched", x=np.ones((7, 3), np.float32))  # not batching: one inference, whatever its shape
    assert counts() == (before[0] + 7, before[1] + 1)
    unbatched = triton.get_inference_statistics("unbatched", as_json=True)["model_stats"][0]
    assert int(unbatched["inference_count"]) == int(unbatched["execution_count"])
