"""config.toml's keys for batching, classification labels and custom operators, the opset reader that
decides on onnxruntime-extensions, and the top-k ranking of the classification extension.

    pytest tests/unit/test_model_config_extensions.py
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from edge_server.classification import classify, read_labels
from edge_server.config import ConfigError
from edge_server.custom_ops import EXTENSIONS_DOMAIN, model_domains
from edge_server.repository import ModelConfigFile, parse_model_config
from shm_client.shared.errors import InvalidArgument
from tests.support import models


def _parse(tmp_path: Path, text: str) -> ModelConfigFile:
    path = tmp_path / "config.toml"
    path.write_text(text)
    return parse_model_config(path, "m/config.toml")


def test_the_new_keys_are_read(tmp_path: Path) -> None:
    config = _parse(tmp_path, 'max_batch_size = 8\nlabels = "labels.txt"\ncustom_op_libraries = ["lib/a.so", "b.so"]\n'
                              "onnxruntime_extensions = true\n")
    assert config.max_batch_size == 8
    assert config.labels == (("", "labels.txt"),)
    assert config.custom_op_libraries == ("lib/a.so", "b.so")
    assert config.onnxruntime_extensions is True
    per_output = _parse(tmp_path, '[labels]\nprobabilities = "classes.txt"\nlogits = "sub/../classes.txt"\n')
    assert per_output.labels == (("probabilities", "classes.txt"), ("logits", "sub/../classes.txt"))


def test_left_out_they_mean_detect(tmp_path: Path) -> None:
    config = _parse(tmp_path, "warmup = true\n")
    assert config.max_batch_size is None and config.onnxruntime_extensions is None
    assert config.labels == () and config.custom_op_libraries == ()


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("max_batch_size = -1\n", "max_batch_size must be an integer from 0"),
        ("max_batch_size = true\n", "max_batch_size must be an integer from 0"),
        ("max_batch_size = 2.5\n", "max_batch_size must be an integer from 0"),
        ("max_batch_size = 4294967296\n", "max_batch_size must be an integer from 0"),
        ("labels = 3\n", "labels must be a file name"),
        ("labels = []\n", "labels must be a file name"),
        ("labels = {}\n", "labels must be a file name"),
        ("labels = { probs = 1 }\n", "labels must be a file name"),
        ('labels = "../labels.txt"\n', "not a file inside the model's directory"),
        ('labels = "/etc/passwd"\n', "not a file inside the model's directory"),
        ('labels = ""\n', "not a file inside the model's directory"),
        ('labels = "a/../../labels.txt"\n', "not a file inside the model's directory"),
        ('labels = "."\n', "not a file inside the model's directory"),
        ('custom_op_libraries = "libfoo.so"\n', "custom_op_libraries must be a list"),
        ("custom_op_libraries = [1]\n", "custom_op_libraries must be a list"),
        ('custom_op_libraries = ["../libfoo.so"]\n', "not a file inside the model's directory"),
        ('custom_op_libraries = ["/usr/lib/libfoo.so"]\n', "not a file inside the model's directory"),
        ('onnxruntime_extensions = "yes"\n', "onnxruntime_extensions must be true or false"),
        ("max_batch = 4\n", "unknown key 'max_batch'"),
    ],
)
def test_values_that_cannot_work_name_the_file_and_the_key(tmp_path: Path, text: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        _parse(tmp_path, text)
    assert caught.value.message.startswith("m/config.toml: ")
    assert words in caught.value.message


def test_model_domains_reads_the_opset_imports(tmp_path: Path) -> None:
    contrib = tmp_path / "contrib.onnx"
    onnx.save(models.contrib_strings_model(), contrib)
    assert model_domains(contrib) == {"", EXTENSIONS_DOMAIN}
    zipmap = tmp_path / "zipmap.onnx"
    onnx.save(models.zipmap_model(), zipmap)
    assert model_domains(zipmap) == {"", "ai.onnx.ml"}
    plain = tmp_path / "plain.onnx"
    onnx.save(models.scale_model(), plain)
    assert model_domains(plain) == {""}


@pytest.mark.parametrize("content", [b"", b"\xff\xff\xff", b"not a model at all"])
def test_model_domains_of_a_file_that_is_not_a_model_is_empty(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    assert model_domains(path) == frozenset()
    assert model_domains(tmp_path / "missing.onnx") == frozenset()


def test_labels_files_are_lines(tmp_path: Path) -> None:
    path = tmp_path / "labels.txt"
    path.write_bytes("cat\r\ndog\n\nb\u00e9ar".encode())
    assert read_labels(path, "labels.txt") == ("cat", "dog", "", "b\u00e9ar")
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(InvalidArgument, match="UTF-8"):
        read_labels(path, "labels.txt")
    with pytest.raises(InvalidArgument, match=r"'gone\.txt'"):
        read_labels(tmp_path / "gone.txt", "gone.txt")


def test_classify_keeps_the_batch_dimension_even_when_empty() -> None:
    assert classify(np.zeros((0, 5), np.float32), 3, batched=True).shape == (0, 3)
    assert classify(np.zeros((2, 0), np.float32), 3, batched=True).shape == (2, 0)
    assert classify(np.zeros((0,), np.float32), 3, batched=False).shape == (0,)
    assert classify(np.array(7.0, np.float32), 3, batched=True).tolist() == [b"7.000000:0"]


def test_classify_ranks_nan_last_and_ties_by_index() -> None:
    values = np.array([np.nan, 1.0, -np.inf, 1.0, np.inf], np.float32)
    assert classify(values, 5, batched=False).tolist() == [
        b"inf:4", b"1.000000:1", b"1.000000:3", b"-inf:2", b"nan:0"
    ]


def test_classify_ranks_each_row_of_a_higher_rank_output_over_its_elements() -> None:
    values = np.array([[[1, 9], [3, 4]], [[8, 0], [0, 8]]], np.int32)
    assert classify(values, 2, batched=True, labels=("a", "b", "c", "d")).tolist() == [
        [b"9:1:b", b"4:3:d"], [b"8:0:a", b"8:3:d"]
    ]


def test_finding_the_extensions_library_leaves_the_protobuf_implementation_alone() -> None:
    """onnxruntime_extensions sets PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION=python when imported; every process
    started afterwards (a test's server, say) would get the slow pure-Python protobuf. A fresh interpreter,
    since a package is imported once per process."""
    script = (
        "import os, pathlib\n"
        "from edge_server.custom_ops import extensions_library\n"
        "assert pathlib.Path(extensions_library()).is_file()\n"
        "assert 'PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION' not in os.environ, os.environ\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "PROTOCOL_BUFFERS_PYTHON_IMPLEMENTATION"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
