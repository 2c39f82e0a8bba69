"""EdgeClient over shared memory against a real server: same answers as gRPC, pooling, zero-copy results,
fallback to gRPC, cleanup on close, at exit and after a SIGKILL.

    .venv/bin/pytest tests/integration/test_shm_edgeclient.py
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from shm_client import EdgeClient, ZeroCopyResult
from shm_client.shared._proto import inference_pb2 as pb
from shm_client.shared._proto import inference_pb2_grpc as pb_grpc
from shm_client.shared.segments import SHM_DIR
from tests.support.arrays import random_array
from tests.support.processes import REPO_ROOT, ServerProcess

IDENTITY_DTYPES = ["float32", "float64", "float16", "bool", "int8", "int16", "int32", "int64",
                   "uint8", "uint16", "uint32", "uint64", "object"]
ONNX_NAMES = {"float32": "float", "float64": "double", "object": "string"}


def _entries(prefix: str) -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith(prefix)}


def _prefix(client: EdgeClient) -> str:
    """The /dev/shm name prefix of the client's pooled segments."""
    return client._session._pool._base + "-"


def _registered(target: str) -> set[str]:
    with grpc.insecure_channel(target.replace("unix://", "unix:")) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return set(stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=5).regions)


def _unregister_all(target: str, prefix: str = "") -> None:
    """Unregister-all; with `prefix`, also each region named so (unregister-all spares EdgeClients')."""
    with grpc.insecure_channel(target.replace("unix://", "unix:")) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=""), timeout=5)
        if prefix:
            status = stub.SystemSharedMemoryStatus(pb.SystemSharedMemoryStatusRequest(), timeout=5)
            for name in status.regions:
                if name.startswith(prefix):
                    stub.SystemSharedMemoryUnregister(pb.SystemSharedMemoryUnregisterRequest(name=name), timeout=5)


@pytest.fixture(scope="module")
def clients(server: ServerProcess) -> Iterator[dict[str, EdgeClient]]:
    made = {mode: EdgeClient(server.unix_target, transport=mode) for mode in ("auto", "shm", "grpc")}
    yield made
    for client in made.values():
        client.close()


