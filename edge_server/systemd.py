"""systemd integration: sd_notify over $NOTIFY_SOCKET, a health-checked watchdog, and the unit installer.

    notifier = Notifier.from_env(); notifier.ready("3 models loaded")
    Watchdog(notifier, check=server_answers).start()

Everything here is a no-op when the process was not started by systemd (no $NOTIFY_SOCKET), so the server
calls it unconditionally. Only the standard library is used: the notify protocol is one datagram per message.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

log = logging.getLogger(__name__)

UNIT_NAME = "edgecow.service"
CONFIG_PATH = Path("/etc/edgecow/edgecow.toml")
_SEND_TIMEOUT = 1.0


class Notifier:
    """Sends sd_notify(3) messages to the socket systemd passed in $NOTIFY_SOCKET."""

    def __init__(self, address: str | None = None, watchdog_usec: int | None = None) -> None:
        self._address = address
        self._watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Notifier:
        env = os.environ if environ is None else environ
        return cls(_notify_address(env.get("NOTIFY_SOCKET", "")), _watchdog_usec(env))

    @property
    def enabled(self) -> bool:
        return self._address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half the timeout systemd set (sd_watchdog_enabled(3))."""
        if not self.enabled or self._watchdog_usec is None:
            return None
        return self._watchdog_usec / 2 / 1_000_000

    def notify(self, message: str | None = None, /, **fields: object) -> bool:
        """Send a raw message and/or KEY=value fields in one datagram; True when it was delivered."""
        if self._address is None:
            return False
        lines = [] if message is None else [message.rstrip("\n")]
        lines += [f"{key.upper()}={_one_line(value)}" for key, value in fields.items()]
        payload = "\n".join(lines).encode()
        try:
            with self._lock:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                    # A receiver that stops reading must not hang the caller (the watchdog thread, a reload).
                    self._sock.settimeout(_SEND_TIMEOUT)
                self._sock.sendto(payload, self._address)
        except OSError as exc:
            log.debug("sd_notify to %r failed: %s", self._address, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.notify("READY=1") if status is None else self.notify("READY=1", status=status)

    def reloading(self) -> bool:
        # systemd >= 253 (Type=notify-reload) matches RELOADING=1 to the reload request by this timestamp;
        # older versions ignore the extra field.
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", monotonic_usec=monotonic_usec)

    def stopping(self) -> bool:
        return self.notify("STOPPING=1")

    def status(self, text: str) -> bool:
        return self.notify(status=text)

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def close(self) -> None:
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None


def _notify_address(value: str) -> str | None:
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value:
        log.debug("NOTIFY_SOCKET %r is not a unix socket address; not notifying", value)
    return None


def _watchdog_usec(env: Mapping[str, str]) -> int | None:
    pid = env.get("WATCHDOG_PID")
    if pid and pid != str(os.getpid()):
        return None  # meant for another process (we were forked or exec'd by the real service process)
    try:
        usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    return usec if usec > 0 else None


def _one_line(value: object) -> str:
    return " ".join(str(value).splitlines())


class Watchdog:
    """A daemon thread that pings WATCHDOG=1 only while `check()` says the server is healthy.

    When the check fails (or raises) the ping is skipped, so systemd restarts a server that hangs instead of
    one that merely keeps a timer thread alive.
    """

    def __init__(self, notifier: Notifier, check: Callable[[], bool], interval: float | None = None) -> None:
        self._notifier = notifier
        self._check = check
        self._interval = notifier.watchdog_interval if interval is None else interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self._notifier.enabled and self._interval is not None and self._interval > 0

    def start(self) -> Watchdog:
        if self.enabled and self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        assert self._interval is not None
        while not self._stop.wait(self._interval):
            if self._healthy():
                self._notifier.watchdog()

    def _healthy(self) -> bool:
        try:
            if self._check():
                return True
            log.warning("watchdog: health check failed; not pinging systemd")
        except Exception:
            log.warning("watchdog: health check raised; not pinging systemd", exc_info=True)
        return False


# --- installer ---------------------------------------------------------------------------------------------


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


def _unit_quote(arg: str) -> str:
    # Unit files expand %specifiers and $VARIABLES in ExecStart=; a literal path must escape both.
    escaped = arg.replace("%", "%%").replace("$", "$$")
    if any(ch.isspace() for ch in escaped) or '"' in escaped or "\\" in escaped:
        escaped = '"' + escaped.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return escaped


def _unit_text(name: str) -> str:
    return resources.files("edge_server").joinpath("units", name).read_text(encoding="utf-8")


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
    if not dry_run and _manages_live_system(root):
        _run("systemd-sysusers", "/etc/sysusers.d/edgecow.conf")
        _run("systemd-tmpfiles", "--create", "/etc/tmpfiles.d/edgecow.conf")
        _run("systemctl", "daemon-reload")
        if enable is not False:
            _run("systemctl", "enable", UNIT_NAME)
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
    drop_in_dir = root / "etc/systemd/system/edgecow.service.d"
    if not dry_run and drop_in_dir.is_dir() and not any(drop_in_dir.iterdir()):
        drop_in_dir.rmdir()
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


def _manages_live_system(root: Path) -> bool:
    return (
        root.resolve() == Path("/")
        and os.geteuid() == 0
        and Path("/run/systemd/system").is_dir()
        and shutil.which("systemctl") is not None
    )


def _run(*cmd: str) -> None:
    log.info("running %s", " ".join(cmd))
    subprocess.run(cmd, check=True)
