"""Finding the node's SMP, and starting one when a rank runs without `ftmem-run`."""

from __future__ import annotations

import os
import subprocess
import sys

from ftmem.env import NodeEnv, runtime_dir
from ftmem.log import get_logger
from ftmem.smp.protocol import ControlClient, SmpUnavailable

log = get_logger("hook")


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
        subprocess.Popen([sys.executable, "-m", "ftmem.smp", "--job-id", env.job, "--node", str(env.node),
                          "--exit-when-done"], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                         start_new_session=True, close_fds=True)
    client.call("ping", timeout=60.0)
    return client
