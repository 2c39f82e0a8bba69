"""A pool of shared-memory segments the client reuses across calls.

    pool = SegmentPool(); seg = pool.acquire(4096)   # the smallest free segment of >= 4096 bytes
    pool.release(seg); pool.close()                  # back to the pool; unlink everything at the end
"""

from __future__ import annotations

import threading

from .shared.segments import CLIENT_PREFIX, Segment, unique_key


class SegmentPool:
    """Segments reused across calls, so a steady stream of calls makes no shm_open/ftruncate/mmap.

    `acquire(n)` hands out the smallest free segment of at least n bytes, or creates one (sizes are
    rounded up to a power of two so a few sizes serve many requests). Thread-safe.
    """

    def __init__(self, prefix: str = CLIENT_PREFIX, max_idle_bytes: int = 1 << 30) -> None:
        self._base = unique_key(prefix)
        self._counter = 0
        self._free: list[Segment] = []
        self._all: dict[str, Segment] = {}
        self._evicted: list[Segment] = []
        self._lock = threading.Lock()
        self._max_idle_bytes = max_idle_bytes

    def acquire(self, nbytes: int) -> Segment:
        with self._lock:
            fits = [seg for seg in self._free if seg.size >= nbytes]
            if fits:
                best = min(fits, key=lambda seg: seg.size)
                self._free.remove(best)
                return best
            self._counter += 1
            key = f"{self._base}-{self._counter}"
        size = 1 << max(12, (max(nbytes, 1) - 1).bit_length())
        segment = Segment.create(key, size)
        with self._lock:
            self._all[segment.key] = segment
        return segment

    def release(self, segment: Segment) -> None:
        with self._lock:
            if segment.key not in self._all:
                return
            self._free.append(segment)
            idle = sum(seg.size for seg in self._free)
            while idle > self._max_idle_bytes and len(self._free) > 1:
                victim = max(self._free, key=lambda seg: seg.size)
                self._free.remove(victim)
                del self._all[victim.key]
                idle -= victim.size
                self._evicted.append(victim)

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
            if segment in self._free:
                self._free.remove(segment)
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
            self._evicted = []
        for segment in segments:
            segment.close()
            segment.unlink()
