"""Models whose weights live in separate files (external data, torch.onnx.export's default for large
models): `edgecow models import` brings every file the model names, the server loads them, polling
reloads a version whose data file changed, and names that lead outside the model's directory are refused.

    onnx.save_model(model, "net.onnx", save_as_external_data=True, location="net.onnx.data")
    edgecow models import net.onnx --name net     # -> net/1/model.onnx + net/1/net.onnx.data
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edge_server.external_data import external_files
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from tests.support import models
from tests.support.processes import REPO_ROOT, ServerProcess

SIZE = 4096
X = np.linspace(-1.0, 1.0, SIZE, dtype=np.float32)


def weighted_model(offset: float) -> onnx.ModelProto:
    """y = (x + w1) * w2 with two 16 KiB initializers, so both go to external data."""
    w1 = numpy_helper.from_array(np.arange(SIZE, dtype=np.float32) + offset, "w1")
    w2 = numpy_helper.from_array(np.full(SIZE, 0.5, np.float32) + offset, "w2")
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w1"], ["s"]), helper.make_node("Mul", ["s", "w2"], ["y"])],
        "weighted",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SIZE])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [SIZE])],
        initializer=[w1, w2],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", models.OPSET)])
    model.ir_version = models.IR_VERSION
    return model


def save_external(model: onnx.ModelProto, path: Path, location: str | None = "net.onnx.data") -> Path:
    """Save as torch.onnx.export does: the graph in `path`, the weights in `location` beside it (None: one
    file per tensor, named after it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if location is not None:
        (path.parent / location).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, path, save_as_external_data=True, all_tensors_to_one_file=location is not None,
                    location=location, size_threshold=0)
    return path


def relocate(path: Path, location: str) -> None:
    """Point every external tensor of the model at `path` to `location`, leaving the data files alone."""
    model = onnx.load(path, load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, path)


def expected(path: Path) -> np.ndarray:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "edge_server", *args], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120)


def import_model(source: Path, root: Path, name: str = "net") -> subprocess.CompletedProcess[str]:
    return run_cli("models", "import", str(source), "--name", name, "--model-repository", str(root))


def tree(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")) if root.exists() else []


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., pb_grpc.GRPCInferenceServiceStub]]:
    started: list[tuple[ServerProcess, grpc.Channel]] = []

    def _serve(root: Path, *args: str) -> pb_grpc.GRPCInferenceServiceStub:
        workdir = tmp_path / f"srv{len(started)}"
        workdir.mkdir()
        proc = ServerProcess(root, workdir, *args).start()
        channel = grpc.insecure_channel(proc.unix_target)
        started.append((proc, channel))
        return pb_grpc.GRPCInferenceServiceStub(channel)

    yield _serve
    for proc, channel in started:
        channel.close()
        proc.stop()


def infer(stub: pb_grpc.GRPCInferenceServiceStub, model: str = "net") -> np.ndarray:
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[SIZE])
    request.raw_input_contents.append(X.tobytes())
    return np.frombuffer(stub.ModelInfer(request, timeout=60).raw_output_contents[0], np.float32)


@pytest.mark.parametrize(
    "location", ["net.onnx.data", "weights/net.bin", None], ids=["one_file", "subdir", "per_tensor"]
)
def test_import_brings_the_external_data_and_the_server_loads_it(
    tmp_path: Path, location: str | None, serve
) -> None:
    source = save_external(weighted_model(0.0), tmp_path / "export" / "net.onnx", location)
    names = external_files(source)
    assert names == ((location,) if location else ("w1", "w2"))
    root = tmp_path / "models"
    result = import_model(source, root)
    assert result.returncode == 0, result.stderr
    for name in names:
        assert f"external data {name}" in result.stdout
        assert (root / "net" / "1" / name).read_bytes() == (source.parent / name).read_bytes()
    subdirs = ["weights"] if location == "weights/net.bin" else []
    assert tree(root / "net" / "1") == sorted(["model.onnx", *names, *subdirs])
    assert not list(root.rglob("*.partial"))
    shutil.rmtree(tmp_path / "export")  # the repository's copy stands on its own
    stub = serve(root)
    np.testing.assert_array_equal(infer(stub), expected(root / "net" / "1" / "model.onnx"))


