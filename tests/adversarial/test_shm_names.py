"""/dev/shm is world-writable: names edgecow did not make, and keys the OS refuses, never break the server,
its reaper or a client, and get a client error, never INTERNAL.

    pytest tests/adversarial/test_shm_names.py
"""

from __future__ import annotations

import os
import resource
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from onnx import TensorProto

from edge_server.regions import pid_alive
from shm_client import EdgeClient
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from shm_client.shared.segments import CLIENT_PREFIX, PID_MAX_LIMIT, SERVER_PREFIX, SHM_DIR, owner_pid, process_alive
from tests.support import models
from tests.support.processes import ServerProcess
from tests.support.shm import owned_segments

TAG = f"names{os.getpid()}"
KEY_PREFIX = f"edgecow-test-{os.getpid()}-names-"


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as err:
        call()
    return err.value.code(), err.value.details() or ""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("names-repo")
    models.write_model(root, "identity", 1, models.identity_model(TensorProto.FLOAT))
    return root


class Caller:
    def __init__(self, server: ServerProcess) -> None:
        self.stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(server.unix_target))

    def register(self, name: str, key: str, byte_size: int = 64) -> None:
        request = pb.SystemSharedMemoryRegisterRequest(name=name, key=key, byte_size=byte_size)
        self.stub.SystemSharedMemoryRegister(request, timeout=10)

    def unregister_all(self) -> None:
        self.stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=10)

    def regions(self) -> set[str]:
        return set(self.stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10).regions)

    def serves(self) -> bool:
        request = pb.ModelInferRequest(model_name="identity")
        request.inputs.add(name="x", datatype="FP32", shape=[3])
        request.raw_input_contents.append(np.arange(3, dtype=np.float32).tobytes())
        reply = self.stub.ModelInfer(request, timeout=30)
        return np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [0, 1, 2]


# -- names edgecow did not make ------------------------------------------------------------------------
ODD_PIDS = ["99999999999999999999", "0", "00012", str(PID_MAX_LIMIT + 1), "-1", "\u0663", "12\u00b2", " 12"]


def test_odd_owner_names_are_nobody_s() -> None:
    for prefix in (CLIENT_PREFIX, SERVER_PREFIX):
        for pid in ODD_PIDS:
            assert owner_pid(f"{prefix}{pid}-x") is None, pid
        assert owner_pid(f"{prefix}12-x/y") is None and owner_pid(f"{prefix}12-") is None
        assert owner_pid(f"/{prefix}{PID_MAX_LIMIT}-beacon") == PID_MAX_LIMIT
    for pid in (0, -1, PID_MAX_LIMIT + 1, 10**20):
        assert pid_alive(pid, 0.0) is False and process_alive(pid, 0.0) is False


@pytest.fixture
def planted(tmp_path: Path) -> Iterator[dict[str, Path]]:
    """Entries in the real /dev/shm that look like edgecow's but are not, and two that are (of a dead
    process), so the test can see the sweeps ran past the odd ones."""
    dead = _dead_pid()
    outside = tmp_path / "not-in-dev-shm"
    outside.write_bytes(b"keep me")
    entries = {
        "odd_files": [SHM_DIR / f"{prefix}{pid}-{TAG}" for prefix in (CLIENT_PREFIX, SERVER_PREFIX)
                      for pid in ODD_PIDS],
        "link": SHM_DIR / f"{CLIENT_PREFIX}{dead}-{TAG}-link",
        "server_link": SHM_DIR / f"{SERVER_PREFIX}{dead}-{TAG}-link",
        "dir": SHM_DIR / f"{CLIENT_PREFIX}{dead}-{TAG}-dir",
        "server_dir": SHM_DIR / f"{SERVER_PREFIX}{dead}-{TAG}-dir",
        "dead_client": SHM_DIR / f"{CLIENT_PREFIX}{dead}-{TAG}",
        "dead_server": SHM_DIR / f"{SERVER_PREFIX}{dead}-{TAG}",
        "outside": outside,
    }
    try:
        for path in [*entries["odd_files"], entries["dead_client"], entries["dead_server"]]:
            path.write_bytes(b"")
        entries["link"].symlink_to(outside)
        entries["server_link"].symlink_to(outside)
        entries["dir"].mkdir()
        entries["server_dir"].mkdir()
        yield entries
    finally:
        for path in [*entries["odd_files"], entries["link"], entries["server_link"], entries["dead_client"],
                     entries["dead_server"]]:
            path.unlink(missing_ok=True)
        for path in (entries["dir"], entries["server_dir"]):
            if path.is_dir() and not path.is_symlink():
                path.rmdir()


