"""The unit installer, run into a temporary root, and the installed files checked by systemd's own tools.

    changes = install(root=tmp_path, gpu=True)
    systemd-analyze verify tmp_path/etc/systemd/system/edgecow.service   # empty stderr
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from edge_server import cli
from edge_server import install as install_module
from edge_server.install import (
    DEFAULT_CONFIG,
    Change,
    default_exec_start,
    hidden_from_service,
    install,
    render_unit,
    uninstall,
)

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

UNIT = "etc/systemd/system/edgecow.service"
GPU_DROP_IN = "etc/systemd/system/edgecow.service.d/gpu.conf"
SYSUSERS = "etc/sysusers.d/edgecow.conf"
TMPFILES = "etc/tmpfiles.d/edgecow.conf"
CONFIG = "etc/edgecow/edgecow.toml"
MAX_EXPOSURE = 3.0


def systemd_tool(name: str) -> str:
    """The path of a systemd tool; CI installs them, so there a missing one fails instead of skipping."""
    path = shutil.which(name)
    if path is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"{name} is missing on CI: apt-get install -y systemd")
        pytest.skip(f"{name} is not installed (apt-get install -y systemd)")
    return path


def actions(changes: list[Change], root: Path) -> dict[str, str]:
    return {str(change.path.relative_to(root)): change.action for change in changes}


def snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    return {
        str(path.relative_to(root)): (path.stat().st_ino, path.stat().st_mtime_ns, path.read_text())
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


def test_install_writes_the_unit_for_this_interpreter(tmp_path: Path) -> None:
    changes = install(tmp_path)

    assert actions(changes, tmp_path) == {
        UNIT: "create", SYSUSERS: "create", TMPFILES: "create", CONFIG: "create"
    }
    unit = (tmp_path / UNIT).read_text()
    exec_start = re.search(r"^ExecStart=(.*)$", unit, re.MULTILINE).group(1)
    assert exec_start == default_exec_start()
    assert exec_start.startswith(f"{sys.executable} -m edge_server serve")
    assert exec_start.endswith("--config /etc/edgecow/edgecow.toml")
    assert "@EXEC_START@" not in unit
    assert not (tmp_path / GPU_DROP_IN).exists()
    assert (tmp_path / CONFIG).read_text() == DEFAULT_CONFIG
    assert "u edgecow -:edgecow" in (tmp_path / SYSUSERS).read_text()


def test_second_install_changes_nothing(tmp_path: Path) -> None:
    install(tmp_path, gpu=True)
    before = snapshot(tmp_path)

    changes = install(tmp_path, gpu=True)

    assert set(actions(changes, tmp_path).values()) == {"unchanged"}
    assert len(changes) == 5
    assert snapshot(tmp_path) == before  # same inode, same mtime: nothing was rewritten


def test_install_updates_a_stale_unit_but_never_the_admins_config(tmp_path: Path) -> None:
    install(tmp_path)
    edited = DEFAULT_CONFIG.replace('log_level = "info"', 'log_level = "debug"')
    (tmp_path / CONFIG).write_text(edited)
    (tmp_path / UNIT).write_text("[Service]\nExecStart=/old/python -m edge_server serve\n")

    changes = actions(install(tmp_path), tmp_path)

    assert changes[UNIT] == "update"
    assert changes[CONFIG] == "unchanged"
    assert (tmp_path / CONFIG).read_text() == edited
    assert (tmp_path / UNIT).read_text() == render_unit(default_exec_start())


def test_gpu_adds_a_drop_in_and_leaves_the_main_unit_alone(tmp_path: Path) -> None:
    install(tmp_path)
    unit = (tmp_path / UNIT).read_text()

    changes = actions(install(tmp_path, gpu=True), tmp_path)

    assert changes[GPU_DROP_IN] == "create"
    assert changes[UNIT] == "unchanged"
    assert (tmp_path / UNIT).read_text() == unit == render_unit(default_exec_start(), gpu=True)
    drop_in = (tmp_path / GPU_DROP_IN).read_text()
    assert "PrivateDevices=no" in drop_in
    assert "DeviceAllow=char-nvidia* rw" in drop_in
    assert "MemoryDenyWriteExecute=no" in drop_in

    assert actions(install(tmp_path), tmp_path)[GPU_DROP_IN] == "remove"
    assert not (tmp_path / GPU_DROP_IN).exists()


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    changes = install(tmp_path, dry_run=True, gpu=True)

    assert set(actions(changes, tmp_path).values()) == {"create"}
    assert list(tmp_path.iterdir()) == []

    install(tmp_path, gpu=True)
    before = snapshot(tmp_path)
    changes = uninstall(tmp_path, dry_run=True)
    assert actions(changes, tmp_path)[UNIT] == "remove"
    assert snapshot(tmp_path) == before


def test_uninstall_removes_what_install_wrote_and_keeps_the_config(tmp_path: Path) -> None:
    install(tmp_path, gpu=True)

    changes = actions(uninstall(tmp_path), tmp_path)

    assert changes == {
        UNIT: "remove", GPU_DROP_IN: "remove", str(Path(GPU_DROP_IN).parent): "remove", SYSUSERS: "remove",
        TMPFILES: "remove", CONFIG: "keep",
    }
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file()) == [CONFIG]
    assert not (tmp_path / GPU_DROP_IN).parent.exists()
    assert actions(uninstall(tmp_path), tmp_path) == {CONFIG: "keep"}


def test_default_config_holds_the_server_settings() -> None:
    config = tomllib.loads(DEFAULT_CONFIG)

    assert config == {
        "model_repository": "/var/lib/edgecow/models",
        "socket": "/run/edgecow/edgecow.sock",
        "listen": "0.0.0.0:8001",
        "local_peers": ["unix"],
        "log_level": "info",
        "grace_period": 30.0,
        "poll_interval": 0,
    }
    assert "# tls_cert = " in DEFAULT_CONFIG and "# tls_key = " in DEFAULT_CONFIG


def test_the_default_config_is_one_the_server_accepts(tmp_path: Path) -> None:
    from edge_server.config import load_settings

    install(tmp_path)
    settings = load_settings(config_file=tmp_path / CONFIG, environ={})

    assert settings.model_repository == Path("/var/lib/edgecow/models")
    assert settings.socket_path() == Path("/run/edgecow/edgecow.sock")
    assert (settings.listen, settings.grace_period, settings.poll_interval) == ("0.0.0.0:8001", 30.0, 0.0)
    # Safe by default: only the group on the unix socket may use shared memory or control models, and the
    # risk of widening that is written next to the setting.
    assert settings.local_peers == ["unix"] and not settings.shm_allow_remote
    assert "Adding \"loopback\" lets ANY local user" in DEFAULT_CONFIG


def test_the_units_command_line_is_one_the_cli_accepts(tmp_path: Path) -> None:
    install(tmp_path)
    exec_start = re.search(r"^ExecStart=(.*)$", (tmp_path / UNIT).read_text(), re.MULTILINE).group(1)

    result = subprocess.run(
        [*shlex.split(exec_start), "--help"], capture_output=True, text=True, check=False, timeout=120
    )

    assert result.returncode == 0, result.stderr
    assert "--config" in result.stdout


def test_exec_start_paths_are_escaped_for_unit_files(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", "/opt/edge cow/100%/bin/python")
    assert default_exec_start().startswith('"/opt/edge cow/100%%/bin/python" -m edge_server serve')
    with pytest.raises(ValueError, match="one non-empty line"):
        render_unit("/bin/true\nExecStartPre=/bin/false")


def test_systemd_analyze_verify_accepts_the_units(tmp_path: Path) -> None:
    analyze = systemd_tool("systemd-analyze")
    install(tmp_path, gpu=True)
    # Verify loads the drop-in next to the unit, so one run checks both. It exits 0 on many problems (unknown
    # keys, bad values, missing binaries), so stderr is the signal. The ExecStart= binary is this interpreter.
    result = subprocess.run(
        [analyze, "verify", "--man=no", str(tmp_path / UNIT)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


def test_systemd_analyze_security_rates_the_unit_ok(tmp_path: Path) -> None:
    analyze = systemd_tool("systemd-analyze")
    scores = {}
    for gpu in (False, True):
        root = tmp_path / ("gpu" if gpu else "cpu")
        install(root, gpu=gpu)
        result = subprocess.run(
            [analyze, "security", "--offline=yes", "--no-pager", str(root / UNIT)],
            capture_output=True, text=True, check=False,
        )
        output = result.stdout + result.stderr
        match = re.search(r"Overall exposure level for edgecow\.service: (\d+\.\d+)", output)
        assert match, output
        scores["gpu" if gpu else "cpu"] = float(match.group(1))
    print(f"systemd-analyze security exposure: {scores}")
    assert scores["cpu"] <= MAX_EXPOSURE
    assert scores["gpu"] <= MAX_EXPOSURE


def test_sysusers_and_tmpfiles_snippets_create_the_user_and_repository(tmp_path: Path) -> None:
    sysusers = systemd_tool("systemd-sysusers")
    tmpfiles = systemd_tool("systemd-tmpfiles")
    install(tmp_path)

    subprocess.run([sysusers, f"--root={tmp_path}"], check=True, capture_output=True)
    passwd = (tmp_path / "etc/passwd").read_text()
    user = next(line.split(":") for line in passwd.splitlines() if line.startswith("edgecow:"))
    group = next(line.split(":") for line in (tmp_path / "etc/group").read_text().splitlines()
                 if line.startswith("edgecow:"))
    assert user[3] == group[2]  # primary group is edgecow
    assert user[5] == "/var/lib/edgecow"

    result = subprocess.run(
        [tmpfiles, f"--root={tmp_path}", "--create"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    models = tmp_path / "var/lib/edgecow/models"
    assert models.is_dir()
    assert models.stat().st_mode & 0o777 == 0o750
    assert models.stat().st_uid == int(user[2])


@pytest.mark.parametrize(
    ("path", "hidden_by"),
    [("/tmp/venv/bin/python", "PrivateTmp=yes"), ("/var/tmp/x/python3", "PrivateTmp=yes"),
     ("/home/ana/.venv/bin/python", "ProtectHome=yes"), ("/root/.pyenv/bin/python3", "ProtectHome=yes")],
)
def test_paths_the_unit_hides_are_named_with_the_setting(path: str, hidden_by: str) -> None:
    reason = hidden_from_service(Path(path))
    assert reason is not None and hidden_by in reason and path in reason


def test_paths_the_service_sees_pass(tmp_path: Path) -> None:
    assert hidden_from_service(Path("/opt/edgecow/bin/python")) is None
    assert hidden_from_service(Path("/usr/bin/python3")) is None


def test_a_symlink_into_a_hidden_directory_is_caught(tmp_path: Path) -> None:
    if hidden_from_service(tmp_path) is None:
        pytest.skip(f"the test's temporary directory {tmp_path} is not one the unit hides")
    link = Path("/usr/local/bin") / f"edgecow-test-{os.getpid()}"
    if not os.access(link.parent, os.W_OK):
        pytest.skip(f"{link.parent} is not writable to place a link outside the hidden directories")
    link.symlink_to(tmp_path / "python")
    try:
        assert hidden_from_service(link) is not None
    finally:
        link.unlink()


def test_install_systemd_refuses_a_hidden_interpreter_with_the_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "executable", "/home/someone/venv/bin/python")
    assert cli.main(["install-systemd", "--root", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "/home/someone/venv/bin/python" in err and "ProtectHome=yes" in err
    assert "python3 -m venv /opt/edgecow" in err and "--force" in err
    assert not (tmp_path / UNIT).exists()

    assert cli.main(["install-systemd", "--root", str(tmp_path), "--force"]) == 0
    assert "/home/someone/venv/bin/python -m edge_server" in (tmp_path / UNIT).read_text()


def test_staging_says_which_live_steps_it_skipped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(install_module, "check_visible_to_service", lambda: None)
    assert cli.main(["install-systemd", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    for step in ("systemd-sysusers", "systemd-tmpfiles --create", "systemctl daemon-reload", "systemctl enable"):
        assert any(line.startswith("skipped") and step in line and "staging root" in line
                   for line in out.splitlines()), out
    assert cli.main(["uninstall-systemd", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert any(line.startswith("skipped") and "systemctl disable --now" in line for line in out.splitlines()), out


def test_the_empty_drop_in_directory_goes_with_the_gpu_drop_in(tmp_path: Path) -> None:
    drop_in_dir = tmp_path / GPU_DROP_IN
    install(tmp_path, gpu=True)
    dry = actions(install(tmp_path, dry_run=True), tmp_path)
    assert dry[str(Path(GPU_DROP_IN).parent)] == "remove"
    assert drop_in_dir.exists()
    install(tmp_path)  # without --gpu: the drop-in and its directory go
    assert not drop_in_dir.parent.exists()
    install(tmp_path, gpu=True)
    uninstall(tmp_path)
    assert not drop_in_dir.parent.exists()
    assert (tmp_path / "etc/systemd/system").is_dir()


def test_a_drop_in_directory_holding_the_admins_files_stays(tmp_path: Path) -> None:
    install(tmp_path, gpu=True)
    own = tmp_path / "etc/systemd/system/edgecow.service.d/limits.conf"
    own.write_text("[Service]\nMemoryMax=2G\n")
    uninstall(tmp_path)
    assert own.exists()


def test_uninstall_help_describes_its_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli.main(["uninstall-systemd", "--help"])
    out = capsys.readouterr().out
    assert "--root ROOT  remove from this staging directory" in " ".join(out.split()) or "staging" in out
    assert "--dry-run" in out and "remove nothing" in out
    assert "config" in out
