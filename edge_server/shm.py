"""Server-side registry of the system shared-memory regions clients register.

    registry = RegionRegistry(max_regions=1024, max_mapped_bytes=32 << 30)
    registry.register("in0", "/my_key", offset=0, byte_size=4096)
    with registry.use("in0") as region: view = region.view(0, 16, np.float32, (4,))   # no copy

A region is mapped once at register time. Every access is bounds-checked against the object's size
as it is now (fstat per use), so a client that shrinks its object gets INVALID_ARGUMENT instead of
killing the server with SIGBUS. Unregistering a region a call is using retires it at once and unmaps
it when that call ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import psutil

from shm_client.errors import (
    AlreadyExists,
    EdgecowError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
)
from shm_client.regions import CLIENT_PREFIX, SERVER_PREFIX, Segment, owner_pid, sweep_dead

log = logging.getLogger(__name__)

MAX_KEY_LENGTH = 255  # NAME_MAX for /dev/shm entries
MAX_NAME_LENGTH = 255
UINT64_MAX = 2**64 - 1


def normalize_key(key: str) -> str:
    """The object name a key refers to, or INVALID_ARGUMENT saying what is wrong with it."""
    stripped = key.lstrip("/")
    if not stripped:
        raise InvalidArgument("shared-memory key is empty; give the object's name, e.g. '/my_region'")
    if len(stripped) > MAX_KEY_LENGTH:
        raise InvalidArgument(f"shared-memory key is {len(stripped)} characters long; the limit is {MAX_KEY_LENGTH}")
    if "/" in stripped:
        raise InvalidArgument("shared-memory key may not contain '/' after its leading slash")
    if stripped in {".", ".."} or ".." in stripped:
        raise InvalidArgument("shared-memory key may not contain '..'")
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in stripped) or not stripped.isprintable():
        raise InvalidArgument("shared-memory key contains control or non-printable characters")
    return stripped


def check_region_name(name: str) -> None:
    if not name:
        raise InvalidArgument("shared-memory region name is empty")
    if len(name) > MAX_NAME_LENGTH or not name.isprintable():
        raise InvalidArgument(
            f"shared-memory region name must be printable and at most {MAX_NAME_LENGTH} characters"
        )


@dataclass
class Region:
    """One registration: a name for [offset, offset + byte_size) of a mapped object."""

    name: str
    key: str
    offset: int
    byte_size: int
    segment: Segment
    # (st_dev, st_ino) of the object at register time: two keys (a hard link) can name one object, so
    # questions such as "do these regions overlap" are asked of the object, not of the key.
    identity: tuple[int, int] = (0, 0)
    users: int = 0
    retired: bool = False

    def check(self, offset: int, size: int, what: str) -> int:
        """The absolute offset of [offset, offset + size) in the object, after checking it fits the
        registration and the object as it is now."""
        if offset < 0 or size < 0:
            raise InvalidArgument(f"{what}: shared-memory offset and byte size must not be negative")
        if offset > self.byte_size or size > self.byte_size - offset:
            raise InvalidArgument(
                f"{what}: offset {offset} + byte size {size} runs past the end of region {self.name!r} "
                f"({self.byte_size} bytes)"
            )
        absolute = self.offset + offset
        current = os.fstat(self.segment.fd).st_size
        if absolute + size > min(current, self.segment.size):
            raise InvalidArgument(
                f"{what}: region {self.name!r} shrank to {current} bytes after it was registered; "
                "re-register it at its new size"
            )
        return absolute

    def view(self, offset: int, size: int, dtype: np.dtype, shape: tuple[int, ...], what: str) -> np.ndarray:
        """A numpy array over the mapping (no copy) for `size` bytes at `offset` in the region."""
        absolute = self.check(offset, size, what)
        raw = np.frombuffer(self.segment.buffer, dtype=np.uint8, count=size, offset=absolute)
        if dtype.itemsize and absolute % dtype.itemsize:
            return raw.copy().view(dtype).reshape(shape)  # unaligned: onnxruntime needs aligned data
        return raw.view(dtype).reshape(shape)

    def raw(self, offset: int, size: int, what: str) -> memoryview:
        absolute = self.check(offset, size, what)
        return memoryview(self.segment.buffer)[absolute : absolute + size]


class RegionRegistry:
    """Registered regions by name. Thread-safe; lookups take one short lock."""

    def __init__(
        self,
        max_regions: int = 1024,
        max_mapped_bytes: int = 32 << 30,
        alive: Callable[[int, float], bool] | None = None,
    ) -> None:
        self.max_regions = max_regions
        self.max_mapped_bytes = max_mapped_bytes
        self._regions: dict[str, Region] = {}
        self._lock = threading.Lock()
        self._alive = alive or pid_alive

    # -- the three RPCs --------------------------------------------------------------------------------
    def register(self, name: str, key: str, offset: int, byte_size: int) -> Region:
        check_region_name(name)
        key = normalize_key(key)
        if key.startswith(SERVER_PREFIX):
            raise PermissionDenied(f"shared-memory key {key!r} names one of the server's own segments")
        if offset > UINT64_MAX // 2 or byte_size > UINT64_MAX // 2:
            raise InvalidArgument("shared-memory offset or byte size is out of range")
        if byte_size == 0:
            raise InvalidArgument("shared-memory byte_size is 0; register the bytes the region will hold")
        with self._lock:
            if name in self._regions:
                raise AlreadyExists(
                    f"shared-memory region {name!r} is already registered; unregister it first or pick another name"
                )
            if len(self._regions) >= self.max_regions:
                raise ResourceExhausted(
                    f"the server already holds {self.max_regions} shared-memory regions; unregister some first"
                )
        segment = Segment.open(key)
        try:
            if offset + byte_size > segment.size:
                raise InvalidArgument(
                    f"shared-memory object {key!r} is {segment.size} bytes, too small for offset {offset} + "
                    f"byte size {byte_size}"
                )
            stat = os.fstat(segment.fd)
            region = Region(name, key, offset, byte_size, segment, identity=(stat.st_dev, stat.st_ino))
            with self._lock:
                if name in self._regions:
                    raise AlreadyExists(f"shared-memory region {name!r} is already registered")
                if self.mapped_bytes() + segment.size > self.max_mapped_bytes:
                    raise ResourceExhausted(
                        f"mapping {segment.size} more bytes would pass the server's limit of "
                        f"{self.max_mapped_bytes} mapped bytes; unregister regions first"
                    )
                self._regions[name] = region
        except BaseException:
            segment.close()
            raise
        log.debug("registered shm region %s (%d bytes at %d)", name, byte_size, offset)
        return region

    def status(self, name: str = "") -> list[Region]:
        with self._lock:
            if not name:
                return list(self._regions.values())
            region = self._regions.get(name)
        if region is None:
            raise NotFound(f"shared-memory region {name!r} is not registered")
        return [region]

    def unregister(self, name: str = "") -> None:
        """Drop `name`; unknown names succeed. Regions in use unmap when their calls end.

        An empty name drops every region except those of EdgeClients (keys `edgecow-cli-<pid>-...`): the
        protocol means "all of the caller's regions", and tritonclient's examples begin with an
        unregister-all that would otherwise pull the regions out from under every other process.
        EdgeClients unregister their own on close, and the reaper takes those of dead ones.
        """
        with self._lock:
            if name:
                victims = [r for r in [self._regions.get(name)] if r]
            else:
                victims = [r for r in self._regions.values() if not r.key.startswith(CLIENT_PREFIX)]
        self._drop(victims)

    def _drop(self, victims: list[Region]) -> None:
        with self._lock:
            victims = [r for r in victims if self._regions.get(r.name) is r]
            for region in victims:
                del self._regions[region.name]
                region.retired = True
            idle = [region for region in victims if region.users == 0]
        for region in idle:
            region.segment.close()

    # -- use during a call -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[Region]:
        """Hold `name` for the length of a call: an unregister meanwhile waits for the release."""
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise NotFound(f"shared-memory region {name!r} is not registered")
            region.users += 1
        try:
            yield region
        finally:
            with self._lock:
                region.users -= 1
                unmap = region.retired and region.users == 0
            if unmap:
                region.segment.close()

    def mapped_bytes(self) -> int:
        return sum(region.segment.size for region in self._regions.values())

    def __len__(self) -> int:
        return len(self._regions)

    # -- housekeeping ----------------------------------------------------------------------------------
    def reap(self) -> list[str]:
        """Drop registrations whose object was unlinked or whose edgecow client died; returns names."""
        dropped = []
        with self._lock:
            regions = list(self._regions.values())
        for region in regions:
            if region.users:
                continue
            try:
                gone = os.fstat(region.segment.fd).st_nlink == 0
            except OSError:
                gone = True
            pid = owner_pid(region.key) if region.key.startswith(CLIENT_PREFIX) else None
            if not gone and pid is not None:
                try:
                    created = os.fstat(region.segment.fd).st_ctime
                except OSError:
                    created = 0.0
                if not self._alive(pid, created):
                    gone = True
                    with contextlib.suppress(OSError):
                        os.unlink(f"/dev/shm/{region.key}")
            if gone:
                self.unregister(region.name)
                dropped.append(region.name)
        if dropped:
            log.info("dropped %d shared-memory registration(s) whose object or owner is gone", len(dropped))
        sweep_dead(CLIENT_PREFIX, self._alive)
        return dropped

    def close(self) -> None:
        """Drop every region, whoever registered it (the server is stopping)."""
        with self._lock:
            victims = list(self._regions.values())
        self._drop(victims)


def pid_alive(pid: int, created_before: float) -> bool:
    """True when `pid` runs and is not a newer process that reused the number (psutil)."""
    try:
        proc = psutil.Process(pid)
        return proc.create_time() <= created_before + 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        # /proc may hide other users' processes (ProtectProc=invisible); the kernel still knows.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    except psutil.Error:
        return True


class Beacon:
    """The server's own segment that proves to a client that it sees the server's shared memory.

    It holds random bytes whose hash the probe RPC returns; it is created at start (mode 0640,
    reserved with posix_fallocate) and unlinked at stop. Segments of dead earlier servers go at start.
    """

    SIZE = 64

    def __init__(self) -> None:
        removed = sweep_dead(SERVER_PREFIX, pid_alive)
        if removed:
            log.info("removed %d shared-memory segment(s) left by a dead edgecow server", len(removed))
        self.segment: Segment | None = None
        token = secrets.token_bytes(self.SIZE)
        self.sha256 = hashlib.sha256(token).digest()
        try:
            # 0640: clients of the group can read the proof but not overwrite (or hard-link) it.
            self.segment = Segment.create(f"{SERVER_PREFIX}{os.getpid()}-beacon", self.SIZE, mode=0o640)
            self.segment.write(token)
        except (OSError, EdgecowError) as err:
            log.warning("cannot create the shared-memory beacon (%s); clients will use gRPC", err)
            self.segment = None

    @property
    def key(self) -> str:
        return self.segment.key if self.segment else ""

    def close(self) -> None:
        if self.segment is not None:
            self.segment.close()
            self.segment.unlink()
            self.segment = None


def probe_client_segment(key: str, token: bytes) -> tuple[bool, str]:
    """Read `len(token)` bytes of the caller's segment and say whether they are `token`."""
    try:
        key = normalize_key(key)
        if key.startswith(SERVER_PREFIX):
            return False, "the probe key names a server segment"
        if not 8 <= len(token) <= 256:
            return False, "the probe token must be 8 to 256 bytes"
        segment = Segment.open(key)
    except EdgecowError as err:
        return False, err.message
    try:
        if segment.size < len(token):
            return False, "the probe segment is smaller than the token"
        return bytes(segment.bytes_view(0, len(token))) == token, ""
    finally:
        segment.close()
