"""examples/node/client.js, a Node.js client that loads proto/ directly with @grpc/proto-loader, against a
real edgecow server on a loopback TCP port: the grpc.health.v1 check, ServerLive/ServerReady, ModelMetadata
and a ModelInfer with raw little-endian FP32 tensors, for models and sizes the example has never seen.

`node` and `npm` come from the distribution's packages (.ci/run installs them); the example's packages are
installed with `npm ci` from its committed package-lock.json when its node_modules is missing.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from onnx import TensorProto

from tests.support.models import add_sub_model, identity_model, scale_model, write_model
from tests.support.processes import ServerProcess

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "node"


@pytest.fixture(scope="module")
def node() -> str:
    binary, npm = shutil.which("node"), shutil.which("npm")
    if binary is None or npm is None:
        pytest.skip("node and npm are not installed (.ci/run installs Debian's nodejs and npm packages)")
    if not (EXAMPLE / "node_modules" / "@grpc" / "grpc-js").is_dir():
        installed = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=EXAMPLE, capture_output=True,
                                   text=True, timeout=600)
        if installed.returncode != 0:
            lines = (installed.stderr or installed.stdout).strip().splitlines()
            pytest.skip(f"npm ci could not install the example's packages: {lines[-1] if lines else '?'}")
    return binary


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("node-example")
    repo = root / "models"
    write_model(repo, "echo_vector", 1, identity_model(TensorProto.FLOAT, ["n"]))
    write_model(repo, "pair_math", 3, add_sub_model(TensorProto.FLOAT, [2, 3, 5]))
    write_model(repo, "tripled", 1, scale_model(TensorProto.FLOAT, ["batch", 7], factor=3.0))
    write_model(repo, "count_ids", 1, identity_model(TensorProto.INT64, ["n"]))
    with ServerProcess(repo, root) as process:
        yield process


def run_example(node: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([node, str(EXAMPLE / "client.js"), *args], capture_output=True, text=True, timeout=120)


def report(node: str, server: ServerProcess, model: str, count: int) -> dict[str, Any]:
    done = run_example(node, "--target", server.tcp_target, "--model", model, "--count", str(count), "--json")
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout)
    assert result["health"] == "SERVING"
    assert result["live"] is True and result["ready"] is True
    return result


def arrays(tensors: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    return {t["name"]: np.asarray(t["values"], np.float32).reshape(t["shape"]) for t in tensors}


@pytest.mark.parametrize("count", [1, 3, 1001])
def test_identity_round_trips_raw_fp32_of_odd_sizes(node: str, server: ServerProcess, count: int) -> None:
    result = report(node, server, "echo_vector", count)
    assert result["metadata"]["inputs"] == [{"name": "x", "datatype": "FP32", "shape": [-1]}]
    assert result["metadata"]["outputs"] == [{"name": "y", "datatype": "FP32", "shape": [-1]}]
    (output,) = result["outputs"]
    assert output["shape"] == [count] and output["datatype"] == "FP32"
    np.testing.assert_array_equal(arrays(result["outputs"])["y"], arrays(result["inputs"])["x"])


def test_two_inputs_two_outputs_with_fixed_multi_dim_shapes(node: str, server: ServerProcess) -> None:
    result = report(node, server, "pair_math", 4)
    assert result["metadata"]["versions"] == ["3"]
    assert [t["shape"] for t in result["metadata"]["inputs"]] == [[2, 3, 5], [2, 3, 5]]
    given, got = arrays(result["inputs"]), arrays(result["outputs"])
    assert not np.array_equal(given["a"], given["b"])
    np.testing.assert_array_equal(got["sum"], given["a"] + given["b"])
    np.testing.assert_array_equal(got["diff"], given["a"] - given["b"])


def test_variable_batch_with_a_fixed_inner_dimension(node: str, server: ServerProcess) -> None:
    result = report(node, server, "tripled", 3)
    assert result["metadata"]["inputs"][0]["shape"] == [-1, 7]
    got = arrays(result["outputs"])["y"]
    assert got.shape == (3, 7)
    np.testing.assert_array_equal(got, arrays(result["inputs"])["x"] * np.float32(3.0))


def test_human_output_names_the_health_metadata_and_tensors(node: str, server: ServerProcess) -> None:
    done = run_example(node, "--target", server.tcp_target, "--model", "echo_vector", "--count", "2")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == f"health SERVING, live true, ready true at {server.tcp_target}"
    assert "model echo_vector versions [1] platform onnxruntime_onnx" in lines
    assert "out y FP32[2] = -0.25 0" in lines


def test_errors_are_one_line_with_the_status(node: str, server: ServerProcess) -> None:
    unknown = run_example(node, "--target", server.tcp_target, "--model", "no_such_model")
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr and "no_such_model" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1
    other_type = run_example(node, "--target", server.tcp_target, "--model", "count_ids")
    assert other_type.returncode == 1
    assert "FP32 only" in other_type.stderr and "INT64" in other_type.stderr
