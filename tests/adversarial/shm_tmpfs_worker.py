"""One attack on a server whose /dev/shm is a small private tmpfs; prints what happened as one JSON line.

    unshare -m sh -c 'mount -t tmpfs -o size=8m tmpfs /dev/shm && exec python shm_tmpfs_worker.py sparse WORKDIR'

Run by test_shm_crashes.py inside a mount namespace of its own (`unshare -m`), so the server and this
attacking client share a /dev/shm that fills up at 8 MiB while the machine's own stays untouched. The
scenarios are what a careless or hostile caller can do with a full /dev/shm: register a sparse object
larger than the room left, or punch holes into a registered object and fill the rest, so that the
server's next access finds no page to fault in (SIGBUS).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
from onnx import TensorProto

from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from shm_client.shared.segments import SHM_DIR, Segment
from tests.support import models
from tests.support.processes import ServerProcess

FALLOC_FL_KEEP_SIZE = 1
FALLOC_FL_PUNCH_HOLE = 2
MIB = 1 << 20


def _code(call: Callable[[], object]) -> str:
    try:
        call()
    except grpc.RpcError as err:
        return err.code().name
    return "OK"


class Attacker:
    def __init__(self, server: ServerProcess) -> None:
        self.server = server
        self.stub = pb_grpc.GRPCInferenceServiceStub(
            grpc.insecure_channel(server.unix_target, options=[("grpc.max_receive_message_length", -1)])
        )

    def register(self, name: str, key: str, byte_size: int, offset: int = 0) -> str:
        request = pb.SystemSharedMemoryRegisterRequest(name=name, key="/" + key, offset=offset, byte_size=byte_size)
        return _code(lambda: self.stub.SystemSharedMemoryRegister(request, timeout=30))

    def regions(self) -> list[str]:
        return sorted(self.stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10).regions)

    def identity(self, count: int, input_region: str | None = None, output_region: str | None = None) -> str:
        """identity over `count` floats, the input and/or output in a region (else in the message)."""
        request = pb.ModelInferRequest(model_name="identity")
        tensor = request.inputs.add(name="x", datatype="FP32", shape=[count])
        if input_region:
            tensor.parameters["shared_memory_region"].string_param = input_region
            tensor.parameters["shared_memory_byte_size"].int64_param = count * 4
        else:
            request.raw_input_contents.append(np.ones(count, np.float32).tobytes())
        if output_region:
            output = request.outputs.add(name="y")
            output.parameters["shared_memory_region"].string_param = output_region
            output.parameters["shared_memory_byte_size"].int64_param = count * 4
        return _code(lambda: self.stub.ModelInfer(request, timeout=60))

    def serves(self) -> bool:
        """The server is alive and answers a plain call correctly."""
        request = pb.ModelInferRequest(model_name="identity")
        request.inputs.add(name="x", datatype="FP32", shape=[4])
        request.raw_input_contents.append(np.arange(4, dtype=np.float32).tobytes())
        try:
            reply = self.stub.ModelInfer(request, timeout=30)
        except grpc.RpcError:
            return False
        return self.server.alive() and np.frombuffer(reply.raw_output_contents[0], np.float32).tolist() == [0, 1, 2, 3]


def _sparse_object(key: str, size: int) -> int:
    """What tritonclient's create_shared_memory_region does: shm_open + ftruncate, no page reserved."""
    fd = os.open(SHM_DIR / key, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    os.ftruncate(fd, size)
    return fd


def _punch_hole(fd: int, offset: int, size: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    if libc.fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, size) != 0:
        raise OSError(ctypes.get_errno(), "fallocate(PUNCH_HOLE)")


def _fill_shm(key: str) -> int:
    """An object holding every page /dev/shm has left, so no fault can find a free one."""
    fd = os.open(SHM_DIR / key, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    stats = os.statvfs(SHM_DIR)
    size = stats.f_bavail * stats.f_frsize
    while size > 0:
        try:
            os.posix_fallocate(fd, 0, size)
            break
        except OSError as err:
            if err.errno != errno.ENOSPC:
                raise
            size -= 4096
    return fd


def sparse(attacker: Attacker) -> dict[str, object]:
    """A 64 MiB sparse object on an 8 MiB /dev/shm, registered whole and used as input and as output."""
    out: dict[str, object] = {}
    fd = _sparse_object("sparse-big", 64 * MIB)
    out["register_whole"] = attacker.register("whole", "sparse-big", 64 * MIB)
    # Whatever the registration said, use the region the way that killed the server: 12 MiB read or
    # written where /dev/shm has 8.
    out["input_call"] = attacker.identity(3 * MIB, input_region="whole")
    out["output_call"] = attacker.identity(3 * MIB, output_region="whole")
    out["serves_after_whole"] = attacker.serves()
    out["regions_after_whole"] = attacker.regions()
    # A small range of the same sparse object fits: it is reserved and then works both ways.
    out["register_small"] = attacker.register("small", "sparse-big", 4 * 4096, offset=32 * MIB)
    out["small_input_call"] = attacker.identity(4096, input_region="small")
    out["small_output_call"] = attacker.identity(4096, output_region="small")
    out["serves_at_end"] = attacker.serves()
    os.close(fd)
    return out


def holes(attacker: Attacker) -> dict[str, object]:
    """Registered (and so reserved) regions whose pages the caller punches out, /dev/shm then filled:
    the object keeps its size, so no per-call size check can see it; the server's access faults."""
    out: dict[str, object] = {}
    size = MIB
    source = Segment.create("holes-in", size)
    target = Segment.create("holes-out", size)
    source.write(np.ones(size // 4, np.float32))
    out["register_in"] = attacker.register("in", "holes-in", size)
    out["register_out"] = attacker.register("out", "holes-out", size)
    _punch_hole(source.fd, 0, size)
    _punch_hole(target.fd, 0, size)
    filler = _fill_shm("holes-filler")
    out["input_call"] = attacker.identity(size // 4, input_region="in")
    out["output_call"] = attacker.identity(size // 4, output_region="out")
    out["serves_after"] = attacker.serves()
    out["regions_after"] = attacker.regions()
    # Room again: the same names register anew and carry data both ways.
    os.close(filler)
    os.unlink(SHM_DIR / "holes-filler")
    source.write(np.ones(size // 4, np.float32))
    out["reregister_in"] = attacker.register("in", "holes-in", size)
    out["reregister_out"] = attacker.register("out", "holes-out", size)
    out["call_after"] = attacker.identity(size // 4, input_region="in", output_region="out")
    out["output_after"] = bool((target.array(np.float32, (size // 4,)) == 1).all())
    out["serves_at_end"] = attacker.serves()
    return out


SCENARIOS = {"sparse": sparse, "holes": holes}


def main() -> None:
    scenario, workdir = sys.argv[1], Path(sys.argv[2])
    repo = workdir / "models"
    models.write_model(repo, "identity", 1, models.identity_model(TensorProto.FLOAT))
    server = ServerProcess(repo, workdir).start()
    try:
        result = SCENARIOS[scenario](Attacker(server))
        result["server_alive"] = server.alive()
    finally:
        server.stop()
    result["server_log_has_traceback"] = "Traceback" in server.log
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
