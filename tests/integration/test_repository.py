"""The model repository on disk as a running server sees it: polling, version policies, atomic swaps.

    proc = ServerProcess(root, tmp_path, "--poll-interval", "0.5").start()
    models.write_model(root, "scale", 3, models.scale_model(factor=3.0))   # served without a restart
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from tests.support import models
from tests.support.gate import Call, Gate
from tests.support.processes import ServerProcess


class Handle:
    """A started server with stubs on its unix socket."""

    def __init__(self, proc: ServerProcess) -> None:
        self.proc = proc
        self.channel = grpc.insecure_channel(proc.unix_target)
        self.stub = pb_grpc.GRPCInferenceServiceStub(self.channel)

    def ready(self, name: str, version: str = "") -> bool:
        return self.stub.ModelReady(pb.ModelReadyRequest(name=name, version=version), timeout=10).ready

    def scale(self, x: np.ndarray, version: str = "", model: str = "scale") -> tuple[str, np.ndarray]:
        message = pb.ModelInferRequest(model_name=model, model_version=version)
        message.inputs.add(name="x", datatype="FP32", shape=list(x.shape))
        message.raw_input_contents.append(x.tobytes())
        response = self.stub.ModelInfer(message, timeout=60)
        return response.model_version, np.frombuffer(response.raw_output_contents[0], "<f4")

    def index(self) -> dict[tuple[str, str], pb.RepositoryIndexResponse.ModelIndex]:
        return {(m.name, m.version): m for m in self.stub.RepositoryIndex(pb.RepositoryIndexRequest()).models}


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Handle]]:
    handles: list[Handle] = []

    def _start(root: Path, *args: str) -> Handle:
        workdir = tmp_path / f"srv{len(handles)}"
        workdir.mkdir()
        handle = Handle(ServerProcess(root, workdir, *args).start())
        handles.append(handle)
        return handle

    yield _start
    for handle in handles:
        handle.channel.close()
        handle.proc.stop()


def _scale_versions(root: Path, factors: dict[int, float], config: str | None = None) -> Path:
    for version, factor in factors.items():
        models.write_model(root, "scale", version, models.scale_model(factor=factor))
    if config is not None:
        (root / "scale" / "config.toml").write_text(config)
    return root


X = np.array([1.0, -2.0, 0.5], np.float32)


def test_new_version_on_disk_is_served_without_a_restart(tmp_path: Path, start, wait_until) -> None:
    root = _scale_versions(tmp_path / "models", {1: 1.0, 2: 2.0})
    server = start(root, "--poll-interval", "0.5")
    assert server.scale(X) == ("2", pytest.approx(X * 2))
    assert not server.ready("scale", "1")  # the default policy serves the latest version only
    models.write_model(root, "scale", 3, models.scale_model(factor=3.0))
    assert wait_until(lambda: server.ready("scale", "3"), timeout=30)
    version, y = server.scale(X)
    assert version == "3"
    np.testing.assert_array_equal(y, X * 3)
    assert wait_until(lambda: not server.ready("scale", "2"), timeout=30)
    assert server.proc.alive()
    assert "loaded model scale version 3" in server.proc.log


def test_removed_version_is_unloaded(tmp_path: Path, start, wait_until) -> None:
    root = _scale_versions(tmp_path / "models", {1: 1.0, 2: 2.0, 3: 3.0}, 'version_policy = "all"\n')
    server = start(root, "--poll-interval", "0.5")
    assert all(server.ready("scale", v) for v in ("1", "2", "3"))
    shutil.rmtree(root / "scale" / "2")
    assert wait_until(lambda: not server.ready("scale", "2"), timeout=30)
    with pytest.raises(grpc.RpcError) as raised:
        server.scale(X, version="2")
    assert raised.value.code() == grpc.StatusCode.NOT_FOUND
    assert "loaded versions: 1, 3" in raised.value.details()
    assert server.scale(X, version="1")[0] == "1"
    assert ("scale", "2") not in server.index()
    shutil.rmtree(root / "scale" / "3")
    assert wait_until(lambda: server.scale(X)[0] == "1", timeout=30)  # the default follows the highest left


def test_removed_model_directory_unloads_the_model(tmp_path: Path, start, wait_until) -> None:
    root = _scale_versions(tmp_path / "models", {1: 1.0})
    models.write_model(root, "other", 1, models.identity_model())
    server = start(root, "--poll-interval", "0.5")
    shutil.rmtree(root / "scale")
    assert wait_until(lambda: not server.ready("scale"), timeout=30)
    assert "scale" not in {name for name, _ in server.index()}
    assert server.ready("other")


def test_new_model_directory_is_loaded_by_polling(tmp_path: Path, start, wait_until) -> None:
    root = _scale_versions(tmp_path / "models", {1: 1.0})
    server = start(root, "--poll-interval", "0.5")
    models.write_model(root, "late", 1, models.scale_model(factor=7.0))
    assert wait_until(lambda: server.ready("late"), timeout=30)
    np.testing.assert_array_equal(server.scale(X, model="late")[1], X * 7)


def test_rewritten_version_file_is_reloaded(tmp_path: Path, start, wait_until) -> None:
    root = _scale_versions(tmp_path / "models", {1: 1.0})
    server = start(root, "--poll-interval", "0.5")
    staged = models.write_model(tmp_path / "staging", "scale", 1, models.scale_model(factor=10.0))
    staged.replace(root / "scale" / "1" / "model.onnx")
    assert wait_until(lambda: server.scale(X)[1][0] == pytest.approx(10.0), timeout=30)


def test_without_polling_changes_on_disk_wait_for_an_explicit_load(tmp_path: Path, start) -> None:
    root = _scale_versions(tmp_path / "models", {1: 1.0})
    server = start(root)
    models.write_model(root, "scale", 2, models.scale_model(factor=2.0))
    assert server.scale(X)[0] == "1"
    server.stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest(model_name="scale"), timeout=30)
    assert server.scale(X) == ("2", pytest.approx(X * 2))


@pytest.mark.parametrize(
    ("config", "served", "default"),
    [
        ("version_policy = { latest = 2 }\n", ["2", "3"], "3"),
        ("[version_policy]\nlatest = 2\n", ["2", "3"], "3"),
        ("[version_policy]\nall = true\n", ["1", "2", "3"], "3"),
        ('version_policy = "all"\n', ["1", "2", "3"], "3"),
        ("[version_policy]\nspecific = [1]\n", ["1"], "1"),
        ("version_policy = { specific = [1, 3, 9] }\n", ["1", "3"], "3"),
        (None, ["3"], "3"),
    ],
    ids=["latest-inline", "latest-table", "all-table", "all-string", "specific-one", "specific-missing", "default"],
)
def test_version_policy_in_config_toml_picks_the_served_versions(
    tmp_path: Path, start, config: str | None, served: list[str], default: str
) -> None:
    root = _scale_versions(tmp_path / "models", {1: 1.0, 2: 2.0, 3: 3.0}, config)
    server = start(root)
    assert [v for v in ("1", "2", "3") if server.ready("scale", v)] == served
    meta = server.stub.ModelMetadata(pb.ModelMetadataRequest(name="scale"), timeout=10)
    assert list(meta.versions) == served
    version, y = server.scale(X)
    assert version == default
    np.testing.assert_array_equal(y, X * float(default))


def test_version_policy_is_reported_in_model_config(tmp_path: Path, start) -> None:
    root = _scale_versions(tmp_path / "models", {1: 1.0, 2: 2.0}, "[version_policy]\nspecific = [1, 2]\n")
    server = start(root)
    config = server.stub.ModelConfig(pb.ModelConfigRequest(name="scale"), timeout=10).config
    assert list(config.version_policy.specific.versions) == [1, 2]


def test_config_toml_broken_while_serving_keeps_the_loaded_versions(tmp_path: Path, start, wait_until) -> None:
    root = _scale_versions(tmp_path / "models", {1: 1.0})
    server = start(root, "--poll-interval", "0.5")
    config = root / "scale" / "config.toml"
    config.write_text("version_policy = 'some'\n")

    def problems() -> list[str]:
        models = server.stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10).models
        return [m.reason for m in models if m.name == "scale" and m.reason]

    assert wait_until(problems, timeout=30)
    assert "scale/config.toml" in problems()[0] and "version_policy must be" in problems()[0]
    assert "still serving" in problems()[0]
    assert server.index()[("scale", "1")].state == "READY"
    assert server.ready("scale", "1")
    assert server.scale(X) == ("1", pytest.approx(X))  # still serving what was loaded
    config.unlink()
    assert wait_until(lambda: not problems(), timeout=30)
    assert server.index()[("scale", "1")].state == "READY"


def test_call_in_flight_on_the_old_version_finishes_across_a_swap(tmp_path: Path, start, wait_until) -> None:
    root = tmp_path / "models"
    models.write_model(root, "gate", 1, models.gate_model())
    server = start(root, "--poll-interval", "0.5")
    with Gate(server.proc.unix_target) as gate:
        call = Call(lambda: server.stub.ModelInfer(gate.request(X), timeout=120))
        try:
            assert wait_until(lambda: gate.in_flight() == 1, timeout=30)
            models.write_model(root, "gate", 2, models.gate_model())
            assert wait_until(lambda: server.ready("gate", "2") and not server.ready("gate", "1"), timeout=30)
            swapped_while_running = call.running()
        finally:
            gate.open()
        response = call.result(120)
        assert response.model_version == "1"
        np.testing.assert_array_equal(np.frombuffer(response.raw_output_contents[0], "<f4"), X)
        assert swapped_while_running, "the call ended before the swap, with its gate still shut"
        assert server.stub.ModelInfer(gate.request(X), timeout=30).model_version == "2"
