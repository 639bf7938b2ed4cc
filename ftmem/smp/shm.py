"""Named POSIX shared-memory segments, without `multiprocessing.shared_memory`.

The standard class registers every segment with a resource tracker that unlinks it when *any* process that
touched it exits, which is exactly wrong for memory that must outlive crashed ranks. Here the owner (the SMP)
creates and unlinks; everyone else only maps.
"""

from __future__ import annotations

import errno
import mmap
import os

SHM_DIR = "/dev/shm"


class ShmFullError(OSError):
    """There is no room for a segment (in /dev/shm, or address space to map it); raised before anything is
    written (never a SIGBUS later), with nothing left behind."""

    def __str__(self) -> str:
        return self.strerror  # the message names the errno's meaning; no "[Errno 28]" before it for users


def shm_dir() -> str:
    return os.environ.get("FTMEM_SHM_DIR", SHM_DIR)


def available_bytes() -> int:
    st = os.statvfs(shm_dir())
    return st.f_bavail * st.f_frsize


def list_segments(prefix: str) -> list[str]:
    return sorted(name for name in os.listdir(shm_dir()) if name.startswith(prefix))


def unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(shm_dir(), name))
    except FileNotFoundError:
        pass


class Segment:
    """A shared-memory segment mapped into this process."""

    def __init__(self, name: str, fd: int, size: int, populate: bool) -> None:
        self.name = name
        self.size = size
        flags = mmap.MAP_SHARED | (mmap.MAP_POPULATE if populate else 0)
        try:
            self._mm: mmap.mmap | None = mmap.mmap(fd, size, flags=flags)
        finally:
            os.close(fd)

    @classmethod
    def create(cls, name: str, size: int) -> "Segment":
        """Create a 0600 segment and allocate every page now, failing with a clear error if there is no room."""
        room = available_bytes()
        if size > room:
            raise ShmFullError(errno.ENOSPC, f"ftmem: shared memory {name!r} needs {size} bytes but "
                               f"{shm_dir()} has {room} available; enlarge it (e.g. docker --shm-size) or "
                               f"free memory")
        fd = os.open(os.path.join(shm_dir(), name), os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            os.close(fd)
            unlink(name)
            raise ShmFullError(exc.errno, f"ftmem: could not allocate {size} bytes for {name!r} in "
                               f"{shm_dir()}: {os.strerror(exc.errno or 0)}") from exc
        try:
            return cls(name, fd, size, populate=False)
        except OSError as exc:  # e.g. ENOMEM under RLIMIT_AS: the allocated file would stay, owned by nobody
            unlink(name)
            raise ShmFullError(exc.errno, f"ftmem: could not map the {size} bytes of {name!r} in {shm_dir()}: "
                               f"{os.strerror(exc.errno or 0)}") from exc

    @classmethod
    def open(cls, name: str, populate: bool = True) -> "Segment":
        """Map an existing segment; `populate` pre-faults the mapping so the first copy runs at full speed."""
        fd = os.open(os.path.join(shm_dir(), name), os.O_RDWR)
        size = os.fstat(fd).st_size
        return cls(name, fd, size, populate)

    @property
    def buf(self) -> mmap.mmap:
        if self._mm is None:
            raise ValueError(f"segment {self.name} is closed")
        return self._mm

    def close(self) -> None:
        """Unmap. Views of it that are still alive (peer replies zmq is still sending, which are served without a
        copy) keep the pages mapped until the last of them is released; this object is done with it either way."""
        mm, self._mm = self._mm, None
        if mm is None:
            return
        try:
            mm.close()
        except BufferError:
            pass  # `mm` is unmapped once the last view of it goes

    def unlink(self) -> None:
        unlink(self.name)
