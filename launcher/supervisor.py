"""Keeps the node's SMP alive for the duration of `ftmem-run`: start, restart on death, stop."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

from ftmem.env import SMP_LOCKED, NodeEnv, runtime_dir
from ftmem.log import get_logger
from ftmem.smp.protocol import ControlClient, SmpError, SmpUnavailable

log = get_logger("run")
QUICK_EXIT_S = 10.0  # an SMP dying sooner after its start is crash-looping: its restarts back off
BACKOFF_MAX_S = 10.0


class SmpSupervisor:
    def __init__(self, env: NodeEnv, smp_args: list[str], timeout: float) -> None:
        self.env = env
        self.smp_args = smp_args
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None
        self.restarts = 0
        self._spawned_at = 0.0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="ftmem-smp-watch", daemon=True)
        self.logfile = f"{runtime_dir()}/{env.job}.n{env.node}.smp.log"

    def _spawn(self) -> None:
        with open(self.logfile, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ftmem.smp", "--job-id", self.env.job, "--node", str(self.env.node),
                 "--parent-pid", str(os.getpid()), *self.smp_args],
                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True, close_fds=True)
        self._spawned_at = time.monotonic()

    def start(self) -> None:
        self._spawn()
        self._wait_ready()
        log.info("SMP for job %s node %d running (pid %d, log %s)", self.env.job, self.env.node, self.proc.pid,
                 self.logfile)
        self._thread.start()

    def _wait_ready(self) -> None:
        client = ControlClient(self.env.control_address, timeout=self.timeout, retry_interval=1.0)
        deadline = time.monotonic() + self.timeout
        try:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    if self.proc.returncode == SMP_LOCKED:
                        raise SystemExit(f"ftmem-run: another SMP already serves job {self.env.job} node "
                                         f"{self.env.node}; is the same job running? (see {self.logfile})")
                    raise SystemExit(f"ftmem-run: the SMP exited with code {self.proc.returncode} at start; "
                                     f"see {self.logfile}")
                try:
                    client.call("ping", timeout=1.0)
                    return
                except SmpUnavailable:
                    continue
            raise SystemExit(f"ftmem-run: the SMP did not come up within {self.timeout:.0f}s; see {self.logfile}")
        finally:
            client.close()

    def _watch(self) -> None:
        """Restart the SMP when it dies: at once after a crash, with a backoff doubling from 0.5 s (to
        BACKOFF_MAX_S) while it keeps dying within QUICK_EXIT_S of its start, so that an SMP that cannot run
        does not take a core from training in a restart loop."""
        quick = 0
        while not self._stopping.is_set():
            code = self.proc.poll()
            if code is None:
                self._stopping.wait(0.2)
                continue
            if self._stopping.is_set():
                return
            self.restarts += 1
            ran = time.monotonic() - self._spawned_at
            quick = quick + 1 if ran < QUICK_EXIT_S else 0
            delay = min(BACKOFF_MAX_S, 0.5 * 2 ** (quick - 2)) if quick > 1 else 0.0
            log.warning("SMP of node %d exited with code %s; restarting it (restart %d)%s: it ran %.1fs, see %s",
                        self.env.node, code, self.restarts, f" in {delay:.1f}s" if delay else "", ran, self.logfile)
            if self._stopping.wait(delay):
                return
            self._spawn()

    def stop(self, cleanup: bool) -> None:
        """Ask the SMP to exit (removing the job's segments when `cleanup`), then make sure it has."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()
        client = ControlClient(self.env.control_address, timeout=10.0, retry_interval=2.0)
        try:
            client.call("shutdown", cleanup=cleanup)
        except (SmpUnavailable, SmpError) as exc:
            log.warning("could not shut the SMP down cleanly: %s", exc)
        finally:
            client.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            log.warning("SMP (pid %d) did not exit; killing it", self.proc.pid)
            self.proc.kill()
            self.proc.wait(timeout=10)
