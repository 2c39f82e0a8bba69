"""The settings table (edge_server/config.py) is the one source of `serve`'s flags and README's table, and a bad
setting names where it came from: the flag, the EDGECOW_* variable or the TOML file."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from edge_server import cli
from edge_server.config import ConfigError, Settings, load_settings, settings_table

README = Path(__file__).resolve().parents[2] / "README.md"


def _readme_rows() -> dict[str, list[str]]:
    text = README.read_text()
    start = text.index("| key | flag | environment | default | meaning |")
    rows: dict[str, list[str]] = {}
    for line in text[start:].splitlines()[2:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split(" | ")]
        rows[cells[0].strip("`")] = [cell.strip("`") for cell in cells[1:4]]
    return rows


def test_every_settings_field_is_in_the_table() -> None:
    names = [row.name for row in settings_table()]
    fields = [f.name for f in dataclasses.fields(Settings) if f.name != "sources"]
    assert names == fields


def test_readme_table_matches_the_settings_table() -> None:
    readme = _readme_rows()
    table = {row.name: [row.flag, row.env, row.default] for row in settings_table()}
    assert readme == table


def test_serve_has_a_flag_for_every_setting_and_passes_it_on() -> None:
    parser = cli._parser()
    for row in settings_table():
        if row.kind == "bool":
            args = parser.parse_args(["serve", row.flag])
            assert getattr(args, row.name) is (row.default != "true"), row.flag
        else:
            args = parser.parse_args(["serve", row.flag, "7"])
            assert getattr(args, row.name) is not None, row.flag
    args = parser.parse_args(["serve", "--intra-op-threads", "3", "--no-shm"])
    settings = load_settings(None, {row.name: getattr(args, row.name) for row in settings_table()}, environ={})
    assert settings.intra_op_threads == 3
    assert settings.shm_enabled is False


def test_a_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="EDGECOW_LISTEN") as caught:
        load_settings(environ={"EDGECOW_LISTEN": "nohost"})
    assert "--listen" not in caught.value.message
    with pytest.raises(ConfigError, match="EDGECOW_WORKERS"):
        load_settings(environ={"EDGECOW_WORKERS": "many"})
    with pytest.raises(ConfigError, match="EDGECOW_LOG_LEVEL"):
        load_settings(environ={"EDGECOW_LOG_LEVEL": "loud"})


def test_a_bad_file_value_names_the_file(tmp_path: Path) -> None:
    config = tmp_path / "site.toml"
    config.write_text('listen = "127.0.0.1:99999"\n')
    with pytest.raises(ConfigError, match=re.escape(str(config))):
        load_settings(config, environ={})
    config.write_text("max_inflight_per_model = 0\n")
    with pytest.raises(ConfigError, match=re.escape(str(config))):
        load_settings(config, environ={})


def test_a_bad_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError, match="flag --listen"):
        load_settings(overrides={"listen": "8001"}, environ={"EDGECOW_LISTEN": "127.0.0.1:1"})
    with pytest.raises(ConfigError, match="flag --no-shm"):
        load_settings(overrides={"shm_enabled": "maybe"}, environ={})


def test_sources_record_where_each_value_came_from(tmp_path: Path) -> None:
    config = tmp_path / "edgecow.toml"
    config.write_text("workers = 4\n")
    settings = load_settings(config, {"log_level": "debug"}, environ={"EDGECOW_GRACE_PERIOD": "3"})
    assert settings.source("workers") == f"configuration file {config}"
    assert settings.source("grace_period") == "environment variable EDGECOW_GRACE_PERIOD"
    assert settings.source("log_level") == "flag --log-level"
    assert settings.source("listen") == "the default"
