"""The systemd unit installer: edgecow.service, its sysusers.d/tmpfiles.d snippets, the GPU drop-in, a config.

    install(Path("/"), gpu=True)      # `edgecow install-systemd --gpu`
    install(tmp_path, dry_run=True)   # what would change under a staging root

The unit files live in the repository's systemd/ directory; a wheel carries them as edge_server/units.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from shm_client.shared.errors import EdgecowError

log = logging.getLogger(__name__)

UNIT_NAME = "edgecow.service"
CONFIG_PATH = Path("/etc/edgecow/edgecow.toml")
# Directories the unit hides from the service, and the setting that hides them.
HIDDEN_DIRS = {
    Path("/tmp"): "PrivateTmp=yes",
    Path("/var/tmp"): "PrivateTmp=yes",
    Path("/home"): "ProtectHome=yes",
    Path("/root"): "ProtectHome=yes",
    Path("/run/user"): "ProtectHome=yes",
}
INSTALL_FIX = ("install edgecow where the service can see it: python3 -m venv /opt/edgecow && "
               "/opt/edgecow/bin/pip install 'edgecow[server]' && sudo /opt/edgecow/bin/edgecow install-systemd")


@dataclass(frozen=True)
class Change:
    path: Path
    action: str  # "create" | "update" | "unchanged" | "remove" | "keep"


@dataclass(frozen=True)
class _File:
    path: str  # relative to the root
    content: str
    replace: bool = True  # False: a file the admin owns once it exists (the config)


DEFAULT_CONFIG = """\
# edgecow server configuration, read by `edgecow serve --config /etc/edgecow/edgecow.toml`.
# Keys are the command-line flags with underscores; EDGECOW_* variables and flags override them.
# After a change: systemctl restart edgecow (models alone: systemctl reload edgecow).

# <name>/<version>/model.onnx below this directory.
model_repository = "/var/lib/edgecow/models"

# Local callers: gRPC over this unix socket, and shared memory. The edgecow group may connect.
socket = "/run/edgecow/edgecow.sock"

# Remote callers: gRPC over TCP. "127.0.0.1:8001" keeps it on this machine.
listen = "0.0.0.0:8001"

# Callers that may use shared memory and load/unload models: "unix" = those on the socket above, limited to
# the edgecow group by its mode. Adding "loopback" lets ANY local user who can reach 127.0.0.1 read and
# overwrite other clients' shared memory and unload models with the server's rights: only on a box where
# every local user is trusted.
local_peers = ["unix"]

log_level = "info"

# Seconds calls in flight may take to finish after SIGTERM. Keep below TimeoutStopSec= in the unit (45).
grace_period = 30.0

# Seconds between checks of the repository for new versions; 0 checks only on reload (SIGHUP).
poll_interval = 0

