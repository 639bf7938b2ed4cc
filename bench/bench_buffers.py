"""A node's first snapshots: how long its ranks wait for their SMP buffers, and whether the SMP stays responsive.

A bare SMP (`python -m ftmem.smp --buffers 4`) gets the first `prepare` of `--ranks` ranks at once, each for
`--size-mb` MB (as every rank of a node does at its first snapshot). Measured: the time until every rank has
its buffer, and the slowest answer to a `ping` sent every 10 ms meanwhile (what the node's other requests and
the peers' heartbeats would wait). Baseline, side by side in the same run: creating the same segments one after
the other on one thread (`Segment.create`: posix_fallocate zeroes every page), which is what an event loop that
creates them itself spends before answering the last rank, and its stall. The SMP also reserves each rank's
other three buffers in the background, so its numbers include that work competing for the cores.

    .venv/bin/python bench/bench_buffers.py
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid

from ftmem.env import NodeEnv
from ftmem.smp.protocol import ControlClient
from ftmem.smp.shm import Segment, list_segments, unlink


def smp_first_prepares(ranks: int, nbytes: int) -> tuple[float, float]:
    """(seconds until every rank's first prepare is answered, slowest ping meanwhile)."""
    job = f"bb{uuid.uuid4().hex[:8]}"
    os.environ["FTMEM_RUNTIME_DIR"] = tempfile.mkdtemp(prefix="ftmem-bench-buffers-")
    smp = subprocess.Popen([sys.executable, "-m", "ftmem.smp", "--job-id", job, "--buffers", "4", "--timeout", "120"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    clients = [ControlClient(NodeEnv(job, 0).control_address, timeout=120.0, retry_interval=120.0)
               for _ in range(ranks + 1)]
    try:
        for r in range(ranks):
            clients[r].call("register", rank=r, world=ranks, local_rank=r, pid=os.getpid())
            clients[r].call("begin", rank=r, step=-1, epoch=1)
        slowest, stop = [0.0], threading.Event()

        def ping() -> None:
            while not stop.is_set():
                start = time.perf_counter()
                clients[ranks].call("ping")
                slowest[0] = max(slowest[0], time.perf_counter() - start)
                time.sleep(0.01)

        pinger = threading.Thread(target=ping)
        pinger.start()
        start = time.perf_counter()
        preparing = [threading.Thread(target=clients[r].call, args=("prepare",),
                                      kwargs=dict(rank=r, step=0, epoch=1, nbytes=nbytes, world=ranks, local_rank=r,
                                                  pid=os.getpid())) for r in range(ranks)]
        for t in preparing:
            t.start()
        for t in preparing:
            t.join()
        answered = time.perf_counter() - start
        stop.set()
        pinger.join()
        return answered, slowest[0]
    finally:
        for c in clients:
            c.close()
        smp.terminate()
        smp.wait(30)
        for name in list_segments(f"ftmem.{job}."):
            unlink(name)


def serial_creation(ranks: int, nbytes: int) -> float:
    names = [f"ftmem.bench-buffers-{uuid.uuid4().hex[:8]}.{r}" for r in range(ranks)]
    start = time.perf_counter()
    try:
        for name in names:
            Segment.create(name, nbytes).close()
        return time.perf_counter() - start
    finally:
        for name in names:
            unlink(name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ranks", type=int, default=4)
    p.add_argument("--size-mb", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    a = p.parse_args()
    nbytes = a.size_mb << 20
    print(f"{a.ranks} ranks' first snapshot of {a.size_mb} MB each (each SMP buffer {a.size_mb} MB + slack)")
    print(f"{'pass':>4}  {'SMP: all answered':>17}  {'SMP: slowest ping':>17}  {'serial creation':>15}  "
          f"{'answered / serial':>17}")
    for rep in range(a.reps):
        answered, slowest = smp_first_prepares(a.ranks, nbytes)
        serial = serial_creation(a.ranks, nbytes)
        print(f"{rep:>4}  {answered:>16.3f}s  {slowest:>16.3f}s  {serial:>14.3f}s  {answered / serial:>17.2f}")


if __name__ == "__main__":
    main()