def test_polling_reloads_a_version_whose_data_file_changed(tmp_path: Path, serve, wait_until) -> None:
    root = tmp_path / "models"
    assert import_model(save_external(weighted_model(0.0), tmp_path / "v1" / "net.onnx"), root).returncode == 0
    stub = serve(root, "--poll-interval", "0.5")
    first = infer(stub)
    np.testing.assert_array_equal(first, expected(tmp_path / "v1" / "net.onnx"))
    # New weights of the same size in the data file only; model.onnx is untouched.
    staged = save_external(weighted_model(1.0), tmp_path / "v2" / "net.onnx")
    data = root / "net" / "1" / "net.onnx.data"
    assert staged.with_name("net.onnx.data").stat().st_size == data.stat().st_size
    shutil.copyfile(staged.with_name("net.onnx.data"), data.with_name("incoming"))
    os.replace(data.with_name("incoming"), data)
    want = expected(staged)
    assert not np.array_equal(want, first)
    assert wait_until(lambda: np.array_equal(infer(stub), want), timeout=30)


@pytest.mark.parametrize(
    ("prepare", "said"),
    [
        ("absolute", "not a file inside the model's directory"),
        ("climbs_out", "not a file inside the model's directory"),
        ("symlink_out", "symbolic link that leads outside the model's directory"),
        ("missing", "which is not beside it"),
        ("named_model_onnx", "the name the model itself takes"),
    ],
)
def test_import_refuses_external_data_outside_the_models_directory(tmp_path: Path, prepare: str, said: str) -> None:
    outside = tmp_path / "elsewhere"
    source = save_external(weighted_model(0.0), tmp_path / "export" / "net.onnx")
    data = source.with_name("net.onnx.data")
    outside.mkdir()
    if prepare == "absolute":
        shutil.move(data, outside / "net.onnx.data")
        relocate(source, str(outside / "net.onnx.data"))
    elif prepare == "climbs_out":
        shutil.move(data, outside / "net.onnx.data")
        relocate(source, "../elsewhere/net.onnx.data")
    elif prepare == "symlink_out":
        shutil.move(data, outside / "net.onnx.data")
        data.symlink_to(outside / "net.onnx.data")
    elif prepare == "missing":
        data.unlink()
    else:
        data.rename(source.with_name("model.onnx"))
        relocate(source, "model.onnx")
    root = tmp_path / "models"
    models.write_model(root, "other", 1, models.identity_model())
    before = tree(root)
    result = import_model(source, root)
    assert result.returncode == 1
    assert result.stderr.startswith("edgecow: error: ") and said in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert tree(root) == before


def test_a_repository_model_naming_data_outside_its_directory_is_unavailable(tmp_path: Path, serve) -> None:
    root = tmp_path / "models"
    source = save_external(weighted_model(0.0), root / "net" / "1" / "model.onnx")
    shutil.move(source.with_name("net.onnx.data"), root / "net.onnx.data")
    relocate(source, "../net.onnx.data")
    models.write_model(root, "other", 1, models.identity_model())
    stub = serve(root)
    index = {(m.name, m.version): m for m in stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models}
    assert index[("net", "1")].state == "UNAVAILABLE"
    assert index[("net", "1")].reason == (
        "model net version 1 cannot be loaded: the model names external data '../net.onnx.data', which is not a "
        "file inside the model's directory; save it with a location relative to the .onnx file, such as "
        "'model.onnx.data'"
    )
    assert str(tmp_path) not in index[("net", "1")].reason
    assert index[("other", "1")].state == "READY"
