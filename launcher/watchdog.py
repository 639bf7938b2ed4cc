"""Turns a hung rank into a restart from memory (DESIGN.md §1: hang of a rank → heartbeat timeout → kill).

A stuck collective or a stopped process does not crash: every rank of the job blocks at its next collective,
and torch's own timeout (30 min for gloo by default) is the only way out. The heartbeat is the work itself: the
snapshots each of this node's ranks completes in its SMP. When none of them completes one for `timeout`
seconds, the watchdog SIGKILLs the node's workers; the elastic agent then restarts them (every node's, through
the rendezvous) and they restore the newest committed step. Each node watches its own ranks, so a hang anywhere
ends everywhere within about `timeout`, since the other nodes' ranks block too.

The watch is armed only once the workers run steadily (see `Heartbeat`): start-up, compilation and a restore never
count. It runs in `ftmem-run`, the workers' parent, and kills only its own children.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Any, Callable

import psutil

from ftmem.env import NodeEnv
from ftmem.log import get_logger
from ftmem.smp.protocol import ControlClient, SmpError, SmpUnavailable

log = get_logger("run")


class Heartbeat:
    """The watchdog's judgement, apart from its I/O: given the SMP's status of its ranks, are they hung?

    They are once at least one of them committed a snapshot since its process registered (so start-up,
    compilation and a restore never count), and none of them committed, or registered, for more than `timeout`
    seconds. The SMP times both, so a hang is seen however soon it comes after the start. A rank that died is the
    agent's to handle, and a set of workers is judged hung once: the next set is judged afresh."""

    def __init__(self, timeout: float, alive: Callable[[int], bool] = psutil.pid_exists) -> None:
        self.timeout, self._alive = timeout, alive
        self.ranks: dict[int, int] = {}  # rank -> pid of the workers judged hung last

    def hung(self, ranks: dict[str, dict[str, Any]]) -> bool:
        running = [v for v in ranks.values() if not v["closed"]]
        pids = {int(r): v["pid"] for r, v in ranks.items() if not v["closed"]}
        if (not running or pids == self.ranks or not any(v["commits"] for v in running)
                or min(v["idle_s"] for v in running) <= self.timeout or not all(map(self._alive, pids.values()))):
            return False
        self.ranks = pids
        return True


class HangWatchdog:
    """Polls the node's SMP every `interval` and kills this process's workers when `Heartbeat` says so."""

    def __init__(self, env: NodeEnv, timeout: float) -> None:
        self.env, self.heartbeat = env, Heartbeat(timeout)
        self.interval = min(1.0, timeout / 5)
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="ftmem-hang-watchdog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        client = ControlClient(self.env.control_address, timeout=5.0, retry_interval=5.0)
        try:
            while not self._stopping.wait(self.interval):
                try:
                    status = client.call("status", timeout=5.0)
                except (SmpUnavailable, SmpError):
                    continue  # the SMP restarts: its supervisor handles that
                if self.heartbeat.hung(status["ranks"]):
                    self._kill_workers(status["committed"])
        finally:
            client.close()

    def _kill_workers(self, committed: int | None) -> None:
        ranks = self.heartbeat.ranks
        mine = {p.pid for p in psutil.Process(os.getpid()).children(recursive=True)}
        victims = sorted(pid for pid in ranks.values() if pid in mine)
        log.error("no rank of node %d (ranks %s) completed a snapshot for %.0fs: they look hung (a stuck collective, "
                  "a stopped process). Killing its workers %s so that they restart from the newest committed step "
                  "(%s)", self.env.node, sorted(ranks), self.heartbeat.timeout, victims, committed)
        for pid in victims:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
