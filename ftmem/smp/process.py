"""Process-wide settings of a multi-node SMP: how glibc treats its freed memory, and its CPU priority."""

from __future__ import annotations

import ctypes
import errno
import os


def keep_freed_memory() -> None:
    """Have glibc keep and reuse freed multi-MB blocks instead of unmapping them (no-op elsewhere).

    Every erasure-coding round allocates and frees chunk-sized frames (peer replies, copies served out of shared
    memory, parity); with glibc's defaults each is a fresh mmap whose pages fault in one by one, which costs more
    CPU than copying the bytes (about half of the peer path's CPU here). Chunks are at most a few MiB, under the
    32 MiB threshold set here, so they come from the heap; what is freed stays mapped up to 256 MiB."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    for param, value in ((-3, 32 << 20), (-1, 256 << 20), (-2, 16 << 20)):  # M_MMAP_THRESHOLD, M_TRIM_, M_TOP_PAD
        mallopt(ctypes.c_int(param), ctypes.c_int(value))


def autogrouping() -> bool:
    """Whether the kernel shares CPU between sessions first (Linux's autogrouping, on by default)."""
    try:
        with open("/proc/sys/kernel/sched_autogroup_enabled") as f:
            return f.read().strip() == "1" and os.path.exists("/proc/self/autogroup")
    except OSError:
        return False


def effective_nice(pid: int) -> int:
    """The nice the scheduler applies to process `pid`: its session's autogroup's with autogrouping, else its
    own (see Priority)."""
    if autogrouping():
        with open(f"/proc/{pid}/autogroup") as f:
            return int(f.read().split()[-1])  # "/autogroup-123 nice 10"
    return os.getpriority(os.PRIO_PROCESS, pid)


class Priority:
    """The SMP's CPU priority next to training: niced while EC runs in the background, full while its EC group
    recovers a node (a rebuild, and the peers serving it, are on every rank's critical path).

    The SMP runs in a session of its own, and with Linux's autogrouping (on by default) the kernel shares CPU
    between sessions first: the session's autogroup nice is what counts, and an unprivileged process may move it
    both ways within 0..19. Without autogrouping, each thread is niced instead, which cannot be undone without
    CAP_SYS_NICE: the SMP then stays niced during recoveries too.
    """

    def __init__(self) -> None:
        self.nice = 0
        self._autogroup = autogrouping()

    def set(self, nice: int) -> bool:
        """Move to `nice`; False when that cannot be done now (retry later) or at all."""
        if nice == self.nice:
            return True
        if self._autogroup:
            try:
                with open("/proc/self/autogroup", "w") as f:
                    f.write(str(nice))
                self.nice = nice
                return True
            except OSError as exc:
                if exc.errno == errno.EAGAIN:
                    return False  # the kernel allows one change per 100 ms: the caller retries
                self._autogroup = False  # not allowed here: nice the threads instead
        if nice > self.nice:
            for tid in _threads():
                try:
                    os.setpriority(os.PRIO_PROCESS, tid, nice)
                except OSError:
                    pass  # a thread that just ended
        else:
            return False
        self.nice = nice
        return True


def _threads() -> list[int]:
    try:
        return [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return [0]
