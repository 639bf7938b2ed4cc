"""Process-wide settings of a multi-node SMP: how glibc treats its freed memory, and its CPU priority."""

from __future__ import annotations

import ctypes
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


def lower_priority(nice: int) -> None:
    """Give training the cores first: nice every thread of this process and, on Linux, its session's autogroup.

    Called once the node is recovered (a rebuild is on every rank's critical path and runs at full priority).
    Linux nices threads, not processes, hence the loop; and the SMP runs in a session of its own, so with
    autogrouping the kernel shares CPU between sessions first and a thread's nice only ranks it within the SMP.
    """
    if nice <= 0:
        return
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        tids = [0]
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, max(nice, os.getpriority(os.PRIO_PROCESS, tid)))
        except OSError:
            pass  # a thread that just ended
    try:
        with open("/proc/self/autogroup", "w") as f:
            f.write(str(nice))
    except OSError:
        pass  # no autogrouping (or not allowed): the threads' nice is all there is
