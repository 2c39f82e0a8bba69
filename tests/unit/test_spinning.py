"""intra_op_spinning: onnxruntime's workers sleep between runs unless the server or a model's config.toml
asks them to busy-wait (a shared daemon must leave the box's CPU to its callers between calls).

    pytest tests/unit/test_spinning.py
"""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_server.config import ConfigError, Settings
from edge_server.repository import ModelStore, Repository, parse_model_config
from edge_server.runtime import ALLOW_SPINNING
from tests.support.models import scale_model, write_model


def _spinning(root: Path, settings: Settings, name: str) -> str:
    store = ModelStore(Repository(root), settings)
    store.load_all()
    entry: str = store.get(name).session.get_session_options().get_session_config_entry(ALLOW_SPINNING)
    return entry


@pytest.mark.parametrize(("server", "model", "expected"), [
    (False, None, "0"),  # the default: workers sleep between runs
    (True, None, "1"),
    (True, "false", "0"),  # a model's config.toml wins over the server's setting
    (False, "true", "1"),
])
def test_spinning_follows_the_server_setting_and_the_models_config(
    tmp_path: Path, server: bool, model: str | None, expected: str
) -> None:
    root = tmp_path / "models"
    config = None if model is None else f"intra_op_spinning = {model}\n"
    write_model(root, "scale", 1, scale_model(), config=config)
    settings = Settings(model_repository=root, intra_op_spinning=server)
    assert _spinning(root, settings, "scale") == expected


def test_a_spinning_value_that_is_not_a_boolean_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text('intra_op_spinning = "yes"\n')
    with pytest.raises(ConfigError, match="intra_op_spinning must be true or false"):
        parse_model_config(path)