def test_names_edgecow_did_not_make_break_neither_server_nor_reaper_nor_client(
    planted: dict, repo: Path, tmp_path: Path, wait_until
) -> None:
    server = ServerProcess(repo, tmp_path, "--shm-reap-interval", "0.2").start()
    try:
        assert server.alive(), server.log
        assert not planted["dead_server"].exists()  # the start-up sweep ran, past every odd name
        # The reaper sweeps every 0.2 s; the dead client's file going shows a sweep got past the odd names.
        assert wait_until(lambda: not planted["dead_client"].exists(), timeout=15)
        with EdgeClient(server.unix_target) as client:  # its constructor sweeps /dev/shm too
            assert client.transport == "shm"
            y = client.infer("identity", {"x": np.arange(5, dtype=np.float32)})["y"]
            assert y.tolist() == [0, 1, 2, 3, 4]
        assert server.alive()
        assert "housekeeping failed" not in server.log and "Traceback" not in server.log
    finally:
        server.stop()
    # Nobody's files were touched: odd names, symlinks (and what they point at) and directories stay.
    assert all(path.exists() for path in planted["odd_files"])
    assert planted["link"].is_symlink() and planted["server_link"].is_symlink()
    assert planted["outside"].read_bytes() == b"keep me"
    assert planted["dir"].is_dir() and planted["server_dir"].is_dir()


# -- keys the OS refuses -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    proc = ServerProcess(repo, tmp_path_factory.mktemp("names-srv")).start()
    yield proc
    proc.stop()


def test_keys_the_os_refuses_are_client_errors_without_server_paths(server: ServerProcess, tmp_path: Path) -> None:
    caller = Caller(server)
    secret = tmp_path / "server-only-file"
    secret.write_bytes(b"s" * 4096)
    with owned_segments(KEY_PREFIX) as make:
        real = make("real", 4096)
        cases = {
            "link-out": lambda path: path.symlink_to(secret),  # would open a file elsewhere with the server's rights
            "link-in": lambda path: path.symlink_to(SHM_DIR / real.key),
            "dir": lambda path: path.mkdir(),
            "fifo": lambda path: os.mkfifo(path),
        }
        made = []
        try:
            for suffix, create in cases.items():
                path = SHM_DIR / f"{KEY_PREFIX}{suffix}"
                create(path)
                made.append(path)
                code, details = _code(lambda key=path.name: caller.register("odd", "/" + key))
                assert code == grpc.StatusCode.INVALID_ARGUMENT, (suffix, details)
                assert "/dev/shm" not in details and str(tmp_path) not in details, details
            long_key = "/" + "\u00e9" * 200  # 200 characters, 400 bytes: past NAME_MAX
            code, details = _code(lambda: caller.register("odd", long_key))
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "255" in details, details
            code, _ = _code(lambda: caller.register("odd", f"/{KEY_PREFIX}missing"))
            assert code == grpc.StatusCode.NOT_FOUND
        finally:
            for path in made:
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink()
        assert secret.read_bytes() == b"s" * 4096
        assert caller.regions() == set() and caller.serves() and server.alive()


def test_running_out_of_file_descriptors_is_resource_exhausted(repo: Path, tmp_path: Path) -> None:
    """Each registration holds one descriptor; with the server's RLIMIT_NOFILE lowered to what it has open
    plus a few, registering until it refuses must say RESOURCE_EXHAUSTED, and the server serves on."""
    limited = ServerProcess(repo, tmp_path).start()
    try:
        caller = Caller(limited)
        assert caller.serves()  # the channel is connected before the descriptors run out
        open_now = len(os.listdir(f"/proc/{limited.pid}/fd"))
        resource.prlimit(limited.pid, resource.RLIMIT_NOFILE, (open_now + 8, open_now + 8))
        with owned_segments(KEY_PREFIX) as make:
            segment = make("fds", 4096)
            refused = None
            for i in range(64):
                try:
                    caller.register(f"fd{i}", "/" + segment.key)
                except grpc.RpcError as err:
                    refused = err
                    break
            assert refused is not None, "64 registrations never ran out of descriptors"
            assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, limited.log
            assert "/dev/shm" not in refused.details()
            assert limited.alive() and caller.serves()
            caller.unregister_all()
            assert caller.regions() == set()
            caller.register("again", "/" + segment.key)  # descriptors came back with the unregister
            caller.unregister_all()
        assert "Traceback" not in limited.log
    finally:
        limited.stop()
