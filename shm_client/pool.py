"""A pool of shared-memory segments the client reuses across calls.

    pool = SegmentPool(); seg = pool.acquire(4096)   # the smallest free segment of >= 4096 bytes
    pool.release(seg); pool.close()                  # back to the pool; unlink everything at the end
"""

from __future__ import annotations

import threading

from .shared.segments import CLIENT_PREFIX, Segment, unique_key

MIN_SIZE_BITS = 12  # segments are at least a page (4 KiB)


class SegmentPool:
    """Segments reused across calls, so a steady stream of calls makes no shm_open/ftruncate/mmap.

    `acquire(n)` hands out the smallest free segment of at least n bytes, or creates one (sizes are
    rounded up to a power of two so a few sizes serve many requests). Thread-safe.
    """

    def __init__(self, prefix: str = CLIENT_PREFIX, max_idle_bytes: int = 1 << 30) -> None:
        self._base = unique_key(prefix)
        self._counter = 0
        self._free: dict[int, list[Segment]] = {}  # by size (a power of two), in the order released
        self._idle = 0  # bytes in _free
        self._all: dict[str, Segment] = {}
        self._evicted: list[Segment] = []
        self._lock = threading.Lock()
        self._max_idle_bytes = max_idle_bytes

    def acquire(self, nbytes: int) -> Segment:
        size = 1 << max(MIN_SIZE_BITS, (max(nbytes, 1) - 1).bit_length())
        with self._lock:
            free = self._free.get(size)
            if not free:  # none of this size: the smallest larger one
                larger = [s for s, segments in self._free.items() if s > size and segments]
                free = self._free[min(larger)] if larger else None
            if free:
                # The one free longest: a call's input and output segments keep their roles from call to
                # call (most recent first would swap them), so its request is the same bytes every time.
                segment = free.pop(0)
                self._idle -= segment.size
                return segment
            self._counter += 1
            key = f"{self._base}-{self._counter}"
        segment = Segment.create(key, size)
        with self._lock:
            self._all[segment.key] = segment
        return segment

    def release(self, segment: Segment) -> None:
        with self._lock:
            if segment.key not in self._all:
                return
            self._free.setdefault(segment.size, []).append(segment)
            self._idle += segment.size
            while self._idle > self._max_idle_bytes and self._free_count() > 1:
                largest = max(s for s, segments in self._free.items() if segments)
                victim = self._free[largest].pop(0)  # the one idle longest
                del self._all[victim.key]
                self._idle -= victim.size
                self._evicted.append(victim)

    def _free_count(self) -> int:
        return sum(len(segments) for segments in self._free.values())

    def take_evicted(self) -> list[Segment]:
        """Segments dropped from the pool since the last call; the caller unregisters, closes, unlinks."""
        with self._lock:
            evicted, self._evicted = self._evicted, []
        return evicted

    def discard(self, segment: Segment) -> None:
        """Forget a segment that can no longer serve (its object vanished); close and unlink it."""
        with self._lock:
            if self._all.pop(segment.key, None) is None:
                return
            free = self._free.get(segment.size, [])
            if segment in free:
                free.remove(segment)
                self._idle -= segment.size
        segment.close()
        segment.unlink()

    def segments(self) -> list[Segment]:
        with self._lock:
            return list(self._all.values())

    def close(self) -> None:
        """Unmap and unlink every segment the pool made."""
        with self._lock:
            segments = list(self._all.values()) + self._evicted
            self._all.clear()
            self._free.clear()
            self._idle = 0
            self._evicted = []
        for segment in segments:
            segment.close()
            segment.unlink()
