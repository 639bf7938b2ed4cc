"""Deterministic faults for drills: kill this process, or slow it down, at an exact phase of the protocol.

`FTMEM_CRASH_AT="point@step[@rank],..."` arms crash points (step `*`: the first time the point is reached); each
fires at most once per `FTMEM_CRASH_MARKER` path (a file created when it fires), so the restarted process runs on
instead of crashing again. `FTMEM_STALL_AT="point[#n]=seconds,..."` makes every pass through a point (with `#n`:
only its n-th pass in this process) take that much longer: a phase that cannot keep up, such as the erasure coder
of a busy node, or a moment held open for a drill to strike in. Unset, each costs one dictionary lookup. (From
outside a job: `ftmem-chaos`.)
"""

from __future__ import annotations

import os
import signal
import time

POINTS = ("mid_copy", "before_local_commit", "after_local_commit", "smp_after_local_commit", "smp_mid_encode",
          "smp_serving_rebuild", "smp_ec_result_sent")
_passes: dict[str, int] = {}


def fault_point(point: str, step: int, rank: int | None = None) -> None:
    _stall(point)
    spec = os.environ.get("FTMEM_CRASH_AT")
    if not spec:
        return
    for item in spec.split(","):
        fields = item.strip().split("@")
        if fields[0] != point or fields[1] not in ("*", str(step)):
            continue
        if len(fields) > 2 and rank is not None and int(fields[2]) != rank:
            continue
        marker = os.environ.get("FTMEM_CRASH_MARKER")
        if marker:
            try:
                os.close(os.open(f"{marker}.{point}.{fields[1]}", os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            except FileExistsError:
                return
        os.kill(os.getpid(), signal.SIGKILL)


def _stall(point: str) -> None:
    spec = os.environ.get("FTMEM_STALL_AT")
    if not spec:
        return
    passes = _passes[point] = _passes.get(point, 0) + 1
    for item in spec.split(","):
        name, _, seconds = item.strip().partition("=")
        name, _, nth = name.partition("#")
        if name == point and (not nth or int(nth) == passes):
            time.sleep(float(seconds))
