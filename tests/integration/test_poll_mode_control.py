"""Explicit model control and repository polling do not mix: with --poll-interval the disk decides, and
RepositoryModelLoad / Unload are refused (UNAVAILABLE, Triton's words) instead of being undone by the
next scan.

    ServerProcess(root, workdir, "--poll-interval", "0.5")   # load_model/unload_model: UNAVAILABLE
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.support import models
from tests.support.processes import ServerProcess


def _repository(root: Path) -> Path:
    models.write_model(root, "scale", 1, models.scale_model(factor=2.0))
    return root


def _scale(client: triton.InferenceServerClient) -> np.ndarray:
    x = triton.InferInput("x", [3], "FP32")
    x.set_data_from_numpy(np.ones(3, np.float32))
    return client.infer("scale", [x]).as_numpy("y")


@pytest.mark.parametrize("action", ["load", "unload"])
def test_explicit_control_is_refused_while_the_repository_is_polled(
    tmp_path: Path, action: str, wait_until
) -> None:
    root = _repository(tmp_path / "models")
    server = ServerProcess(root, tmp_path, "--poll-interval", "0.5").start()
    try:
        with triton.InferenceServerClient(f"unix://{server.socket}") as client:
            with pytest.raises(InferenceServerException) as refused:
                (client.load_model if action == "load" else client.unload_model)("scale")
            assert refused.value.status() == "StatusCode.UNAVAILABLE"
            message = refused.value.message()
            assert message.startswith("explicit model load / unload is not allowed if polling is enabled")
            assert "--poll-interval" in message  # and what to do instead
            # Nothing changed, and polling still does its job.
            assert client.is_model_ready("scale")
            np.testing.assert_array_equal(_scale(client), np.full(3, 2.0, np.float32))
            models.write_model(root, "scale", 2, models.scale_model(factor=5.0))
            assert wait_until(lambda: client.is_model_ready("scale", "2"), timeout=30)
            assert wait_until(lambda: _scale(client)[0] == 5.0, timeout=30)
    finally:
        server.stop()


def test_without_polling_explicit_control_works(tmp_path: Path) -> None:
    root = _repository(tmp_path / "models")
    server = ServerProcess(root, tmp_path).start()
    try:
        with triton.InferenceServerClient(f"unix://{server.socket}") as client:
            client.unload_model("scale")
            assert not client.is_model_ready("scale")
            client.load_model("scale")
            assert client.is_model_ready("scale")
    finally:
        server.stop()
