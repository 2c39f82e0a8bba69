"""`edgecow doctor`: why this process does (or does not) share memory with the server it would reach.

    checks = diagnose()            # or diagnose("unix:///run/edgecow/edgecow.sock")
    print(report(checks)); sys.exit(0 if shared_memory_works(checks) else 1)

Client-only: it needs the light client's packages, never onnxruntime. Each check is one line, "ok",
"warn" or "FAIL", with what was found and, when it is not ok, what to run.
"""

from __future__ import annotations

import grp
import os
import pwd
import stat
from dataclasses import dataclass
from pathlib import Path

import grpc

from .client import _CHANNEL_OPTIONS, DEFAULT_TCP, default_socket_candidates, resolve_target
from .lane import LaneConnection
from .session import ShmSession, Stubs
from .shared._proto import edgecow_pb2, edgecow_pb2_grpc
from .shared._proto import inference_pb2_grpc as pb_grpc
from .shared.errors import EdgecowError, ServerUnreachable, from_rpc_error

STATUS_TIMEOUT = 10.0  # seconds the server gets to answer GetStatus
SHM_DIR = Path("/dev/shm")
SMALL_SHM_BYTES = 64 << 20  # less free than this and large tensors fall back to gRPC
SERVER_FIX = "start the server with `edgecow serve`, or see why it stopped with `systemctl status edgecow`"


@dataclass(frozen=True)
class Check:
    """One line of the diagnosis: "ok", "warn" or "FAIL", what was checked, and what was found or to run."""

    status: str
    name: str
    detail: str

    def __str__(self) -> str:
        return f"{self.status:<4} {self.name}: {self.detail}"


def shared_memory_works(checks: list[Check]) -> bool:
    """Whether the probe proved shared memory (and so no check before it failed)."""
    return any(check.name == "shared memory" and check.status == "ok" for check in checks)


def report(checks: list[Check]) -> str:
    return "\n".join(str(check) for check in checks)


def diagnose(target: str | None = None) -> list[Check]:
    """Every check, in order; it stops at the first failure that leaves nothing further to check."""
    resolved = resolve_target(target)
    checks = [_target_check(target, resolved)]
    if resolved.startswith("unix:"):
        socket_check = _socket_check(Path(resolved[len("unix:") :]))
        checks.append(socket_check)
        if socket_check.status == "FAIL":
            return checks
    channel = grpc.insecure_channel(resolved, options=_CHANNEL_OPTIONS)
    try:
        status, failure = _status(channel, resolved)
        if status is None:
            checks.append(Check("FAIL", "server", failure))
            return checks
        checks.append(Check("ok", "server", f"edgecow {status.version} answers at {resolved}"))
        if not status.shared_memory_enabled:
            checks.append(Check("FAIL", "server shared memory",
                                "the server was started with --no-shm (or shm_enabled = false): restart it "
                                "without that to let local clients use shared memory"))
            return checks
        checks.append(Check("ok", "server shared memory", "enabled"))
        checks.append(_dev_shm_check(status.system.shm_total_bytes))
        checks.extend(_probe_checks(channel, resolved))
    finally:
        channel.close()
    return checks


def _target_check(flag: str | None, resolved: str) -> Check:
    if flag:
        return Check("ok", "target", f"{resolved} (from --target)")
    if os.environ.get("EDGECOW_TARGET"):
        return Check("ok", "target", f"{resolved} (from $EDGECOW_TARGET)")
    looked = ", ".join(str(path) for path in default_socket_candidates())
    if resolved == DEFAULT_TCP:
        return Check("warn", "target", f"{resolved} (no local socket at {looked}; shared memory needs a local "
                                       "server: start one with `edgecow serve` or set $EDGECOW_TARGET)")
    return Check("ok", "target", f"{resolved} (the first local socket found of {looked})")


def _socket_check(path: Path) -> Check:
    """Whether this process may connect to the socket at `path`; if not, why and what to run."""
    try:
        info = path.stat()
    except PermissionError:
        return Check("FAIL", "socket", f"{path.parent} cannot be searched by this user; "
                                       f"{_group_fix(path.parent.stat().st_gid)}")
    except OSError:
        return Check("FAIL", "socket", f"no socket at {path}; {SERVER_FIX}")
    if not stat.S_ISSOCK(info.st_mode):
        return Check("FAIL", "socket", f"{path} is not a socket; point --target or $EDGECOW_TARGET at the "
                                       "server's socket")
    if not os.access(path, os.W_OK):
        return Check("FAIL", "socket", f"this user may not write {path} (mode {stat.filemode(info.st_mode)}); "
                                       f"{_group_fix(info.st_gid)}")
    return Check("ok", "socket", f"{path} is writable by this user")


