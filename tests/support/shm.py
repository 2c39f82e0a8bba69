"""Shared memory the tests own, and /dev/shm snapshots that see only this run's entries.

    with owned_segments(f"mytest-{os.getpid()}-") as make:
        segment = make("x", 4096, fill=x.tobytes())     # closed and unlinked when the block ends
    before = our_shm_entries({server.pid}); ...; assert our_shm_entries({server.pid}) == before
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterable, Iterator

from shm_client.shared.segments import SHM_DIR, Segment, owner_pid

# Keys the `segments` fixture and make_segment create carry this prefix and the test process's pid.
TEST_PREFIX = f"reltest-{os.getpid()}-"


@contextlib.contextmanager
def owned_segments(prefix: str) -> Iterator[Callable[..., Segment]]:
    """`make(suffix, size, fill=b"")` creates the segment `prefix + suffix`; all are closed and unlinked
    when the block ends (each test suite passes its own prefix, so its leak checks see only its own)."""
    made: list[Segment] = []

    def make(suffix: str, size: int, fill: bytes = b"") -> Segment:
        segment = _created(prefix + suffix, size, fill)
        made.append(segment)
        return segment

    try:
        yield make
    finally:
        for segment in made:
            segment.close()
            segment.unlink()


def make_segment(suffix: str, size: int, fill: bytes = b"") -> Segment:
    """A new segment TEST_PREFIX + `suffix` of `size` bytes starting with `fill`; the caller closes and
    unlinks it (or uses the `segments` fixture, which does)."""
    return _created(TEST_PREFIX + suffix, size, fill)


def _created(key: str, size: int, fill: bytes) -> Segment:
    segment = Segment.create(key, size)
    if fill:
        segment.write(fill)
    return segment


def our_shm_entries(pids: Iterable[int] = ()) -> set[str]:
    """/dev/shm entries this test run is responsible for: its own keys and those of `pids` and this
    process. Other suites may run beside this one, so the rest of /dev/shm is none of our business."""
    owners = {os.getpid(), *pids}
    return {name for name in os.listdir(SHM_DIR) if name.startswith(TEST_PREFIX) or owner_pid(name) in owners}


def owned_by(pid: int, names: Iterable[str]) -> set[str]:
    """The edgecow segment names among `names` that process `pid` made (as a client or as a server)."""
    return {name for name in names if name.startswith((f"edgecow-cli-{pid}-", f"edgecow-srv-{pid}-"))}