def _cases() -> list[tuple[str, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    cases = []
    for dtype in IDENTITY_DTYPES:
        x = random_array((37,), dtype, seed=len(cases))
        cases.append((f"identity_{ONNX_NAMES.get(dtype, dtype)}", {"x": x}, {"y": x}))
    features = random_array((5, 4), "float32", seed=1)
    ids = random_array((7,), "int64", seed=2)
    mask = random_array((3,), "bool", seed=3)
    cases.append(("mixed", {"features": features, "ids": ids, "mask": mask},
                  {"total": features.sum(axis=1), "ids_twice": ids * 2, "mask_not": ~mask}))
    a, b = random_array((1, 16), "float32", seed=4), random_array((1, 16), "float32", seed=5)
    cases.append(("add_sub", {"a": a, "b": b}, {"sum": a + b, "diff": a - b}))
    text = random_array((6,), "object", seed=6)
    cases.append(("strings", {"text": text}, {"echo": text, "count": np.array(6, np.int64)}))
    return cases


@pytest.mark.parametrize("model, inputs, expected", _cases(), ids=[case[0] for case in _cases()])
def test_every_transport_gives_the_same_answer(
    clients: dict[str, EdgeClient], model: str, inputs: dict[str, np.ndarray], expected: dict[str, np.ndarray]
) -> None:
    answers = {mode: client.infer(model, inputs) for mode, client in clients.items()}
    for mode, answer in answers.items():
        assert set(answer) == set(expected), mode
        for name, want in expected.items():
            got = answer[name]
            assert got.dtype == want.dtype and got.shape == want.shape, (mode, name)
            if want.dtype.kind == "f":
                np.testing.assert_allclose(got, want, rtol=1e-6, err_msg=f"{mode} {name}")
            else:
                np.testing.assert_array_equal(got, want, err_msg=f"{mode} {name}")
    for name in expected:
        np.testing.assert_array_equal(answers["shm"][name], answers["grpc"][name])
        np.testing.assert_array_equal(answers["auto"][name], answers["grpc"][name])


def test_auto_picks_shared_memory_on_a_local_server(server: ServerProcess, clients: dict[str, EdgeClient]) -> None:
    assert clients["auto"].transport == "shm"
    assert clients["shm"].transport == "shm"
    assert clients["grpc"].transport == "grpc"
    with EdgeClient(server.tcp_target) as over_loopback:  # loopback is remote by default
        assert over_loopback.transport == "grpc"
        np.testing.assert_array_equal(over_loopback.infer("scale", {"x": np.ones(3, np.float32)}, version=1)["y"],
                                      np.ones(3, np.float32))


def test_dynamic_output_size_is_learned_and_then_placed_in_shm(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target, transport="shm") as client:
        x = np.arange(1000, dtype=np.float32)
        for _ in range(3):  # the first call learns y's size, later ones put y in shared memory
            np.testing.assert_array_equal(client.infer("scale", {"x": x}, version=2)["y"], x * 2)
        assert len(client._session._pool.segments()) == 2


def test_results_live_in_the_segment_they_were_written_to_until_dropped(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target, transport="shm") as client:
        pool = client._session._pool
        a, b = np.ones((1, 16), np.float32), np.full((1, 16), 2.0, np.float32)
        first = client.infer("add_sub", {"a": a, "b": b})
        total = first["sum"][0, :8]  # a view of a view keeps the segment as well
        del first
        assert any(np.shares_memory(total, np.frombuffer(seg.buffer, np.uint8)) for seg in pool.segments())
        np.testing.assert_array_equal(total, (a + b)[0, :8])
        # While `total` is held its segment is not lent out again: other calls leave it alone.
        for scale in (10, 100):
            np.testing.assert_array_equal(client.infer("add_sub", {"a": a * scale, "b": b})["sum"], a * scale + b)
        np.testing.assert_array_equal(total, (a + b)[0, :8])
        held = len(pool.segments())
        owned = set(client._session._owned)
        assert len(owned) == 1  # total's segment; the other calls' results were dropped at once
        del total
        gc.collect()
        # Dropped, the segment goes back to the pool, and steady calls need no new one.
        assert not client._session._owned
        for scale in (1000, 10000):
            np.testing.assert_array_equal(client.infer("add_sub", {"a": a * scale, "b": b})["sum"], a * scale + b)
        assert len(pool.segments()) == held


def test_zero_copy_keyword_still_returns_a_releasable_result(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target, transport="shm") as client:
        a, b = np.ones((1, 16), np.float32), np.full((1, 16), 2.0, np.float32)
        with client.infer("add_sub", {"a": a, "b": b}, zero_copy=True) as result:
            assert isinstance(result, ZeroCopyResult)
            np.testing.assert_array_equal(result["sum"], a + b)
        assert dict(result) == {}


def test_a_result_outlives_its_client_and_feeds_another_call_without_a_copy(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target, transport="shm") as client:
        x = np.arange(16, dtype=np.float32).reshape(1, 16)
        y = client.infer("add_sub", {"a": x, "b": x})["sum"]
        # An output handed back as an input is read where it is: no new segment for it.
        before = len(client._session._pool.segments())
        z = client.infer("add_sub", {"a": y, "b": x})["sum"]
        np.testing.assert_array_equal(z, x * 3)
        assert len(client._session._pool.segments()) <= before + 1  # only z's own
    np.testing.assert_array_equal(y, x * 2)  # the client is closed; the arrays stay readable
    np.testing.assert_array_equal(z, x * 3)


def test_steady_state_makes_no_new_segments(server: ServerProcess) -> None:
    with EdgeClient(server.unix_target, transport="shm") as client:
        prefix = _prefix(client)
        x = random_array((4, 256), "float32")
        np.testing.assert_allclose(client.infer("static", {"x": x})["y"], x * 3, rtol=1e-6)
        entries = _entries(prefix)
        registered = {name for name in _registered(server.unix_target) if name.startswith(prefix)}
        assert len(entries) == 2 and registered == entries
        for i in range(50):
            np.testing.assert_allclose(client.infer("static", {"x": x + i})["y"], (x + i) * 3, rtol=1e-6)
            assert _entries(prefix) == entries
        assert {name for name in _registered(server.unix_target) if name.startswith(prefix)} == entries
    assert _entries(prefix) == set()
    assert not {name for name in _registered(server.unix_target) if name.startswith(prefix)}


def test_one_client_shared_by_eight_threads(server: ServerProcess) -> None:
    errors: list[BaseException] = []
    with EdgeClient(server.unix_target, transport="shm") as client:

        def worker(seed: int) -> None:
            try:
                for i in range(15):
                    a = random_array((1, 16), "float32", seed=seed * 100 + i)
                    b = random_array((1, 16), "float32", seed=seed * 100 + i + 50)
                    out = client.infer("add_sub", {"a": a, "b": b})
                    np.testing.assert_array_equal(out["sum"], a + b)
                    np.testing.assert_array_equal(out["diff"], a - b)
                    y = client.infer("identity_int64", {"x": np.arange(seed + i, dtype=np.int64)})["y"]
                    np.testing.assert_array_equal(y, np.arange(seed + i, dtype=np.int64))
            except BaseException as err:
                errors.append(err)

        threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert client.transport == "shm"
    assert errors == []


# -- falling back to gRPC ------------------------------------------------------------------------------


def test_auto_uses_grpc_when_the_server_has_shm_off(model_repo: Path, tmp_path: Path) -> None:
    server = ServerProcess(model_repo, tmp_path, "--no-shm").start()
    try:
        with EdgeClient(server.unix_target) as client:
            assert client.transport == "grpc"
            x = random_array((1, 16), "float32")
            np.testing.assert_array_equal(client.infer("add_sub", {"a": x, "b": x})["sum"], x + x)
        with pytest.raises(Exception, match="cannot be used"), EdgeClient(server.unix_target, transport="shm") as c:
            c.infer("add_sub", {"a": x, "b": x})
    finally:
        server.stop()


def test_a_failed_shm_step_falls_back_to_grpc_with_one_warning(
    server: ServerProcess, caplog: pytest.LogCaptureFixture, wait_until
) -> None:
    caplog.set_level(logging.WARNING, logger="edgecow.client")
    with EdgeClient(server.unix_target) as client:
        prefix = _prefix(client)
        x = random_array((1, 16), "float32")
        assert client.infer("add_sub", {"a": x, "b": x})["sum"].tolist() == (x + x).tolist()
        assert client.transport == "shm" and caplog.records == []

        _unregister_all(server.unix_target, prefix)  # the server forgets the client's regions
        np.testing.assert_array_equal(client.infer("add_sub", {"a": x, "b": x * 3})["sum"], x * 4)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "gRPC" in warnings[0].getMessage()

        # The next call registers again and is back on shared memory.
        np.testing.assert_array_equal(client.infer("add_sub", {"a": x, "b": x})["diff"], x - x)
        assert {n for n in _registered(server.unix_target) if n.startswith(prefix)} == _entries(prefix)

        for name in _entries(prefix):  # now the objects vanish under the client (a cleaner ran)
            (SHM_DIR / name).unlink()
        assert wait_until(lambda: not {n for n in _registered(server.unix_target) if n.startswith(prefix)})
        for i in range(6):  # each call that meets a vanished segment goes over gRPC and drops that segment
            np.testing.assert_array_equal(client.infer("add_sub", {"a": x, "b": x * i})["sum"], x + x * i)
        assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
        # ...so the client is back on shared memory with fresh segments.
        np.testing.assert_array_equal(client.infer("add_sub", {"a": x, "b": x})["sum"], x * 2)
        fresh = _entries(prefix)
        assert len(fresh) == 4
        assert {n for n in _registered(server.unix_target) if n.startswith(prefix)} == fresh


# -- a light client, and cleanup ----------------------------------------------------------------------

LIGHT_CLIENT = """
import importlib.abc, sys
class Refuse(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"onnxruntime", "onnx", "psutil", "edge_server"}:
            raise ImportError(f"{name} is not allowed in the light client")
sys.meta_path.insert(0, Refuse())
import numpy as np
from shm_client import EdgeClient
with EdgeClient(sys.argv[1]) as client:
    y = client.infer("identity_float", {"x": np.arange(5, dtype=np.float32)})["y"]
    assert y.tolist() == [0, 1, 2, 3, 4], y
    print("transport", client.transport)
assert not {"onnxruntime", "onnx", "psutil"} & set(sys.modules)
"""


def test_the_client_runs_without_onnxruntime_onnx_or_psutil(server: ServerProcess) -> None:
    done = subprocess.run([sys.executable, "-c", LIGHT_CLIENT, server.unix_target], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["transport", "shm"]


EXIT_WITHOUT_CLOSE = """
import sys
import numpy as np
from shm_client import EdgeClient
client = EdgeClient(sys.argv[1], transport="shm")
client.infer("add_sub", {"a": np.ones((1, 16), np.float32), "b": np.ones((1, 16), np.float32)})
print(client._session._pool._base + "-", len(client._session._pool.segments()), flush=True)
"""


def test_segments_go_on_close_and_at_interpreter_exit(server: ServerProcess, wait_until) -> None:
    client = EdgeClient(server.unix_target, transport="shm")
    client.infer("add_sub", {"a": np.ones((1, 16), np.float32), "b": np.ones((1, 16), np.float32)})
    prefix = _prefix(client)
    assert len(_entries(prefix)) == 4
    client.close()
    assert _entries(prefix) == set()
    assert not {n for n in _registered(server.unix_target) if n.startswith(prefix)}

    done = subprocess.run([sys.executable, "-c", EXIT_WITHOUT_CLOSE, server.unix_target], cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    prefix, count = done.stdout.split()
    assert int(count) == 4
    assert _entries(prefix) == set()
    # The server notices the objects are gone and drops the registrations by itself.
    assert wait_until(lambda: not {n for n in _registered(server.unix_target) if n.startswith(prefix)})


KILLED_CLIENT = """
import sys
import numpy as np
from shm_client import EdgeClient
client = EdgeClient(sys.argv[1], transport="shm")
print(client._session._pool._base + "-", flush=True)
client.infer("gate", {"x": np.ones(1000, np.float32), "gate": np.zeros(1, np.int32)})  # never opens
print("finished", flush=True)
"""


def _gate_in_flight(client: EdgeClient) -> int:
    return next(m.in_flight for m in client.status().models if m.name == "gate")


def test_registrations_and_segments_of_a_killed_client_are_reclaimed(
    server: ServerProcess, clients: dict[str, EdgeClient], wait_until
) -> None:
    probe = clients["grpc"]
    child = subprocess.Popen([sys.executable, "-c", KILLED_CLIENT, server.unix_target],
                             cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        prefix = child.stdout.readline().strip()
        assert prefix.startswith(f"edgecow-cli-{child.pid}-")
        assert wait_until(lambda: _gate_in_flight(probe) == 1, timeout=30)
        entries = _entries(prefix)
        registered = {n for n in _registered(server.unix_target) if n.startswith(prefix)}
        assert len(entries) == 3 and registered == entries  # x, gate, rounds (y's size is not known yet)
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # The server stops the call when its caller is gone (the shut gate would hold it for good; its regions
    # are in use until then); after that the server's reaper (every 2 s) drops the registrations and
    # removes the objects.
    assert wait_until(lambda: _gate_in_flight(probe) == 0, timeout=30)
    assert wait_until(lambda: not {n for n in _registered(server.unix_target) if n.startswith(prefix)}, timeout=10)
    assert wait_until(lambda: _entries(prefix) == set(), timeout=10)
    assert server.alive()
    x = np.ones((1, 16), np.float32)
    np.testing.assert_array_equal(clients["auto"].infer("add_sub", {"a": x, "b": x})["sum"], x * 2)


def test_a_new_client_sweeps_segments_of_dead_clients() -> None:
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent("""
            import os
            from shm_client.shared.segments import Segment, unique_key
            segment = Segment.create(unique_key() + "-1", 4096)
            print(segment.key, flush=True)
            os._exit(0)  # no atexit: the segment stays behind
        """)],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=60,
    )
    key = done.stdout.strip()
    assert key.startswith("edgecow-cli-")
    # Any running server's reaper may get there first; either way a new client leaves no orphan behind.
    EdgeClient("unix:/nonexistent/edgecow.sock").close()
    assert not (SHM_DIR / key).exists()


def test_unregister_all_spares_the_regions_of_edgecow_clients(server: ServerProcess) -> None:
    """tritonclient's examples start with an unregister-all; it must not break other processes' clients."""
    with EdgeClient(server.unix_target, transport="shm") as client:
        prefix = _prefix(client)
        x = random_array((1, 16), "float32")
        client.infer("add_sub", {"a": x, "b": x})
        before = {n for n in _registered(server.unix_target) if n.startswith(prefix)}
        assert before
        _unregister_all(server.unix_target)
        assert {n for n in _registered(server.unix_target) if n.startswith(prefix)} == before
        np.testing.assert_array_equal(client.infer("add_sub", {"a": x, "b": x})["sum"], x * 2)
