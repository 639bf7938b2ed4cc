"""Turns a hung rank into a restart from memory (DESIGN.md §1: hang of a rank → heartbeat timeout → kill).

A stuck collective or a stopped process does not crash: every rank of the job blocks at its next collective,
and torch's own timeout (30 min for gloo by default) is the only way out. The heartbeat is the work itself: the
snapshots each of this node's ranks completes in its SMP. When none of them completes one for `timeout`
seconds, the watchdog SIGKILLs the node's workers; the elastic agent then restarts them (every node's, through
the rendezvous) and they restore the newest committed step. Each node watches its own ranks, so a hang anywhere
ends everywhere within about `timeout`, since the other nodes' ranks block too.

The watch is armed only between snapshots of a steady run: from a rank set's first completed snapshot on, until
the ranks change (a restart, a rank that died and is handled by the agent already). Start-up, compilation and a
restore never count. It runs in `ftmem-run`, the workers' parent, and kills only its own children.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any, Callable

import psutil

from ftmem.env import NodeEnv
from ftmem.log import get_logger
from ftmem.smp.protocol import ControlClient, SmpError, SmpUnavailable

log = get_logger("run")


class Heartbeat:
    """The watchdog's judgement, apart from its I/O: fed the SMP's `ranks` status over time, it says when the
    node's ranks look hung (once per hang: it disarms until they run steadily again)."""

    def __init__(self, timeout: float, alive: Callable[[int], bool] = psutil.pid_exists) -> None:
        self.timeout, self._alive = timeout, alive
        self.ranks: dict[int, int] = {}      # rank -> pid of the ranks being watched
        self._progress: object = None        # the newest step each had completed at the last change
        self._since: float | None = None     # when that changed last; None: not armed

    def hung(self, ranks: dict[str, dict[str, Any]], now: float) -> bool:
        open_ = {int(r): v for r, v in ranks.items() if not v["closed"]}
        pids = {r: v["pid"] for r, v in open_.items()}
        progress = sorted((r, max(v["steps"], default=-1)) for r, v in open_.items())
        if pids != self.ranks or not all(self._alive(pid) for pid in pids.values()):
            self.ranks, self._progress, self._since = pids, progress, None  # new workers, or a death handled
        elif progress != self._progress:
            self._progress, self._since = progress, now if pids else None
        elif self._since is not None and now - self._since > self.timeout:
            self._since = None
            return True
        return False


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
                if self.heartbeat.hung(status["ranks"], time.monotonic()):
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
