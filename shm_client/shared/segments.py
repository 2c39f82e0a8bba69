"""POSIX shared-memory segments: create or open, map, view as ndarray, close and unlink; and a pool.

    seg = Segment.create("edgecow-cli-123-ab-0", 1 << 20)   # /dev/shm/edgecow-cli-123-ab-0, mode 0660
    seg.array(np.float32, (256, 256))[:] = x; seg.close(); seg.unlink()

Segments are reserved with posix_fallocate, so a full /dev/shm fails here with ResourceExhausted instead
of killing a later writer with SIGBUS.
"""

from __future__ import annotations

import errno
import grp
import math
import mmap
import os
import re
import secrets
import stat
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import posix_ipc

from .errors import InvalidArgument, NotFound, PermissionDenied, ResourceExhausted

SHM_DIR = Path("/dev/shm")
CLIENT_PREFIX = "edgecow-cli-"
SERVER_PREFIX = "edgecow-srv-"
PID_MAX_LIMIT = 4194304  # the kernel's ceiling for pid_max: no process has a larger pid
# Exactly the names unique_key, SegmentPool and the server's beacon make. /dev/shm is world-writable, so
# anything else carrying our prefix (a pid of 20 digits, 0, leading zeros, odd characters) is someone
# else's file and must not be read as an owner.
_OWNED = re.compile(r"edgecow-(?:cli|srv)-([1-9][0-9]{0,6})-[A-Za-z0-9_-]+")
_OPEN_FLAGS = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY


def owner_pid(key: str) -> int | None:
    """The pid encoded in an edgecow segment name, None for any other name."""
    match = _OWNED.fullmatch(key.lstrip("/"))
    if match is None:
        return None
    pid = int(match.group(1))
    return pid if pid <= PID_MAX_LIMIT else None


def open_object(key: str, read_only: bool = False) -> int:
    """A file descriptor on the regular object /dev/shm/<key>, or the error the caller can act on.

    O_NOFOLLOW: a symlink planted in the world-writable /dev/shm must never make a process (the server,
    with its own rights) open a file elsewhere. O_NONBLOCK: a FIFO there cannot hang the open. Only
    regular files pass; the messages name the caller's key, never a path.
    """
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | _OPEN_FLAGS
    try:
        fd = os.open(SHM_DIR / key, flags)
    except OSError as err:
        raise _open_error(err, key) from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as err:
        os.close(fd)
        raise _open_error(err, key) from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise _not_an_object(key)
    return fd


def _open_error(err: OSError, key: str) -> Exception:
    if err.errno == errno.ENOENT:
        return NotFound(f"shared-memory object {key!r} does not exist")
    if err.errno in (errno.EACCES, errno.EPERM):
        return PermissionDenied(f"no permission to open shared-memory object {key!r}")
    if err.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM):
        return ResourceExhausted(
            f"no file descriptor or memory is left to open shared-memory object {key!r}; unregister regions "
            "or retry later"
        )
    if err.errno == errno.ENAMETOOLONG:
        return InvalidArgument("shared-memory key is longer than the 255 bytes an object name may have")
    if err.errno in (errno.ELOOP, errno.EISDIR, errno.ENOTDIR, errno.ENXIO, errno.ENODEV, errno.EINVAL, errno.ETXTBSY):
        return _not_an_object(key)
    return err


def _not_an_object(key: str) -> InvalidArgument:
    return InvalidArgument(
        f"shared-memory key {key!r} names a link, directory or device, not a shared-memory object; "
        "register an object made with shm_open"
    )


def _group_id(group: str | None) -> int | None:
    if not group:
        return None
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        return None
    return gid if gid in os.getgroups() or gid == os.getgid() else None


