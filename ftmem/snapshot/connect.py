"""Finding the node's SMP, and starting one when a rank runs without `ftmem-run`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from ftmem.env import SMP_LOCKED, NodeEnv, runtime_dir
from ftmem.log import get_logger
from ftmem.smp.protocol import ControlClient, SmpUnavailable

log = get_logger("hook")
START_TIMEOUT_S = 60.0


def connect(env: NodeEnv, timeout: float) -> ControlClient:
    """A client of the node's SMP. Under `ftmem-run` the launcher owns the SMP (and restarts it); otherwise the
    first rank to find none starts one in its own session, and the SMP's lock file lets only one survive."""
    client = ControlClient(env.control_address, timeout=timeout)
    managed = os.environ.get("FTMEM_MANAGED") == "1"
    try:
        client.call("ping", timeout=timeout if managed else 2.0)
        return client
    except SmpUnavailable:
        if managed:
            raise
    logfile = os.path.join(runtime_dir(), f"{env.job}.n{env.node}.smp.log")
    log.info("no SMP for job %s node %d; starting one (log: %s)", env.job, env.node, logfile)
    with open(logfile, "ab") as out:
        smp = subprocess.Popen([sys.executable, "-m", "ftmem.smp", "--job-id", env.job, "--node", str(env.node),
                                "--exit-when-done"], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                               start_new_session=True, close_fds=True)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:  # an SMP that dies at start fails the rank now, not after the whole timeout
        try:
            client.call("ping", timeout=0.5)
            return client
        except SmpUnavailable:
            code = smp.poll()
            if code not in (None, SMP_LOCKED):  # locked: another rank's SMP won the race and will answer
                raise RuntimeError(f"ftmem: the SMP started for job {env.job} node {env.node} exited with code "
                                   f"{code} before answering; see {logfile}") from None
            if time.monotonic() > deadline:
                raise SmpUnavailable(f"ftmem: no SMP for job {env.job} node {env.node} answered within "
                                     f"{START_TIMEOUT_S:.0f}s of starting one; see {logfile}") from None