def _group_fix(gid: int) -> str:
    """What to run for a user who lacks group `gid`: join it, or log in again when already a member."""
    try:
        group = grp.getgrgid(gid)
    except KeyError:
        return f"ask the server's owner to give the socket a group you are in (its group id {gid} has no name)"
    if gid in os.getgroups():
        return f"you are in group {group.gr_name!r}, yet access is refused: check the socket's mode"
    user = pwd.getpwuid(os.getuid()).pw_name
    if user in group.gr_mem:
        return (f"you were added to group {group.gr_name!r} after this login: log out and in again "
                f"(or run `newgrp {group.gr_name}`)")
    return f"run `sudo usermod -aG {group.gr_name} {user}`, then log out and in again"


def _status(channel: grpc.Channel, target: str) -> tuple[edgecow_pb2.GetStatusResponse | None, str]:
    """The server's GetStatus, or None and why it did not answer."""
    stub = edgecow_pb2_grpc.EdgecowServiceStub(channel)
    try:
        return stub.GetStatus(edgecow_pb2.GetStatusRequest(), timeout=STATUS_TIMEOUT), ""
    except grpc.RpcError as err:
        error = from_rpc_error(err)
    if isinstance(error, ServerUnreachable):
        if error.cause.lower() == "permission denied":
            return None, f"this user may not connect to {target}; run `groups` and see the socket check"
        return None, f"nothing answers at {target} ({error.cause}); {SERVER_FIX}"
    if error.code == grpc.StatusCode.UNIMPLEMENTED:
        return None, f"the server at {target} is not edgecow (no edgecow.v1 status); shared memory needs edgecow"
    return None, f"the server at {target} refused its status ({error.code.name}: {error.message})"


def _dev_shm_check(server_total: int) -> Check:
    """Whether /dev/shm here has room and looks like the server's (a container has its own)."""
    try:
        vfs = os.statvfs(SHM_DIR)
    except OSError as err:
        return Check("FAIL", "/dev/shm", f"cannot be read here ({err.strerror}); mount a tmpfs there")
    total, free = vfs.f_blocks * vfs.f_frsize, vfs.f_bavail * vfs.f_frsize
    mib = 1 << 20
    sizes = f"{free // mib} of {total // mib} MiB free here"
    if server_total and total != server_total:
        return Check("warn", "/dev/shm", f"{sizes}, the server's has {server_total // mib} MiB: likely not the "
                                         "same one (a container?); share the host's, e.g. `docker run --ipc=host`")
    if free < SMALL_SHM_BYTES:
        return Check("warn", "/dev/shm", f"{sizes}: large tensors will go over gRPC; make it larger "
                                         "(`docker run --shm-size=1g`, or remount the tmpfs with size=)")
    return Check("ok", "/dev/shm", sizes)


def _probe_checks(channel: grpc.Channel, target: str) -> list[Check]:
    """The end-to-end proof (each side reads a segment the other wrote), then the local lane."""
    session = ShmSession(Stubs(pb_grpc.GRPCInferenceServiceStub(channel),
                               edgecow_pb2_grpc.EdgecowServiceStub(channel),
                               channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")))
    try:
        proven, reason = session.prove()
        lane = session._lane_path  # what the proof learned; ShmSession keeps it for its own calls
    finally:
        session.close()
    if not proven:
        fix = ("the server cannot see this process's shared memory: run the client in the server's IPC "
               "namespace (`docker run --ipc=host`) with write access to /dev/shm, then run `edgecow doctor` again")
        return [Check("FAIL", "shared memory", f"the probe failed: {reason}; {fix}")]
    return [_lane_check(lane), Check("ok", "shared memory", f"shared memory works with the server at {target}")]


def _lane_check(path: str) -> Check:
    if not path:
        return Check("warn", "local lane", "the server offers none (--no-local-lane): shared-memory calls go "
                                           "over gRPC, a little slower; restart it without that flag to use it")
    try:
        LaneConnection(path).close()
    except OSError as err:
        return Check("warn", "local lane", f"cannot connect to {path} ({err.strerror or err}): shared-memory "
                                           "calls go over gRPC; check that socket's group and mode")
    return Check("ok", "local lane", path)


def run(target: str | None = None) -> int:
    """Print the diagnosis; 0 when shared memory works, 1 otherwise."""
    try:
        checks = diagnose(target)
    except EdgecowError as err:
        checks = [Check("FAIL", "doctor", err.message)]
    print(report(checks))
    return 0 if shared_memory_works(checks) else 1
