"""ModelStatistics per version, as the protocol has it: a name without a version reports every loaded
version, and a version that leaves and comes back starts from zero.

    client.get_inference_statistics("scale")        # one entry per loaded version of scale
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from tests.support import models
from tests.support.processes import ServerProcess


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerProcess]:
    root = tmp_path / "models"
    models.write_model(root, "scale", 1, models.scale_model(factor=1.0))
    models.write_model(root, "scale", 2, models.scale_model(factor=2.0))
    models.write_model(root, "scale", 3, models.scale_model(factor=3.0), config="version_policy = { latest = 2 }\n")
    models.write_model(root, "other", 1, models.identity_model())
    proc = ServerProcess(root, tmp_path).start()
    yield proc
    proc.stop()


def _infer(client: triton.InferenceServerClient, model: str, version: str, times: int) -> None:
    x = triton.InferInput("x", [4], "FP32")
    x.set_data_from_numpy(np.ones(4, np.float32))
    for _ in range(times):
        client.infer(model, [x], model_version=version)


def _counts(stats: object) -> dict[tuple[str, str], tuple[int, int]]:
    """(name, version) -> (inference_count, success count) of a ModelStatisticsResponse."""
    return {
        (m.name, m.version): (m.inference_count, m.inference_stats.success.count)
        for m in stats.model_stats  # type: ignore[attr-defined]
    }


def test_a_name_without_a_version_reports_every_loaded_version(server: ServerProcess) -> None:
    with triton.InferenceServerClient(f"unix://{server.socket}") as client:
        _infer(client, "scale", "2", 1)
        _infer(client, "scale", "3", 2)
        _infer(client, "other", "", 1)
        by_name = client.get_inference_statistics("scale")
        assert [(m.name, m.version) for m in by_name.model_stats] == [("scale", "2"), ("scale", "3")]
        assert _counts(by_name) == {("scale", "2"): (1, 1), ("scale", "3"): (2, 2)}
        assert _counts(client.get_inference_statistics("scale", "2")) == {("scale", "2"): (1, 1)}
        assert _counts(client.get_inference_statistics()) == {
            ("other", "1"): (1, 1), ("scale", "2"): (1, 1), ("scale", "3"): (2, 2),
        }
        for version in ("1", "9"):  # on disk but not loaded (policy), and not there at all
            with pytest.raises(InferenceServerException) as missing:
                client.get_inference_statistics("scale", version)
            assert missing.value.status() == "StatusCode.NOT_FOUND"
        with pytest.raises(InferenceServerException) as unknown:
            client.get_inference_statistics("nope")
        assert unknown.value.status() == "StatusCode.NOT_FOUND"


def test_a_version_unloaded_and_loaded_again_starts_from_zero(server: ServerProcess) -> None:
    config = server.repo / "scale" / "config.toml"
    with triton.InferenceServerClient(f"unix://{server.socket}") as client:
        _infer(client, "scale", "2", 2)
        _infer(client, "scale", "3", 1)
        # The policy drops version 2: the other version keeps its counters.
        config.write_text("version_policy = { latest = 1 }\n")
        client.load_model("scale")
        assert _counts(client.get_inference_statistics("scale")) == {("scale", "3"): (1, 1)}
        # Version 2 comes back: from zero, while version 3 goes on counting.
        config.write_text("version_policy = { latest = 2 }\n")
        client.load_model("scale")
        assert _counts(client.get_inference_statistics("scale")) == {("scale", "2"): (0, 0), ("scale", "3"): (1, 1)}
        # The whole model unloaded and loaded again: every version from zero.
        client.unload_model("scale")
        with pytest.raises(InferenceServerException):
            client.get_inference_statistics("scale")
        client.load_model("scale")
        stats = client.get_inference_statistics("scale")
        assert _counts(stats) == {("scale", "2"): (0, 0), ("scale", "3"): (0, 0)}
        assert all(m.last_inference == 0 and m.execution_count == 0 for m in stats.model_stats)
        _infer(client, "scale", "", 1)  # the default version is the highest
        assert _counts(client.get_inference_statistics("scale")) == {("scale", "2"): (0, 0), ("scale", "3"): (1, 1)}
