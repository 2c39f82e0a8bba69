"""Server-side registry of the system shared-memory regions clients register.

    registry = RegionRegistry(max_regions=1024, max_mapped_bytes=32 << 30)
    registry.register("in0", "/my_key", offset=0, byte_size=4096)
    with registry.use("in0") as region: view = region.view(0, 16, np.float32, (4,))   # no copy

A region is mapped once at register time, its range reserved with posix_fallocate (a sparse object
larger than the free room of /dev/shm is RESOURCE_EXHAUSTED, not a SIGBUS later) and its mapping put
under the SIGBUS guard (_sigbus_guard.c) until it is unmapped. Every use is bounds-checked against the
object's size as it is then (fstat), so a client that shrank its object between calls gets
INVALID_ARGUMENT; one that shrinks it during a call makes the guard swap zero pages in, and the call
fails with ABORTED when it releases the region, which is retired. Unregistering a region a call is
using retires it at once (new calls naming it get NOT_FOUND) but, as in Triton, it stays listed in the
status until that call ends and it is unmapped; registering its name again meanwhile replaces the listing.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import psutil

from shm_client.shared.errors import (
    Aborted,
    AlreadyExists,
    EdgecowError,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unavailable,
)
from shm_client.shared.segments import (
    CLIENT_PREFIX,
    PID_MAX_LIMIT,
    SERVER_PREFIX,
    Segment,
    open_object,
    owner_pid,
    sweep_dead,
)

try:
    from . import _sigbus_guard
except ImportError:  # pip builds it (pyproject ext-modules); missing only in a copied or broken install
    _sigbus_guard = None  # type: ignore[assignment]  # absent module; every use checks for None first

log = logging.getLogger(__name__)
NO_GUARD = (
    "edge_server._sigbus_guard is not built, so shared memory is refused (a caller could crash the "
    "server with SIGBUS); reinstall edgecow where a C compiler and the Python headers are present"
)

MAX_KEY_LENGTH = 255  # NAME_MAX for /dev/shm entries
MAX_NAME_LENGTH = 255
UINT64_MAX = 2**64 - 1


def normalize_key(key: str) -> str:
    """The object name a key refers to, or INVALID_ARGUMENT saying what is wrong with it."""
    stripped = key.lstrip("/")
    if not stripped:
        raise InvalidArgument("shared-memory key is empty; give the object's name, e.g. '/my_region'")
    size = len(stripped.encode("utf-8", "surrogatepass"))
    if size > MAX_KEY_LENGTH:
        # The kernel's NAME_MAX counts bytes: 200 two-byte characters are too long too.
        raise InvalidArgument(
            f"shared-memory key is {size} bytes long in UTF-8 ({len(stripped)} characters); the limit is "
            f"{MAX_KEY_LENGTH} bytes"
        )
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
    guard_slot: int | None = None

    @property
    def faulted(self) -> bool:
        """True once an access hit a page the object no longer backs (it shrank, or lost pages, while
        mapped): the mapping shows zero pages since, not the object, so the region cannot serve again.
        One flag read; asked while a call holds the region, so the slot cannot be let go meanwhile."""
        slot = self.guard_slot
        return slot is not None and _sigbus_guard.faulted(slot)

    def guard(self) -> None:
        try:
            self.guard_slot = _sigbus_guard.guard(self.segment.address(), self.segment.size)
        except MemoryError:
            raise ResourceExhausted(
                "the server holds as many shared-memory mappings as it can guard; unregister regions first"
            ) from None

    def close(self) -> None:
        """Stop guarding and unmap (no call may be using the region)."""
        if self.guard_slot is not None:
            _sigbus_guard.unguard(self.guard_slot)
            self.guard_slot = None
        self.segment.close()

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
        self._mapped = 0  # sum of the sizes in _regions, kept under the lock so readers never iterate
        self._lock = threading.Lock()
        self._alive = alive or pid_alive
        if _sigbus_guard is None:
            log.error(NO_GUARD)

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
        if _sigbus_guard is None:
            raise Unavailable("shared memory is unavailable on this server; send the tensors in the request")
        region = Region(name, key, offset, byte_size, Segment.open(key))
        try:
            size = region.segment.size
            if offset + byte_size > size:
                raise InvalidArgument(
                    f"shared-memory object {key!r} is {size} bytes, too small for offset {offset} + "
                    f"byte size {byte_size}"
                )
            with self._lock:
                self._check_room(name, size)  # before reserving pages for a region that could not go in
            _reserve(region.segment.fd, offset, byte_size)  # outside the lock: it may take a while
            stat = os.fstat(region.segment.fd)
            region.identity = (stat.st_dev, stat.st_ino)
            region.guard()
            with self._lock:
                # Checked again where the region goes in: concurrent registers all passed the first check.
                self._check_room(name, size)
                replaced = self._regions.get(name)
                if replaced is not None:  # retired, still in use: its calls keep it, the name is the new one's
                    self._remove(replaced)
                self._regions[name] = region
                self._mapped += size
        except BaseException:
            region.close()
            raise
        log.debug("registered shm region %s (%d bytes at %d)", name, byte_size, offset)
        return region

    def _check_room(self, name: str, size: int) -> None:
        held = self._regions.get(name)
        if held is not None and not held.retired:
            raise AlreadyExists(
                f"shared-memory region {name!r} is already registered; unregister it first or pick another name"
            )
        if len(self._regions) >= self.max_regions:
            raise ResourceExhausted(
                f"the server already holds {self.max_regions} shared-memory regions; unregister some first"
            )
        if self._mapped + size > self.max_mapped_bytes:
            raise ResourceExhausted(
                f"mapping {size} more bytes would pass the server's limit of "
                f"{self.max_mapped_bytes} mapped bytes; unregister regions first"
            )

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

    def _drop(self, victims: list[Region]) -> list[Region]:
        """Drop these very regions and return those that were still in; one that was unregistered and
        registered again under its name meanwhile is another Region and stays."""
        with self._lock:
            dropped = [region for region in victims if self._retire(region)]
            idle = [region for region in dropped if region.users == 0]
        for region in idle:
            region.close()
        return dropped

    def _retire(self, region: Region) -> bool:
        """Retire `region` (the lock is held): out of the table now when no call uses it, else when the
        last one releases it. False when it was not in the table or already retired."""
        if self._regions.get(region.name) is not region or region.retired:
            return False
        region.retired = True
        if region.users == 0:
            self._remove(region)
        return True

    def _remove(self, region: Region) -> None:
        del self._regions[region.name]
        self._mapped -= region.segment.size

    # -- use during a call -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[Region]:
        """Hold `name` for the length of a block (see acquire and release)."""
        region = self.acquire(name)
        try:
            yield region
        finally:
            self.release(region)

    def acquire(self, name: str) -> Region:
        """Hold `name` for the length of a call: an unregister meanwhile waits for the release."""
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise NotFound(f"shared-memory region {name!r} is not registered")
            if region.retired:
                raise NotFound(
                    f"shared-memory region {name!r} is being unregistered; register a region for this call"
                )
            region.users += 1
        return region

    def release(self, region: Region) -> None:
        """End a call's hold on `region`.

        A region whose object shrank while the call read or wrote it (see Region.faulted) fails the call
        with ABORTED here, whatever else the call raised (it ran on zero pages), and is retired; so does
        one that faulted in a concurrent call (the flag stays set). One flag read per call.
        """
        faulted = region.faulted
        self._release(region, retire=faulted)
        if faulted:
            raise _shrank(region)

    def _release(self, region: Region, retire: bool = False) -> None:
        with self._lock:
            region.users -= 1
            if retire:
                self._retire(region)
            unmap = region.retired and region.users == 0
            if unmap and self._regions.get(region.name) is region:
                self._remove(region)  # the last call using a retired region is over: it leaves the status now
        if unmap:
            region.close()

    def mapped_bytes(self) -> int:
        return self._mapped

    def __len__(self) -> int:
        with self._lock:
            return len(self._regions)

    # -- housekeeping ----------------------------------------------------------------------------------
    def reap(self) -> list[str]:
        """Drop registrations whose object was unlinked or whose edgecow client died; returns names."""
        with self._lock:
            regions = list(self._regions.values())
        dropped = self._drop([region for region in regions if self._owner_gone(region)])
        if dropped:
            log.info("dropped %d shared-memory registration(s) whose object or owner is gone", len(dropped))
        sweep_dead(CLIENT_PREFIX, self._alive)
        return [region.name for region in dropped]

    def _owner_gone(self, region: Region) -> bool:
        with self._lock:
            if region.users or region.retired:
                return False
            region.users += 1  # held while its fd is looked at, so it cannot be closed (and reused) meanwhile
        try:
            stat = os.fstat(region.segment.fd)
            if stat.st_nlink == 0:
                return True
            pid = owner_pid(region.key) if region.key.startswith(CLIENT_PREFIX) else None
            if pid is None or self._alive(pid, stat.st_ctime):
                return False
            _unlink_if_same(region)
            return True
        except OSError:
            return True
        finally:
            self._release(region)

    def close(self) -> None:
        """Drop every region, whoever registered it (the server is stopping)."""
        with self._lock:
            victims = list(self._regions.values())
        self._drop(victims)


def _shrank(region: Region) -> Aborted:
    return Aborted(f"shared-memory region {region.name!r} shrank during the call; re-create and re-register it")


def _reserve(fd: int, offset: int, size: int) -> None:
    """Back [offset, offset + size) with pages now: a sparse object (plain ftruncate, as tritonclient
    makes them) would otherwise fault (SIGBUS) on the first page /dev/shm has no room for."""
    try:
        os.posix_fallocate(fd, offset, size)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise ResourceExhausted(
                f"no room in /dev/shm to back the {size} bytes of this region; free shared memory or register "
                "a smaller region"
            ) from None
        if err.errno != errno.EOPNOTSUPP:
            raise
        # A filesystem that cannot reserve: the SIGBUS guard still keeps a fault from killing the server.


def _unlink_if_same(region: Region) -> None:
    """Unlink the region's name when it still names the region's object, not one made since under it."""
    path = f"/dev/shm/{region.key}"
    with contextlib.suppress(OSError):
        stat = os.lstat(path)
        if (stat.st_dev, stat.st_ino) == region.identity:
            os.unlink(path)


def pid_alive(pid: int, created_before: float) -> bool:
    """True when `pid` runs and is not a newer process that reused the number (psutil).

    Never raises: where it cannot tell, the process counts as alive, so nothing of it is removed.
    """
    if not 0 < pid <= PID_MAX_LIMIT:
        return False  # no process has such a pid (and kill() would read 0 or -1 as a process group)
    try:
        proc = psutil.Process(pid)
        return proc.create_time() <= created_before + 1.0 and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        # /proc may hide other users' processes (ProtectProc=invisible); the kernel still knows.
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            return True
        return True
    except (psutil.Error, OSError, ValueError, OverflowError):
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
    """Read `len(token)` bytes of the caller's segment and say whether they are `token`.

    Read with pread, not through a mapping: a probe object truncated meanwhile makes a short read, never
    a SIGBUS. Opened read-write like a registration, so a match means registering would work too.
    """
    if _sigbus_guard is None:
        return False, "shared memory is unavailable on this server"
    try:
        key = normalize_key(key)
        if key.startswith(SERVER_PREFIX):
            return False, "the probe key names a server segment"
        if not 8 <= len(token) <= 256:
            return False, "the probe token must be 8 to 256 bytes"
        fd = open_object(key)
    except EdgecowError as err:
        return False, err.message
    try:
        data = os.pread(fd, len(token), 0)
    except OSError:
        return False, "the server could not read the probe segment"
    finally:
        os.close(fd)
    if len(data) < len(token):
        return False, "the probe segment is smaller than the token"
    return data == token, ""
