"""The client's shared-memory segments and their pool, on the real /dev/shm.

    .venv/bin/pytest tests/unit/test_regions.py
"""

from __future__ import annotations

import hashlib
import os
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shm_client.pool import SegmentPool
from shm_client.shared.errors import NotFound
from shm_client.shared.segments import (
    CLIENT_PREFIX,
    SHM_DIR,
    Segment,
    owner_pid,
    process_alive,
    sweep_dead,
    unique_key,
)


@pytest.fixture
def key() -> Iterator[str]:
    name = unique_key() + "-t"
    yield name
    (SHM_DIR / name).unlink(missing_ok=True)


def _entries(prefix: str) -> set[str]:
    return {name for name in os.listdir(SHM_DIR) if name.startswith(prefix)}


def test_create_sets_mode_0660_whatever_the_umask(key: str) -> None:
    old = os.umask(0o077)
    try:
        segment = Segment.create(key, 10_000)
    finally:
        os.umask(old)
    try:
        info = (SHM_DIR / key).stat()
        assert stat.S_IMODE(info.st_mode) == 0o660
        assert info.st_size == 10_000 and segment.size == 10_000
        assert info.st_blocks * 512 >= 10_000  # reserved by posix_fallocate, not sparse
    finally:
        segment.close()
        segment.unlink()
    assert not (SHM_DIR / key).exists()


def test_create_refuses_an_existing_name(key: str) -> None:
    segment = Segment.create(key, 4096)
    try:
        with pytest.raises(FileExistsError):
            Segment.create(key, 4096)
    finally:
        segment.close()
        segment.unlink()


def test_open_sees_what_create_wrote(key: str) -> None:
    writer = Segment.create("/" + key, 4096)  # a leading slash is the same name
    reader = Segment.open(key)
    try:
        data = np.arange(100, dtype=np.int64)
        assert writer.write(data, offset=8) == 800
        np.testing.assert_array_equal(reader.array(np.int64, (100,), offset=8), data)
        writer.write(b"hello", offset=4000)
        assert bytes(reader.bytes_view(4000, 5)) == b"hello"
        assert reader.size == 4096 and not reader.created and writer.created
    finally:
        reader.close()
        writer.close()
        writer.unlink()


def test_open_of_a_missing_object_is_not_found(key: str) -> None:
    with pytest.raises(NotFound) as err:
        Segment.open(key)
    assert "/dev/shm" not in err.value.message


def test_close_twice_and_unlink_twice_are_harmless(key: str) -> None:
    segment = Segment.create(key, 4096)
    view = segment.array(np.uint8, (16,))
    segment.close()
    segment.close()
    view[:] = 1  # a view alive at close keeps the mapping until it is dropped
    segment.unlink()
    segment.unlink()
    assert not (SHM_DIR / key).exists()


def test_owner_pid_reads_edgecow_names_only() -> None:
    assert owner_pid("edgecow-cli-1234-abcdef-1") == 1234
    assert owner_pid("/edgecow-srv-99-beacon") == 99
    assert owner_pid("psm_1234") is None
    assert owner_pid("edgecow-cli-x-1") is None
    assert unique_key().startswith(f"{CLIENT_PREFIX}{os.getpid()}-")


def test_process_alive_tells_live_dead_and_reused_pids() -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        now = time.time()
        assert process_alive(sleeper.pid, now)
        # A live process that started after the segment was made has reused the owner's pid.
        assert not process_alive(sleeper.pid, now - 3600)
    finally:
        sleeper.kill()
        sleeper.wait()
    assert not process_alive(sleeper.pid, now)
    assert process_alive(os.getpid(), 0.0)


def test_sweep_dead_removes_only_dead_owners_segments() -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    dead = Segment.create(f"{CLIENT_PREFIX}{child.pid}-sweeptest-1", 4096)
    live = Segment.create(unique_key() + "-sweeptest", 4096)
    dead.close()
    try:
        removed = sweep_dead(CLIENT_PREFIX, process_alive)
        assert dead.key in removed
        assert not (SHM_DIR / dead.key).exists()
        assert (SHM_DIR / live.key).exists()
    finally:
        live.close()
        live.unlink()
        dead.unlink()


def test_pool_reuses_segments_and_rounds_sizes() -> None:
    pool = SegmentPool()
    try:
        first = pool.acquire(5000)
        assert first.size == 8192  # a power of two, at least one page
        pool.release(first)
        again = pool.acquire(6000)
        assert again is first
        other = pool.acquire(100)  # `first` is out, so a new one
        assert other is not first and other.size == 4096
        pool.release(again)
        pool.release(other)
        assert pool.acquire(4000) is other  # the smallest free one that fits
        assert len(pool.segments()) == 2
    finally:
        pool.close()


def test_pool_close_unlinks_everything_it_made() -> None:
    pool = SegmentPool()
    held = [pool.acquire(n) for n in (10, 5000, 70_000)]
    prefix = held[0].key.rsplit("-", 1)[0] + "-"
    assert len(_entries(prefix)) == 3
    pool.release(held[0])
    pool.close()
    assert _entries(prefix) == set()


def test_pool_evicts_idle_bytes_over_its_limit() -> None:
    pool = SegmentPool(max_idle_bytes=16384)
    try:
        big, small = pool.acquire(16384), pool.acquire(4096)
        pool.release(small)
        pool.release(big)  # 20 KiB idle > 16 KiB: the biggest goes
        evicted = pool.take_evicted()
        assert evicted == [big]
        assert pool.take_evicted() == []
        assert big not in pool.segments()
        big.close()
        big.unlink()
    finally:
        pool.close()


def test_pool_is_thread_safe() -> None:
    pool = SegmentPool()
    seen: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        for _ in range(50):
            segment = pool.acquire(4096)
            with lock:
                assert segment.key not in seen  # nobody else holds it
                seen.append(segment.key)
            segment.write(b"x" * 16)
            with lock:
                seen.remove(segment.key)
            pool.release(segment)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    try:
        assert len(pool.segments()) <= 8
    finally:
        pool.close()


def test_segment_size_matches_the_file(key: str) -> None:
    segment = Segment.create(key, 12345)
    try:
        assert Path(SHM_DIR / key).stat().st_size == 12345
        assert segment.address() != 0
    finally:
        segment.close()
        segment.unlink()


def test_pool_discard_forgets_a_segment_whose_object_vanished() -> None:
    pool = SegmentPool()
    try:
        segment = pool.acquire(100)
        segment.unlink()  # a cleaner removed the object
        pool.discard(segment)
        pool.release(segment)  # a lease handing it back later is ignored
        assert pool.segments() == []
        fresh = pool.acquire(100)
        assert fresh is not segment and (SHM_DIR / fresh.key).exists()
    finally:
        pool.close()


def test_server_beacon_is_readable_but_not_writable_by_the_group() -> None:
    from edge_server.regions import Beacon

    beacon = Beacon()
    key = beacon.key
    try:
        assert beacon.segment is not None
        info = os.stat(f"/dev/shm/{key}")
        assert stat.S_IMODE(info.st_mode) == 0o640
        seen = Segment.open(beacon.key, read_only=True)
        try:
            assert hashlib.sha256(bytes(seen.bytes_view(0, beacon.SIZE))).digest() == beacon.sha256
        finally:
            seen.close()
    finally:
        beacon.close()
    assert not os.path.exists(f"/dev/shm/{key}")