# TLS for the TCP listener (both or neither); the files must be readable by the edgecow user.
# tls_cert = "/etc/edgecow/tls/server.crt"
# tls_key = "/etc/edgecow/tls/server.key"
"""


def default_exec_start() -> str:
    """The command of the current environment: this interpreter (the venv's), not whatever is on PATH."""
    return " ".join(
        _unit_quote(arg)
        for arg in (sys.executable, "-m", "edge_server", "serve", "--config", str(CONFIG_PATH))
    )


def hidden_from_service(path: Path) -> str | None:
    """Why the service cannot see `path` (or where its symlinks lead), e.g. "/tmp (PrivateTmp=yes)"; None if
    it can."""
    for candidate in (Path(os.path.abspath(path)), path.resolve()):
        for hidden, setting in HIDDEN_DIRS.items():
            if candidate.is_relative_to(hidden):
                return f"{candidate} is under {hidden}, which the unit hides ({setting})"
    return None


def check_visible_to_service() -> None:
    """Refuse an install whose interpreter or edgecow package the unit's sandbox hides (the service would fail
    to start with a bare "No such file or directory")."""
    package = Path(__file__).resolve().parent
    for what, path in (("the interpreter", Path(sys.executable)), ("the edgecow package", package)):
        reason = hidden_from_service(path)
        if reason is not None:
            raise EdgecowError(f"the service cannot reach {what}: {reason}; {INSTALL_FIX} "
                               "(or pass --force to install anyway)")


def not_live_reason(root: Path) -> str | None:
    """Why install/uninstall under `root` leaves the live-system steps out; None when it runs them."""
    if Path(root).resolve() != Path("/"):
        return f"{root} is a staging root"
    if os.geteuid() != 0:
        return "not running as root"
    if not Path("/run/systemd/system").is_dir() or shutil.which("systemctl") is None:
        return "systemd is not running here"
    return None


def install_steps(enable: bool | None = None) -> list[str]:
    """The commands install runs on the live system after writing the files."""
    steps = ["systemd-sysusers /etc/sysusers.d/edgecow.conf", "systemd-tmpfiles --create /etc/tmpfiles.d/edgecow.conf",
             "systemctl daemon-reload"]
    return steps + ([f"systemctl enable {UNIT_NAME}"] if enable is not False else [])


def uninstall_steps() -> list[str]:
    """The commands uninstall runs on the live system around removing the files."""
    return [f"systemctl disable --now {UNIT_NAME}", "systemctl daemon-reload"]


def _unit_quote(arg: str) -> str:
    # Unit files expand %specifiers and $VARIABLES in ExecStart=; a literal path must escape both.
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if any(ch.isspace() for ch in escaped) or '"' in escaped or "\\" in escaped:
        escaped = '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped


def _unit_text(name: str) -> str:
    packaged = resources.files("edge_server").joinpath("units", name)
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    # An editable install or a source checkout: setuptools' editable finder cannot map a directory without
    # __init__.py into a package, so the files are read where they live, in the repository's systemd/.
    return (Path(__file__).resolve().parent.parent / "systemd" / name).read_text(encoding="utf-8")


def render_unit(exec_start: str, *, gpu: bool = False) -> str:
    """The main unit with ExecStart= filled in.

    `gpu` changes nothing in this file: GPU access is the separate gpu.conf drop-in, so that removing it is
    enough to go back to the fully hardened unit.
    """
    if "\n" in exec_start or not exec_start.strip():
        raise ValueError("exec_start must be one non-empty line")
    return _unit_text("edgecow.service").replace("@EXEC_START@", exec_start)


def _files(exec_start: str, gpu: bool) -> list[_File]:
    files = [
        _File("etc/systemd/system/edgecow.service", render_unit(exec_start, gpu=gpu)),
        _File("etc/sysusers.d/edgecow.conf", _unit_text("sysusers.conf")),
        _File("etc/tmpfiles.d/edgecow.conf", _unit_text("tmpfiles.conf")),
        _File("etc/edgecow/edgecow.toml", DEFAULT_CONFIG, replace=False),
    ]
    if gpu:
        files.insert(1, _File("etc/systemd/system/edgecow.service.d/gpu.conf", _unit_text("gpu.conf")))
    return files


# What uninstall removes: everything install may write except the admin's config (and the models, which
# install never writes).
_INSTALLED = (
    "etc/systemd/system/edgecow.service",
    "etc/systemd/system/edgecow.service.d/gpu.conf",
    "etc/sysusers.d/edgecow.conf",
    "etc/tmpfiles.d/edgecow.conf",
)
_KEPT = ("etc/edgecow/edgecow.toml", "var/lib/edgecow/models")


def install(
    root: Path = Path("/"),
    *,
    dry_run: bool = False,
    gpu: bool = False,
    exec_start: str | None = None,
    enable: bool | None = None,
) -> list[Change]:
    """Write the unit, its snippets and a default config under `root`; return what changed.

    Files whose content is already right are not touched, so a second run reports only "unchanged". Without
    `gpu`, an earlier GPU drop-in is removed. On the live system (root "/", as root, systemd running) it then
    creates the user, the directories, reloads systemd and (unless `enable` is False) enables the service.
    """
    root = Path(root)
    changes = [_write(root, f, dry_run) for f in _files(exec_start or default_exec_start(), gpu)]
    if not gpu:
        drop_in = _remove(root / "etc/systemd/system/edgecow.service.d/gpu.conf", dry_run)
        changes += [drop_in] if drop_in.action == "remove" else []
        changes += _remove_empty_drop_in_dir(root, dry_run)
    if not dry_run and _manages_live_system(root):
        for step in install_steps(enable):
            _run(*step.split())
    return changes


def uninstall(root: Path = Path("/"), *, dry_run: bool = False) -> list[Change]:
    """Stop and disable the service (live system only) and remove the installed files.

    The config (/etc/edgecow/edgecow.toml) and the model repository stay; they are reported as "keep".
    The edgecow user stays too: files it owns may remain (systemd-sysusers never deletes users).
    """
    root = Path(root)
    live = not dry_run and _manages_live_system(root)
    if live:
        _run("systemctl", "disable", "--now", UNIT_NAME)
    changes = [change for rel in _INSTALLED if (change := _remove(root / rel, dry_run)).action == "remove"]
    changes += _remove_empty_drop_in_dir(root, dry_run)
    changes += [Change(root / rel, "keep") for rel in _KEPT if (root / rel).exists()]
    if live:
        _run("systemctl", "daemon-reload")
    return changes


def _write(root: Path, file: _File, dry_run: bool) -> Change:
    path = root / file.path
    if path.exists():
        if not file.replace or path.read_text(encoding="utf-8") == file.content:
            return Change(path, "unchanged")
        action = "update"
    else:
        action = "create"
    if not dry_run:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(file.content, encoding="utf-8")
        tmp.chmod(0o644)
        os.replace(tmp, path)  # never a half-written unit, even if interrupted
    return Change(path, action)


def _remove(path: Path, dry_run: bool) -> Change:
    if not path.exists():
        return Change(path, "unchanged")
    if not dry_run:
        path.unlink()
    return Change(path, "remove")


def _remove_empty_drop_in_dir(root: Path, dry_run: bool) -> list[Change]:
    """The unit's drop-in directory, once nothing but a removed gpu.conf was in it."""
    directory = root / "etc/systemd/system/edgecow.service.d"
    # A dry run has not removed gpu.conf yet; a real run has.
    if not directory.is_dir() or any(p.name != "gpu.conf" for p in directory.iterdir()):
        return []
    if not dry_run:
        directory.rmdir()
    return [Change(directory, "remove")]


def _manages_live_system(root: Path) -> bool:
    return not_live_reason(root) is None


def _run(*cmd: str) -> None:
    log.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
