"""The `edgecow` command end to end, each run as its own `python -m edge_server` process.

    run_cli("infer", "scale", "--input", f"x={path}", "--output-dir", str(out), "--target", server.unix_target)
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto

from tests.support import models
from tests.support.processes import REPO_ROOT, ServerProcess

pytestmark = pytest.mark.shared_server  # calls only: see tests/conftest.py


def run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edge_server", *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
    )


def _save(path: Path, array: np.ndarray) -> Path:
    np.save(path, array, allow_pickle=array.dtype == object)
    return path


def test_infer_writes_each_output_as_npy(server: ServerProcess, tmp_path: Path) -> None:
    features = np.arange(12, dtype=np.float32).reshape(3, 4)
    ids = np.array([5, -6], np.int64)
    mask = np.array([True, False, True])
    out = tmp_path / "out"
    result = run_cli(
        "infer", "mixed",
        "--input", f"features={_save(tmp_path / 'f.npy', features)}",
        "--input", f"ids={_save(tmp_path / 'i.npy', ids)}",
        "--input", f"mask={_save(tmp_path / 'm.npy', mask)}",
        "--output-dir", str(out), "--target", server.unix_target, "--transport", "grpc",
    )
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["ids_twice.npy", "mask_not.npy", "total.npy"]
    total = np.load(out / "total.npy")
    assert total.dtype == np.float32
    np.testing.assert_array_equal(total, features.sum(axis=1))
    np.testing.assert_array_equal(np.load(out / "ids_twice.npy"), ids * 2)
    np.testing.assert_array_equal(np.load(out / "mask_not.npy"), ~mask)
    assert f"total: float32[3] -> {out / 'total.npy'}" in result.stdout
    assert "(transport: grpc)" in result.stderr


def test_infer_over_tcp_with_version_and_output_selection(server: ServerProcess, tmp_path: Path) -> None:
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    out = tmp_path / "out"
    result = run_cli(
        "infer", "add_sub", "-i", f"a={_save(tmp_path / 'a.npy', a)}", "-i", f"b={_save(tmp_path / 'b.npy', a)}",
        "--output", "sum", "--model-version", "1", "--output-dir", str(out), "--target", server.tcp_target,
    )
    assert result.returncode == 0, result.stderr
    assert [p.name for p in out.iterdir()] == ["sum.npy"]
    np.testing.assert_array_equal(np.load(out / "sum.npy"), a * 2)


def test_infer_without_output_dir_prints_the_values(server: ServerProcess, tmp_path: Path) -> None:
    result = run_cli("infer", "scale", "--input", f"x={_save(tmp_path / 'x.npy', np.array([1.5], np.float32))}",
                     "--target", server.unix_target)
    assert result.returncode == 0, result.stderr
    assert "y: float32[1]" in result.stdout
    assert "[3.]" in result.stdout


def test_infer_of_unknown_model_exits_nonzero_with_the_servers_reason(server: ServerProcess, tmp_path: Path) -> None:
    result = run_cli("infer", "no_such_model", "--input", f"x={_save(tmp_path / 'x.npy', np.ones(1, np.float32))}",
                     "--target", server.unix_target)
    assert result.returncode == 1
    assert result.stderr.startswith("edgecow: error: model 'no_such_model' is not loaded")
    assert "Traceback" not in result.stderr


def test_infer_with_an_unreadable_input_file_says_which_file(server: ServerProcess, tmp_path: Path) -> None:
    bogus = tmp_path / "x.npy"
    bogus.write_text("not numpy")
    result = run_cli("infer", "scale", "--input", f"x={bogus}", "--target", server.unix_target)
    assert result.returncode == 1
    assert f"cannot read {bogus} as a .npy file" in result.stderr
    malformed = run_cli("infer", "scale", "--input", "x", "--target", server.unix_target)
    assert malformed.returncode == 1
    assert "--input 'x' is not NAME=FILE.npy" in malformed.stderr


def test_models_list_from_a_running_server_shows_versions_states_and_tensors(server: ServerProcess) -> None:
    result = run_cli("models", "list", "--target", server.unix_target)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    scale = lines.index(next(line for line in lines if line.split()[:2] == ["scale", "v2"]))
    assert lines[scale].split() == ["scale", "v2", "READY"]
    assert lines[scale + 1].split() == ["input", "x", "FP32", "[-1]"]
    assert lines[scale + 2].split() == ["output", "y", "FP32", "[-1]"]
    as_json = json.loads(run_cli("models", "list", "--target", server.tcp_target, "--json").stdout)
    strings = next(row for row in as_json if row["name"] == "strings")
    assert strings["state"] == "READY"
    assert strings["outputs"] == [{"name": "echo", "datatype": "BYTES", "shape": [-1]},
                                  {"name": "count", "datatype": "INT64", "shape": []}]


def test_models_list_of_a_directory_needs_no_server(tmp_path: Path) -> None:
    root = tmp_path / "models"
    models.write_model(root, "double", 1, models.scale_model(TensorProto.DOUBLE, factor=2.0))
    models.write_model(root, "double", 2, models.scale_model(TensorProto.DOUBLE, factor=3.0))
    (root / "broken" / "1").mkdir(parents=True)
    (root / "broken" / "1" / "model.onnx").write_bytes(b"definitely not protobuf")
    result = run_cli("models", "list", "--model-repository", str(root), "--json")
    assert result.returncode == 0, result.stderr
    rows = {row["name"]: row for row in json.loads(result.stdout)}
    assert rows["double"]["version"] == "2"
    assert rows["double"]["state"] == "READY"
    assert rows["double"]["inputs"] == [{"name": "x", "datatype": "FP64", "shape": [-1]}]
    assert rows["broken"]["state"] == "UNAVAILABLE"
    assert "cannot be loaded" in rows["broken"]["reason"]


def test_models_import_places_the_file_as_the_next_version(tmp_path: Path) -> None:
    root = tmp_path / "models"
    source = tmp_path / "incoming.onnx"
    models.write_model(root, "scale", 1, models.scale_model(factor=1.0))
    models.write_model(tmp_path / "staging", "new", 1, models.scale_model(factor=5.0)).rename(source)
    first = run_cli("models", "import", str(source), "--name", "scale", "--model-repository", str(root))
    assert first.returncode == 0, first.stderr
    assert (root / "scale" / "2" / "model.onnx").read_bytes() == source.read_bytes()
    assert "as scale version 2" in first.stdout
    assert "input  x" in first.stdout and "FP32" in first.stdout
    fresh = run_cli("models", "import", str(source), "--name", "fresh", "--model-repository", str(root))
    assert fresh.returncode == 0, fresh.stderr
    assert (root / "fresh" / "1" / "model.onnx").is_file()
    taken = run_cli("models", "import", str(source), "--name", "fresh", "--version", "1",
                    "--model-repository", str(root))
    assert taken.returncode == 1
    assert "model fresh version 1 already exists" in taken.stderr
    assert not list(root.rglob("*.partial"))


def test_models_import_refuses_a_file_that_is_not_onnx_and_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "models"
    models.write_model(root, "scale", 1, models.scale_model())
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    text = tmp_path / "readme.onnx"
    text.write_text("this is not a model\n")
    result = run_cli("models", "import", str(text), "--name", "scale", "--model-repository", str(root))
    assert result.returncode == 1
    assert result.stderr.startswith("edgecow: error: ")
    assert "cannot be loaded" in result.stderr and str(text) in result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before
    missing = run_cli("models", "import", str(tmp_path / "absent.onnx"), "--name", "x", "--model-repository", str(root))
    assert missing.returncode == 1
    assert "absent.onnx does not exist" in missing.stderr


def test_models_import_refuses_a_bad_model_name(tmp_path: Path) -> None:
    source = models.write_model(tmp_path / "staging", "m", 1, models.identity_model())
    root = tmp_path / "models"
    result = run_cli("models", "import", str(source), "--name", "../escape", "--model-repository", str(root))
    assert result.returncode == 1
    assert "model name '../escape' is not allowed" in result.stderr
    assert not root.exists()


def test_status_prints_providers_resources_and_models(server: ServerProcess) -> None:
    result = run_cli("status", "--target", server.unix_target)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"pid {server.pid}" in out
    assert "CPUExecutionProvider" in out
    assert "RSS " in out and " MiB" in out
    assert "scale:2  on CPUExecutionProvider" in out
    as_json = json.loads(run_cli("status", "--target", server.tcp_target, "--json").stdout)
    assert int(as_json["process"]["rss_bytes"]) > 0
    assert server.tcp_target in as_json["listeners"]


def test_status_without_a_server_fails_cleanly(tmp_path: Path) -> None:
    result = run_cli("status", "--target", f"unix://{tmp_path}/none.sock")
    assert result.returncode == 1
    assert result.stderr.startswith("edgecow: error: ")
    assert "Traceback" not in result.stderr


def test_serve_help_lists_the_flags() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    for flag in ("--model-repository", "--listen", "--socket", "--config", "--poll-interval", "--no-shm"):
        assert flag in result.stdout


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("listen = [\n", "is not valid TOML"),
        ('listn = "127.0.0.1:0"\n', "unknown setting 'listn'"),
        ('workers = "many"\n', "setting 'workers' has a bad value 'many'"),
    ],
    ids=["corrupt", "unknown-key", "bad-value"],
)
def test_serve_with_a_bad_config_file_exits_nonzero_naming_the_file(
    tmp_path: Path, content: str, expected: str
) -> None:
    config = tmp_path / "edgecow.toml"
    config.write_text(content)
    result = run_cli("serve", "--config", str(config), "--socket", str(tmp_path / "s.sock"), "--listen", "none",
                     timeout=60)
    assert result.returncode == 1
    assert str(config) in result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "s.sock").exists()


def test_serve_with_a_missing_repository_exits_nonzero(tmp_path: Path) -> None:
    result = run_cli("serve", "--model-repository", str(tmp_path / "nope"), "--socket", str(tmp_path / "s.sock"),
                     "--listen", "none", timeout=60)
    assert result.returncode == 1
    assert f"model repository {tmp_path / 'nope'} is not a directory" in result.stdout + result.stderr


def test_serve_with_socket_none_listens_on_tcp_only(model_repo: Path, tmp_path: Path) -> None:
    proc = ServerProcess(model_repo, tmp_path, "--socket", "none").start()
    try:
        assert proc.alive(), proc.log
        assert proc.listeners == [proc.tcp_target]
        assert not proc.socket.exists()
        result = run_cli("status", "--target", proc.tcp_target)
        assert result.returncode == 0, result.stderr
    finally:
        proc.stop()


def test_a_reader_that_goes_away_ends_the_listing_quietly(server: ServerProcess) -> None:
    """`edgecow models list | head`: the pipe closes before the listing is written; no traceback."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_server", "models", "list", "--target", server.unix_target],
        cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # before the command has printed anything: it starts in a fraction of a second
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141, err
    assert "Traceback" not in err
