"""Custom operators: onnxruntime-extensions registered for models that use its `ai.onnx.contrib` domain,
and libraries named in config.toml's custom_op_libraries, with a clear load error for each way it fails.

    pytest tests/integration/test_custom_ops.py

The extensions' own library stands in for a user's custom-op library: it is a real one, built for this
onnxruntime. A broken or missing one shows in RepositoryIndex with its reason; the server keeps serving.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from edge_server.custom_ops import extensions_library
from shm_client import EdgeClient
from tests.support import models
from tests.support.processes import REPO_ROOT, ServerProcess, serving
from tests.support.triton import triton_client

TEXT = np.array([b"hello  wide world", b"edge cow", "d\u00e9j\u00e0 vu".encode()], dtype=object)


def _model(root: Path, name: str, config: str | None = None) -> Path:
    models.write_model(root, name, 1, models.contrib_strings_model(), config=config)
    return root / name


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("custom_ops") / "models"
    _model(root, "strings_auto")
    _model(root, "strings_off", config="onnxruntime_extensions = false\n")
    library = Path(extensions_library())
    # Without onnxruntime_extensions: a model with libraries of its own gets no extensions added.
    own = _model(root, "strings_own_library", config='custom_op_libraries = ["lib/libmyops.so"]\n')
    (own / "lib").mkdir()
    shutil.copyfile(library, own / "lib" / "libmyops.so")
    linked = _model(root, "strings_linked_library",
                    config='onnxruntime_extensions = false\ncustom_op_libraries = ["libmyops.so"]\n')
    (linked / "libmyops.so").symlink_to(library)  # placed by the repository's owner: may point anywhere
    _model(root, "library_missing", config='custom_op_libraries = ["libgone.so"]\n')
    broken = _model(root, "library_broken", config='custom_op_libraries = ["libbroken.so"]\n')
    (broken / "libbroken.so").write_bytes(b"not an ELF file")
    _model(root, "library_outside", config='custom_op_libraries = ["../strings_own_library/lib/libmyops.so"]\n')
    models.write_model(root, "plain", 1, models.scale_model(factor=2.0))
    models.write_model(root, "plain_forced", 1, models.scale_model(factor=2.0),
                       config="onnxruntime_extensions = true\n")
    return root


@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    yield from serving(repo, tmp_path_factory.mktemp("srv"))


@pytest.fixture
def triton(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    yield from triton_client(server)


def _index(triton: grpcclient.InferenceServerClient) -> dict[str, dict]:
    return {m["name"]: m for m in triton.get_model_repository_index(as_json=True)["models"]}


def _strings(triton: grpcclient.InferenceServerClient, model: str) -> tuple[list[bytes], list[bytes]]:
    tensor = grpcclient.InferInput("text", [len(TEXT)], "BYTES")
    tensor.set_data_from_numpy(TEXT)
    result = triton.infer(model, [tensor])
    return list(result.as_numpy("shout")), list(result.as_numpy("dashed"))


def test_a_model_using_extensions_operators_loads_and_serves(triton: grpcclient.InferenceServerClient) -> None:
    shout, dashed = _strings(triton, "strings_auto")
    assert shout == [b"HELLO  WIDE WORLD", b"EDGE COW", "D\u00e9J\u00e0 VU".encode()]  # ASCII letters only
    assert dashed == [b"hello-wide-world", b"edge-cow", "d\u00e9j\u00e0-vu".encode()]


def test_extensions_operators_over_shared_memory(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target) as client:
        assert client.transport == "shm"
        result = client.infer("strings_auto", {"text": TEXT})
    assert list(result["shout"])[1] == b"EDGE COW"


def test_turning_extensions_off_leaves_the_operators_unknown(triton: grpcclient.InferenceServerClient) -> None:
    entry = _index(triton)["strings_off"]
    assert entry["state"] == "UNAVAILABLE"
    assert "StringUpper" in entry["reason"] or "StringRegexReplace" in entry["reason"]


@pytest.mark.parametrize("model", ["strings_own_library", "strings_linked_library"])
def test_a_library_named_in_config_toml_is_registered(triton: grpcclient.InferenceServerClient, model: str) -> None:
    assert _index(triton)[model]["state"] == "READY"
    shout, _ = _strings(triton, model)
    assert shout[1] == b"EDGE COW"


def test_a_missing_library_is_a_load_error_that_names_it(triton: grpcclient.InferenceServerClient) -> None:
    entry = _index(triton)["library_missing"]
    assert entry["state"] == "UNAVAILABLE"
    assert "'libgone.so'" in entry["reason"] and "custom_op_libraries" in entry["reason"]


def test_a_library_that_cannot_load_is_a_load_error(triton: grpcclient.InferenceServerClient, repo: Path) -> None:
    entry = _index(triton)["library_broken"]
    assert entry["state"] == "UNAVAILABLE"
    assert "'libbroken.so'" in entry["reason"] and "could not be loaded" in entry["reason"]
    assert str(repo) not in entry["reason"]  # the server's paths stay on the server


def test_a_library_outside_the_model_directory_is_refused(triton: grpcclient.InferenceServerClient) -> None:
    entry = _index(triton)["library_outside"]
    assert entry["state"] == "UNAVAILABLE"
    assert "library_outside/config.toml" in entry["reason"] and "inside the model's directory" in entry["reason"]


@pytest.mark.parametrize("model", ["plain", "plain_forced"])
def test_models_without_custom_operators_are_unaffected(triton: grpcclient.InferenceServerClient, model: str) -> None:
    tensor = grpcclient.InferInput("x", [3], "FP32")
    tensor.set_data_from_numpy(np.array([1, 2, 3], np.float32))
    assert list(triton.infer(model, [tensor]).as_numpy("y")) == [2, 4, 6]


def test_without_the_package_the_error_says_how_to_install_it(tmp_path: Path) -> None:
    """A server whose Python cannot import onnxruntime_extensions (shadowed by a package that fails to
    import, as a missing one does) refuses the model with the pip command, and serves the rest."""
    root = tmp_path / "models"
    _model(root, "strings_auto")
    models.write_model(root, "plain", 1, models.scale_model(factor=2.0))
    shadow = tmp_path / "shadow" / "onnxruntime_extensions"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text('raise ImportError("onnxruntime_extensions is not installed")\n')
    proc = ServerProcess(root, tmp_path, env={"PYTHONPATH": str(shadow.parent)}).start()
    try:
        client = grpcclient.InferenceServerClient(f"unix://{proc.socket}")
        index = _index(client)
        assert index["plain"]["state"] == "READY"
        assert index["strings_auto"]["state"] == "UNAVAILABLE"
        assert "pip install 'edgecow[extensions]'" in index["strings_auto"]["reason"]
        client.close()
    finally:
        proc.stop()


def test_models_import_loads_the_new_version_with_the_models_custom_operators(tmp_path: Path) -> None:
    """`edgecow models import` validates with what the model's config.toml names (here its own library),
    and with onnxruntime-extensions for a new model that uses its operators."""
    root = tmp_path / "models"
    own = _model(root, "texts", config='custom_op_libraries = ["libmyops.so"]\n')
    shutil.copyfile(extensions_library(), own / "libmyops.so")
    source = tmp_path / "incoming.onnx"
    source.write_bytes((own / "1" / "model.onnx").read_bytes())

    def run(name: str, file: Path) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "edge_server", "models", "import", str(file), "--name", name,
             "--model-repository", str(root)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )

    for name, version in (("texts", 2), ("fresh", 1)):
        result = run(name, source)
        assert result.returncode == 0, result.stderr
        assert (root / name / str(version) / "model.onnx").is_file()
        assert "output shout" in result.stdout
    # The config is read: a version that could not load under it is not imported.
    models.write_model(root, "grid", 1, models.scale_model(shape=["batch", 3]), config="max_batch_size = 8\n")
    fixed = models.write_model(tmp_path / "staging", "grid", 1, models.scale_model(shape=[2, 3]))
    refused = run("grid", fixed)
    assert refused.returncode == 1 and "max_batch_size = 8" in refused.stderr
    assert not (root / "grid" / "2").exists()
