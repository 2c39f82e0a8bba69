"""The server's registry of client regions: key rules, bounds, limits, deferred unmapping, reaping.

    .venv/bin/pytest tests/unit/test_shm_registry.py

Real /dev/shm objects made by the test; the registry maps them as the server would.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import grpc
import numpy as np
import pytest

from edge_server.grpc_service import is_local_peer
from edge_server.regions import RegionRegistry, normalize_key, probe_client_segment
from shm_client.shared.errors import EdgecowError
from shm_client.shared.segments import CLIENT_PREFIX, SERVER_PREFIX, SHM_DIR, Segment, unique_key
from tests.support.shm import owned_segments

MakeSegment = Callable[..., Segment]


@pytest.fixture
def make_segment() -> Iterator[MakeSegment]:
    """Segments the test owns (the client's side), removed afterwards."""
    base = unique_key()
    counter = iter(range(1 << 30))
    with owned_segments("") as make:
        yield lambda size=8192, key=None: make(key or f"{base}-reg{next(counter)}", size)


@pytest.fixture
def registry() -> Iterator[RegionRegistry]:
    registry = RegionRegistry()
    yield registry
    registry.close()


def _code(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(EdgecowError) as err:
        call()
    return err.value.code, err.value.message


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


# -- keys ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key, name", [("/abc", "abc"), ("abc", "abc"), ("///abc", "abc"), ("/a.b-c_1", "a.b-c_1")])
def test_keys_lose_their_leading_slashes(key: str, name: str) -> None:
    assert normalize_key(key) == name


@pytest.mark.parametrize(
    "key",
    ["", "/", "///", "/a//b", "/a/b", "../etc", "/..", "/a..b", "/a\x00b", "/a\nb", "/a\x1bb", "/a\x7fb",
     "/" + "k" * 300, "/a\u200bb"],
    ids=["empty", "slash", "slashes", "double-slash", "inner-slash", "dotdot-prefix", "dotdot", "dotdot-inner",
         "nul", "newline", "escape", "del", "300-chars", "zero-width"],
)
def test_bad_keys_are_invalid_argument(registry: RegionRegistry, key: str) -> None:
    code, message = _code(lambda: registry.register("r", key, 0, 16))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "\x00" not in message and len(message) < 200
    assert len(registry) == 0


def test_key_of_255_characters_is_allowed_but_must_exist(registry: RegionRegistry) -> None:
    code, _ = _code(lambda: registry.register("r", "/" + "k" * 255, 0, 16))
    assert code == grpc.StatusCode.NOT_FOUND


@pytest.mark.parametrize("name", ["", "x" * 256, "a\nb"])
def test_bad_region_names_are_invalid_argument(registry: RegionRegistry, make_segment: MakeSegment,
                                               name: str) -> None:
    segment = make_segment()
    code, _ = _code(lambda: registry.register(name, "/" + segment.key, 0, 16))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_server_segments_cannot_be_registered(registry: RegionRegistry, make_segment: MakeSegment) -> None:
    own = make_segment(4096, key=f"{SERVER_PREFIX}{os.getpid()}-beacon-test")
    code, _ = _code(lambda: registry.register("r", "/" + own.key, 0, 64))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    assert len(registry) == 0


def test_missing_object_is_not_found_without_server_paths(registry: RegionRegistry) -> None:
    code, message = _code(lambda: registry.register("r", f"/{unique_key()}-missing", 0, 64))
    assert code == grpc.StatusCode.NOT_FOUND
    assert "/dev/shm" not in message


# -- bounds --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "offset, size",
    [(0, 8193), (8192, 1), (4096, 4097), (2**63, 16), (0, 2**63), (2**64 - 1, 1), (2**63 - 1, 2**63 - 1)],
)
def test_ranges_past_the_object_are_invalid_argument(
    registry: RegionRegistry, make_segment: MakeSegment, offset: int, size: int
) -> None:
    segment = make_segment(8192)
    code, _ = _code(lambda: registry.register("r", "/" + segment.key, offset, size))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert len(registry) == 0


def test_zero_byte_size_is_invalid_argument(registry: RegionRegistry, make_segment: MakeSegment) -> None:
    segment = make_segment()
    code, _ = _code(lambda: registry.register("r", "/" + segment.key, 0, 0))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_accesses_are_checked_against_the_registration(registry: RegionRegistry, make_segment: MakeSegment) -> None:
    segment = make_segment(8192)
    registry.register("r", "/" + segment.key, 4096, 1024)
    with registry.use("r") as region:
        assert region.check(0, 1024, "input") == 4096
        assert region.check(1000, 24, "input") == 5096
        for offset, size in [(0, 1025), (1024, 1), (1025, 0), (2**63, 1), (1, 2**63), (-1, 4)]:
            code, _ = _code(lambda o=offset, s=size: region.check(o, s, "input 'x'"))
            assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_unaligned_view_is_a_copy_and_aligned_view_is_not(registry: RegionRegistry, make_segment: MakeSegment) -> None:
    segment = make_segment(8192)
    segment.write(np.arange(8, dtype=np.float32).tobytes(), offset=2)
    registry.register("r", "/" + segment.key, 0, segment.size)
    with registry.use("r") as region:
        unaligned = region.view(2, 32, np.dtype(np.float32), (8,), "input")
        np.testing.assert_array_equal(unaligned, np.arange(8, dtype=np.float32))
        assert unaligned.ctypes.data % 4 == 0
        aligned = region.view(4096, 32, np.dtype(np.float32), (8,), "input")
        assert aligned.ctypes.data == region.segment.address() + 4096


def test_shrunk_object_is_invalid_argument_not_sigbus(registry: RegionRegistry, make_segment: MakeSegment) -> None:
    segment = make_segment(3 * 4096)
    registry.register("r", "/" + segment.key, 0, segment.size)
    os.ftruncate(segment.fd, 4096)
    with registry.use("r") as region:
        assert region.check(0, 4096, "input").__index__() == 0
        code, message = _code(lambda: region.view(4096, 4096, np.dtype(np.uint8), (4096,), "input 'x'"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "re-register" in message
        code, _ = _code(lambda: region.raw(8000, 100, "output 'y'"))
        assert code == grpc.StatusCode.INVALID_ARGUMENT


# -- the registry's life -------------------------------------------------------------------------------


def test_double_register_is_already_exists(registry: RegionRegistry, make_segment: MakeSegment) -> None:
    segment = make_segment()
    registry.register("r", "/" + segment.key, 0, 16)
    code, _ = _code(lambda: registry.register("r", "/" + segment.key, 0, 16))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    assert len(registry) == 1


def test_region_count_limit_is_resource_exhausted(make_segment: MakeSegment) -> None:
    registry = RegionRegistry(max_regions=3)
    try:
        segment = make_segment()
        for i in range(3):
            registry.register(f"r{i}", "/" + segment.key, 0, 16)
        code, _ = _code(lambda: registry.register("r3", "/" + segment.key, 0, 16))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        registry.unregister("r0")
        registry.register("r3", "/" + segment.key, 0, 16)
    finally:
        registry.close()


def test_mapped_bytes_limit_is_resource_exhausted(make_segment: MakeSegment) -> None:
    registry = RegionRegistry(max_mapped_bytes=12288)
    try:
        registry.register("a", "/" + make_segment(8192).key, 0, 16)
        code, _ = _code(lambda: registry.register("b", "/" + make_segment(8192).key, 0, 16))
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert registry.mapped_bytes() == 8192
    finally:
        registry.close()


def test_status_and_unregister(registry: RegionRegistry, make_segment: MakeSegment) -> None:
    segment = make_segment()
    registry.register("a", "/" + segment.key, 0, 16)
    registry.register("b", "/" + segment.key, 16, 16)
    assert sorted(r.name for r in registry.status()) == ["a", "b"]
    assert registry.status("b")[0].offset == 16
    code, _ = _code(lambda: registry.status("nope"))
    assert code == grpc.StatusCode.NOT_FOUND
    registry.unregister("nope")  # unknown names succeed
    registry.unregister("a")
    assert [r.name for r in registry.status()] == ["b"]
    registry.unregister("")  # EdgeClient regions (this segment's key) are left to their owner
    assert [r.name for r in registry.status()] == ["b"]
    other = make_segment(key=f"tritonstyle-{segment.key}")
    registry.register("c", "/" + other.key, 0, 16)
    registry.unregister("")
    assert [r.name for r in registry.status()] == ["b"]
    registry.close()  # a stopping server drops everything
    assert len(registry) == 0 and registry.mapped_bytes() == 0


def test_unregister_during_use_unmaps_when_the_call_ends(registry: RegionRegistry, make_segment: MakeSegment) -> None:
    segment = make_segment()
    segment.write(np.arange(4, dtype=np.float32))
    registry.register("r", "/" + segment.key, 0, 16)
    with registry.use("r") as region:
        view = region.view(0, 16, np.dtype(np.float32), (4,), "input")
        registry.unregister("r")
        assert region.retired
        assert [r.name for r in registry.status()] == ["r"]  # listed until the call ends, as in Triton
        np.testing.assert_array_equal(view, np.arange(4, dtype=np.float32))  # still mapped
        code, _ = _code(lambda: registry.use("r").__enter__())
        assert code == grpc.StatusCode.NOT_FOUND  # but no new call may start on it
        del view
    assert len(registry) == 0 and registry.mapped_bytes() == 0
    with pytest.raises(ValueError):
        region.segment.buffer  # noqa: B018 - unmapped once the last user left


def test_a_name_registered_again_while_its_old_region_is_in_use_takes_the_listing(
    registry: RegionRegistry, make_segment: MakeSegment
) -> None:
    segment = make_segment()
    registry.register("r", "/" + segment.key, 0, 16)
    with registry.use("r") as old:
        registry.unregister("r")
        new = registry.register("r", "/" + segment.key, 16, 16)  # the name is free again at once
        assert registry.status("r") == [new] and not new.retired
        with registry.use("r") as used:
            assert used is new
    assert old.retired and registry.status("r") == [new]  # the old call's release leaves the new one be
    with pytest.raises(ValueError):
        old.segment.buffer  # noqa: B018 - the old mapping went with its last user
    registry.unregister("r")
    assert len(registry) == 0 and registry.mapped_bytes() == 0


def test_reap_drops_regions_whose_object_was_unlinked(registry: RegionRegistry, make_segment: MakeSegment) -> None:
    kept, gone = make_segment(), make_segment()
    registry.register("kept", "/" + kept.key, 0, 16)
    registry.register("gone", "/" + gone.key, 0, 16)
    gone.unlink()
    assert registry.reap() == ["gone"]
    assert [r.name for r in registry.status()] == ["kept"]


def test_reap_drops_and_unlinks_regions_of_dead_clients(registry: RegionRegistry, make_segment: MakeSegment) -> None:
    orphan = make_segment(key=f"{CLIENT_PREFIX}{_dead_pid()}-abcdef-1")
    mine = make_segment()
    registry.register("orphan", "/" + orphan.key, 0, 16)
    registry.register("mine", "/" + mine.key, 0, 16)
    assert registry.reap() == ["orphan"]
    assert not (SHM_DIR / orphan.key).exists()
    assert (SHM_DIR / mine.key).exists()


def test_reap_leaves_regions_in_use(registry: RegionRegistry, make_segment: MakeSegment) -> None:
    segment = make_segment()
    registry.register("r", "/" + segment.key, 0, 16)
    with registry.use("r"):
        segment.unlink()
        assert registry.reap() == []
    assert registry.reap() == ["r"]


# -- races between the reaper, registers and readers ---------------------------------------------------


def test_reaper_does_not_drop_a_region_registered_again_under_the_same_name(make_segment: MakeSegment) -> None:
    """The reaper judges a snapshot; a client that meanwhile unregisters, re-creates its object under the
    same key and registers the same name again keeps its new registration and its new object."""
    key = f"{CLIENT_PREFIX}{_dead_pid()}-race-1"
    owner_pid = int(key.split("-")[2])
    fresh: list[Segment] = []

    def alive(pid: int, created: float) -> bool:
        if pid != owner_pid:
            return True  # other processes' files in /dev/shm are none of this test's business
        if not fresh:  # the reaper is looking at the old registration: swap it under its feet
            registry.unregister("r")
            old.close()
            old.unlink()
            fresh.append(make_segment(key=key))
            registry.register("r", "/" + key, 0, 16)
            return False
        return True

    registry = RegionRegistry(alive=alive)
    try:
        old = Segment.create(key, 8192)
        registry.register("r", "/" + key, 0, 16)
        assert registry.reap() == []  # the registration it judged was already gone
        (current,) = registry.status("r")
        new_stat = os.fstat(fresh[0].fd)
        assert current.identity == (new_stat.st_dev, new_stat.st_ino)
        assert os.stat(SHM_DIR / key).st_ino == new_stat.st_ino  # the new object was not unlinked
    finally:
        registry.close()


def test_region_limit_holds_for_concurrent_registers(make_segment: MakeSegment) -> None:
    registry = RegionRegistry(max_regions=4)
    segment = make_segment()
    start = threading.Barrier(16)
    codes: list[grpc.StatusCode | None] = []

    def register(i: int) -> None:
        start.wait(10)
        try:
            registry.register(f"r{i}", "/" + segment.key, 0, 16)
            codes.append(None)
        except EdgecowError as err:
            codes.append(err.code)

    threads = [threading.Thread(target=register, args=(i,)) for i in range(16)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(registry) == 4 and codes.count(None) == 4
        assert codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED) == 12
        assert registry.mapped_bytes() == 4 * segment.size
    finally:
        registry.close()


def test_counts_are_read_safely_while_other_threads_register(make_segment: MakeSegment) -> None:
    """mapped_bytes and len never iterate a table another thread is changing (GetStatus used to fail)."""
    registry = RegionRegistry()
    segment = make_segment()
    done = threading.Event()
    failures: list[BaseException] = []

    def churn() -> None:
        try:
            for i in range(300):
                registry.register(f"c{i}", "/" + segment.key, 0, 16)
                if i % 2:
                    registry.unregister(f"c{i - 1}")
        except BaseException as err:  # handed to the test thread, which asserts on it
            failures.append(err)
        finally:
            done.set()

    worker = threading.Thread(target=churn)
    worker.start()
    try:
        while not done.is_set():
            assert 0 <= registry.mapped_bytes() <= 300 * segment.size
            assert 0 <= len(registry) <= 300
        worker.join(30)
        assert failures == []
        assert len(registry) == 150 and registry.mapped_bytes() == 150 * segment.size
    finally:
        registry.close()
    assert registry.mapped_bytes() == 0


# -- the probe and who counts as local -----------------------------------------------------------------


def test_probe_reads_the_callers_token(make_segment: MakeSegment) -> None:
    segment = make_segment(64)
    token = os.urandom(32)
    segment.write(token)
    assert probe_client_segment("/" + segment.key, token) == (True, "")
    assert probe_client_segment(segment.key, os.urandom(32))[0] is False
    assert probe_client_segment(f"/{unique_key()}-missing", token)[0] is False
    assert probe_client_segment("/" + segment.key, b"short")[0] is False
    assert probe_client_segment(f"/{SERVER_PREFIX}1-beacon", token)[0] is False
    assert probe_client_segment("/../x", token)[0] is False


@pytest.mark.parametrize(
    "peer",
    ["unix:/run/edgecow/edgecow.sock", "unix:", "unix-abstract:edgecow", "ipv4:127.0.0.1:5000", "ipv4:127.8.9.1:1",
     "ipv6:[::1]:5000", "ipv6:%5B::1%5D:5000", "ipv6:%5B::ffff:127.0.0.1%5D:5000"],
)
def test_local_peers_when_loopback_is_opted_in(peer: str) -> None:
    assert is_local_peer(peer, ("unix", "loopback"))


@pytest.mark.parametrize("peer", ["ipv4:127.0.0.1:5000", "ipv6:%5B::1%5D:5000", "ipv6:%5B::ffff:127.0.0.1%5D:5000"])
def test_loopback_peers_are_remote_by_default(peer: str) -> None:
    assert not is_local_peer(peer)
    assert is_local_peer("unix:/run/edgecow/edgecow.sock")


@pytest.mark.parametrize(
    "peer",
    ["ipv4:192.0.2.2:5000", "ipv4:10.0.0.1:5000", "ipv6:%5B2001:db8::1%5D:5000", "ipv6:%5B::ffff:10.1.1.1%5D:5000",
     "ipv6:%5Bfe80::1%25eth0%5D:5000", "ipv4:1270.0.0.1:5", "", "vsock:3:5000", "ipv4:localhost:5"],
)
def test_remote_peers(peer: str) -> None:
    assert not is_local_peer(peer, ("unix", "loopback"))
