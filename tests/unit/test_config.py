"""edge_server/config.py: defaults < TOML file < EDGECOW_* environment < flags, and errors that name the source.

    load_settings(config_file=path, overrides={"listen": "127.0.0.1:9000"}, environ={"EDGECOW_WORKERS": "4"})
"""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from edge_server.config import ConfigError, Settings, load_settings, read_toml


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "edgecow.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_environment_or_flags() -> None:
    settings = load_settings(environ={})
    assert settings == Settings()
    assert settings.listen == "0.0.0.0:8001"
    assert settings.providers == ["auto"]
    assert settings.poll_interval == 0.0


def test_each_layer_overrides_the_one_below(tmp_path: Path) -> None:
    config = _toml(tmp_path, 'listen = "127.0.0.1:1000"\nworkers = 3\nlog_level = "warning"\npoll_interval = 2.5\n')
    environ = {"EDGECOW_WORKERS": "5", "EDGECOW_LOG_LEVEL": "error"}
    settings = load_settings(config, overrides={"log_level": "debug", "listen": None}, environ=environ)
    assert settings.poll_interval == 2.5  # only the file sets it
    assert settings.listen == "127.0.0.1:1000"  # a flag left unset (None) does not override
    assert settings.workers == 5  # environment over file
    assert settings.log_level == "debug"  # flag over environment
    assert settings.max_inflight_per_model == Settings().max_inflight_per_model  # default


def test_edgecow_config_variable_names_the_file(tmp_path: Path) -> None:
    config = _toml(tmp_path, "workers = 7\n")
    assert load_settings(environ={"EDGECOW_CONFIG": str(config)}).workers == 7


def test_values_are_converted_to_each_fields_type(tmp_path: Path) -> None:
    environ = {
        "EDGECOW_SHM_ENABLED": "off",
        "EDGECOW_PROVIDERS": "CUDAExecutionProvider, CPUExecutionProvider",
        "EDGECOW_MODEL_REPOSITORY": "~/models",
        "EDGECOW_GRACE_PERIOD": "1.5",
        "EDGECOW_MODELS": "a,b",
    }
    settings = load_settings(environ=environ)
    assert settings.shm_enabled is False
    assert settings.providers == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert settings.model_repository == Path.home() / "models"
    assert settings.grace_period == 1.5
    assert settings.models == ["a", "b"]
    from_file = load_settings(_toml(tmp_path, 'providers = ["CPUExecutionProvider"]\nrequire_gpu = false\n'),
                              environ={})
    assert from_file.providers == ["CPUExecutionProvider"] and from_file.require_gpu is False


@pytest.mark.parametrize("value", ["none", "off", "", "NONE"])
def test_socket_none_disables_the_unix_socket(value: str) -> None:
    assert load_settings(overrides={"socket": value}, environ={}).socket_path() is None


def test_socket_path_defaults_somewhere_writable() -> None:
    path = load_settings(environ={}).socket_path()
    assert path is not None and path.name == "edgecow.sock"


def test_unknown_key_in_the_file_names_the_file_and_the_key(tmp_path: Path) -> None:
    config = _toml(tmp_path, 'listn = "127.0.0.1:1"\n')
    with pytest.raises(ConfigError) as raised:
        load_settings(config, environ={})
    assert str(config) in raised.value.message
    assert "unknown setting 'listn'" in raised.value.message
    assert "listen" in raised.value.message  # the known keys are listed
    assert raised.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_corrupt_toml_names_the_file(tmp_path: Path) -> None:
    config = _toml(tmp_path, "listen = [\n")
    with pytest.raises(ConfigError, match=f"configuration file {config} is not valid TOML"):
        load_settings(config, environ={})


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_toml(tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("source", "key", "value", "says"),
    [
        ("file", "workers", '"many"', "setting 'workers' has a bad value 'many'"),
        ("file", "shm_enabled", '"maybe"', "expected true or false"),
        ("file", "workers", "true", "expected an integer"),
        ("file", "providers", "3", "expected a list of strings"),
        ("file", "listen", "8001", "expected a string"),
        ("env", "EDGECOW_POLL_INTERVAL", "soon", "environment variable EDGECOW_POLL_INTERVAL"),
        ("env", "EDGECOW_REQUIRE_GPU", "2", "environment variable EDGECOW_REQUIRE_GPU"),
        ("flag", "max_queue_per_model", "x", "flag --max-queue-per-model"),
    ],
)
def test_bad_values_name_their_source(tmp_path: Path, source: str, key: str, value: str, says: str) -> None:
    config = None
    environ: dict[str, str] = {}
    overrides: dict[str, str] = {}
    if source == "file":
        config = _toml(tmp_path, f"{key} = {value}\n")
    elif source == "env":
        environ[key] = value
    else:
        overrides[key] = value
    with pytest.raises(ConfigError) as raised:
        load_settings(config, overrides=overrides, environ=environ)
    assert says in raised.value.message
    if config is not None:
        assert str(config) in raised.value.message


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"log_level": "loud"}, "log level 'loud' is not one of"),
        ({"workers": 0}, "'workers' must be at least 1"),
        ({"max_inflight_per_model": -1}, "'max_inflight_per_model' must be at least 1"),
        ({"poll_interval": -0.5}, "'poll_interval' must not be negative"),
        ({"grace_period": -1}, "'grace_period' must not be negative"),
        ({"tls_cert": "cert.pem"}, "TLS needs both --tls-cert and --tls-key"),
    ],
)
def test_values_out_of_range_are_refused(overrides: dict, says: str) -> None:
    with pytest.raises(ConfigError, match=says.replace("(", r"\(")):
        load_settings(overrides=overrides, environ={})



def test_local_peers_accepts_unix_and_loopback_only() -> None:
    assert load_settings(overrides={"local_peers": "unix"}, environ={}).local_peers == ["unix"]
    with pytest.raises(ConfigError, match="local_peers"):
        load_settings(overrides={"local_peers": "unix,lan"}, environ={})