class Segment:
    """A POSIX shared-memory object mapped read-write in this process."""

    def __init__(self, key: str, fd: int, size: int, created: bool, read_only: bool = False) -> None:
        self.key = key.lstrip("/")
        self.size = size
        self.created = created
        self._fd = fd
        access = mmap.ACCESS_READ if read_only else mmap.ACCESS_WRITE
        self._map: mmap.mmap | None = mmap.mmap(fd, size, access=access) if size else None
        self._address: int | None = None
        self._closed = False

    @classmethod
    def create(cls, key: str, size: int, mode: int = 0o660, group: str | None = "edgecow") -> Segment:
        """A new segment of `size` bytes (reserved now), mode set explicitly so the umask cannot cut it.

        When `group` exists and this process belongs to it, the segment is handed to that group, so a
        server running as another user in the group can map it.
        """
        key = key.lstrip("/")
        try:
            shm = posix_ipc.SharedMemory("/" + key, posix_ipc.O_CREX, mode=mode)
        except posix_ipc.ExistentialError:
            raise FileExistsError(f"shared-memory segment {key!r} already exists") from None
        fd = shm.fd
        try:
            os.fchmod(fd, mode)
            gid = _group_id(group)
            if gid is not None and os.fstat(fd).st_gid != gid:
                os.fchown(fd, -1, gid)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as err:
                if err.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
                    raise ResourceExhausted(
                        f"no room in {SHM_DIR} for a {size}-byte segment; free shared memory or enlarge the tmpfs"
                    ) from None
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                os.ftruncate(fd, size)
            return cls(key, fd, size, created=True)
        except BaseException:
            os.close(fd)
            _unlink_quietly(key)
            raise

    @classmethod
    def open(cls, key: str, read_only: bool = False) -> Segment:
        """Map an existing regular object whole, read-write unless `read_only` (see open_object)."""
        key = key.lstrip("/")
        fd = open_object(key, read_only)
        try:
            return cls(key, fd, os.fstat(fd).st_size, created=False, read_only=read_only)
        except OSError as err:
            # mmap dups the descriptor (EMFILE here too) and can run out of mappings (ENOMEM).
            os.close(fd)
            raise _open_error(err, key) from None
        except BaseException:
            os.close(fd)
            raise

    @property
    def fd(self) -> int:
        return self._fd

    @property
    def buffer(self) -> mmap.mmap:
        if self._map is None:
            raise ValueError(f"segment {self.key!r} is empty or closed")
        return self._map

    def address(self) -> int:
        """The address of the mapping's first byte in this process."""
        if self._address is None:
            self._address = np.frombuffer(self.buffer, dtype=np.uint8, count=1).ctypes.data
        return self._address

    def array(self, dtype: np.dtype | type, shape: tuple[int, ...], offset: int = 0) -> np.ndarray:
        """A numpy view (no copy) of `shape` elements of `dtype` starting `offset` bytes in."""
        dtype = np.dtype(dtype)
        count = math.prod(shape)
        return np.frombuffer(self.buffer, dtype=dtype, count=count, offset=offset).reshape(shape)

    def bytes_view(self, offset: int, size: int) -> memoryview:
        return memoryview(self.buffer)[offset : offset + size]

    def write(self, data: bytes | memoryview | np.ndarray, offset: int = 0) -> int:
        """Copy `data` in at `offset`; returns the number of bytes written."""
        if isinstance(data, np.ndarray):
            flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
            np.frombuffer(self.buffer, dtype=np.uint8, count=flat.size, offset=offset)[:] = flat
            return flat.size
        view = memoryview(data).cast("B")
        self.buffer[offset : offset + view.nbytes] = view
        return view.nbytes

    def close(self) -> None:
        """Unmap and close; a view still alive keeps the mapping until it is dropped."""
        if self._closed:
            return
        self._closed = True
        if self._map is not None:
            try:
                self._map.close()
            except BufferError:
                pass  # numpy views still point into it; the mapping goes when they do
            self._map = None
        os.close(self._fd)

    def unlink(self) -> None:
        _unlink_quietly(self.key)


def _unlink_quietly(key: str) -> None:
    try:
        posix_ipc.unlink_shared_memory("/" + key)
    except (posix_ipc.ExistentialError, posix_ipc.PermissionsError):
        pass


def unique_key(prefix: str = CLIENT_PREFIX) -> str:
    """A fresh segment name carrying this process's pid, so a reaper can tell when its owner died."""
    return f"{prefix}{os.getpid()}-{secrets.token_hex(6)}"


def sweep_dead(prefix: str, alive: Callable[[int, float], bool]) -> list[str]:
    """Unlink /dev/shm entries named `prefix<pid>-...` whose owner `alive(pid, ctime)` says is gone."""
    removed: list[str] = []
    try:
        entries = list(os.scandir(SHM_DIR))
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid = owner_pid(entry.name)
        if pid is None:
            continue
        try:
            # Symlinks and directories are never ours; unlinking a symlink's target is not ours to do either.
            if not entry.is_file(follow_symlinks=False):
                continue
            ctime = entry.stat(follow_symlinks=False).st_ctime
        except OSError:
            continue
        if not alive(pid, ctime):
            try:
                os.unlink(entry.path)
                removed.append(entry.name)
            except OSError:
                pass
    return removed


def process_alive(pid: int, created_before: float) -> bool:
    """True when `pid` runs and started before `created_before` (so it is not a reused pid).

    Never raises: where it cannot tell, the process counts as alive, so nothing of it is removed.
    """
    if pid == os.getpid():
        return True
    if not 0 < pid <= PID_MAX_LIMIT:
        return False  # no process has such a pid (and 0 or -1 would make kill() mean a process group)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        start_ticks = int(fields[19])
        with open("/proc/uptime", "rb") as fh:
            uptime = float(fh.read().split()[0])
        started = time.time() - uptime + start_ticks / os.sysconf("SC_CLK_TCK")
        return started <= created_before + 1.0
    except (OSError, IndexError, ValueError):
        return True
