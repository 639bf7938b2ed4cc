"""Killing whole simulated nodes: each node's `ftmem-run`, the agent's workers, its SMP and its shared memory.

Only the processes of those nodes are touched, found by PID from the launcher down and from the SMP's info file;
nothing is matched by name.
"""

from __future__ import annotations

import json
import os
import signal
import time
from typing import Mapping

import psutil

from ftmem.env import NodeEnv
from ftmem.smp.shm import list_segments, unlink


def node_processes(launcher_pid: int, env: NodeEnv) -> list[psutil.Process]:
    """The launcher, all its descendants, and the node's SMP (which runs in a session of its own)."""
    procs: list[psutil.Process] = []
    try:
        launcher = psutil.Process(launcher_pid)
        procs = [launcher, *launcher.children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    try:
        with open(env.info_path) as f:
            smp = psutil.Process(json.load(f)["pid"])
        if smp.pid not in {p.pid for p in procs}:
            procs.append(smp)
    except (OSError, ValueError, KeyError, psutil.NoSuchProcess):
        pass
    return procs


def _wait_dead(procs: list[psutil.Process], timeout: float) -> None:
    """Until every process is gone or a zombie (dead, its memory released, waiting for its parent to reap it).
    Not reaped here: a launcher's parent (a shell, a scheduler, a test) owns its exit status."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_running(p) for p in procs):
            return
        time.sleep(0.005)


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_nodes(launchers: Mapping[NodeEnv, int]) -> list[int]:
    """Kill nodes {node: its launcher's pid} as if their machines died together: SIGKILL every process of every
    node first, then wait for them and unlink each node's segments and files. Returns the pids killed."""
    procs = [p for env, pid in launchers.items() for p in node_processes(pid, env)]
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    _wait_dead(procs, timeout=10)
    for env in launchers:
        for name in list_segments(env.segment_prefix):
            unlink(name)
        for path in (env.info_path, env.socket_path):
            if os.path.exists(path):
                os.unlink(path)
    return sorted(p.pid for p in procs)


def kill_node(launcher_pid: int, env: NodeEnv) -> list[int]:
    """SIGKILL every process of the node at once and unlink its segments, as if the machine died."""
    return kill_nodes({env: launcher_pid})
