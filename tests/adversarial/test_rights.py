"""A local user outside the server's group must not borrow the server's rights: over loopback TCP it may
infer with tensors in the request, but not register, read or overwrite other callers' shared memory, list
their keys, or unload models; and it cannot reach the unix socket at all.

    pytest tests/adversarial/test_rights.py

The attacker is a real second user: a child that drops to `nobody` (setgroups, setgid, setuid) after its
imports. `runuser -u nobody python` is the same thing where the interpreter lies outside a private home
directory; here it may not (a pyenv under /root), so the child drops its rights itself.
"""

from __future__ import annotations

import json
import os
import pwd
import subprocess
import sys
import textwrap

import grpc
import numpy as np
import pytest

from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from tests.support.processes import REPO_ROOT, ServerProcess
from tests.support.shm import owned_segments

ATTACK = """
import json, os, sys
import grpc
import numpy as np
from shm_client.shared._proto import inference_pb2 as pb, inference_pb2_grpc as pb_grpc

tcp, unix_socket, victim_key = sys.argv[1:4]
nobody = int(sys.argv[4]), int(sys.argv[5])
os.setgroups([])
os.setgid(nobody[1])
os.setuid(nobody[0])
out = {"uid": os.getuid()}

def code(call):
    try:
        call()
        return "OK"
    except grpc.RpcError as err:
        return err.code().name

try:
    os.open("/dev/shm/" + victim_key, os.O_RDWR)
    out["open_victim"] = "OK"
except PermissionError:
    out["open_victim"] = "EACCES"

local = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel("unix://" + unix_socket))
out["unix_live"] = code(lambda: local.ServerLive(pb.ServerLiveRequest(), timeout=5))

stub = pb_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(tcp))
register = pb.SystemSharedMemoryRegisterRequest(name="stolen", key="/" + victim_key, byte_size=64)
out["register"] = code(lambda: stub.SystemSharedMemoryRegister(register, timeout=5))
out["status"] = code(lambda: stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=5))
out["unregister_all"] = code(
    lambda: stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(), timeout=5))
out["unload"] = code(
    lambda: stub.RepositoryModelUnload(pb.RepositoryModelUnloadRequest(model_name="scale"), timeout=5))

read = pb.ModelInferRequest(model_name="scale", model_version="1")
tensor = read.inputs.add(name="x", datatype="FP32", shape=[16])
tensor.parameters["shared_memory_region"].string_param = "victim"
tensor.parameters["shared_memory_byte_size"].int64_param = 64
out["read_through_infer"] = code(lambda: stub.ModelInfer(read, timeout=5))

write = pb.ModelInferRequest(model_name="scale", model_version="1")
write.inputs.add(name="x", datatype="FP32", shape=[16])
write.raw_input_contents.append(np.full(16, 7, np.float32).tobytes())
slot = write.outputs.add(name="y")
slot.parameters["shared_memory_region"].string_param = "victim"
slot.parameters["shared_memory_byte_size"].int64_param = 64
out["write_through_output"] = code(lambda: stub.ModelInfer(write, timeout=5))

plain = pb.ModelInferRequest(model_name="scale", model_version="1")
plain.inputs.add(name="x", datatype="FP32", shape=[4])
plain.raw_input_contents.append(np.ones(4, np.float32).tobytes())
out["plain_infer"] = code(lambda: stub.ModelInfer(plain, timeout=5))
print(json.dumps(out))
"""


def test_a_user_outside_the_group_cannot_borrow_the_servers_rights_over_loopback(server: ServerProcess) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to start a process as a second user")
    nobody = pwd.getpwnam("nobody")
    with owned_segments(f"advrights-{os.getpid()}-") as make:
        victim = make("victim", 4096)
        os.fchmod(victim.fd, 0o660)  # group-only, as EdgeClient makes them
        secret = np.arange(16, dtype=np.float32)
        victim.write(secret)
        with grpc.insecure_channel(server.unix_target) as channel:
            local = pb_grpc.GRPCInferenceServiceStub(channel)
            local.SystemSharedMemoryRegister(
                pb.SystemSharedMemoryRegisterRequest(name="victim", key="/" + victim.key, byte_size=4096), timeout=10
            )
            try:
                attack = subprocess.run(
                    [sys.executable, "-c", textwrap.dedent(ATTACK), server.tcp_target, str(server.socket),
                     victim.key, str(nobody.pw_uid), str(nobody.pw_gid)],
                    cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
                )
                assert attack.returncode == 0, attack.stderr
                seen = json.loads(attack.stdout.strip().splitlines()[-1])
                assert seen.pop("uid") == nobody.pw_uid
                assert seen == {
                    "open_victim": "EACCES",  # the object really is out of this user's reach
                    "unix_live": "UNAVAILABLE",  # the socket's mode keeps it out
                    "register": "PERMISSION_DENIED",
                    "status": "PERMISSION_DENIED",
                    "unregister_all": "PERMISSION_DENIED",
                    "unload": "PERMISSION_DENIED",
                    "read_through_infer": "PERMISSION_DENIED",
                    "write_through_output": "PERMISSION_DENIED",
                    "plain_infer": "OK",
                }
                np.testing.assert_array_equal(victim.array(np.float32, (16,)), secret)
                status = local.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=10)
                assert "victim" in status.regions and "stolen" not in status.regions
                assert local.ModelReady(pb.ModelReadyRequest(name="scale"), timeout=10).ready
            finally:
                local.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name="victim"), timeout=10)
