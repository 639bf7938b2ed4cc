"""Where the processes of one job meet: job id, node id and the node-local paths derived from them.

Every ftmem process (ranks, the SMP, the launcher, the CLI) derives names from these values, so a rank finds
its SMP and its segments without any other configuration. `ftmem-run` sets the variables; under plain
`torchrun` or `python` the defaults below apply.
"""

from __future__ import annotations

import glob
import json
import os
import re
from dataclasses import dataclass

import psutil

_SAFE = re.compile(r"[^A-Za-z0-9_-]")
SMP_LOCKED = 3  # exit code of `python -m ftmem.smp` finding another SMP serving its job and node (holding its lock)


def _clean_job_id(raw: str) -> str:
    job = _SAFE.sub("_", raw)[:48]
    if not job:
        raise ValueError(f"ftmem: job id {raw!r} has no usable characters (letters, digits, '_' and '-')")
    return job


def default_job_id() -> str:
    """FTMEM_JOB_ID, else torchrun's rendezvous id, else 'default'."""
    explicit = os.environ.get("FTMEM_JOB_ID")
    if explicit:
        return _clean_job_id(explicit)
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return _clean_job_id(run_id if run_id and run_id != "none" else "default")


def runtime_dir() -> str:
    """A private (0700) directory for control sockets and lock files."""
    path = os.environ.get("FTMEM_RUNTIME_DIR") or f"/tmp/ftmem-{os.getuid()}"
    os.makedirs(path, mode=0o700, exist_ok=True)
    return path


@dataclass(frozen=True)
class NodeEnv:
    """Identity of one node of one job; names of its socket, lock and segments."""

    job: str
    node: int

    @classmethod
    def from_env(cls) -> "NodeEnv":
        return cls(job=default_job_id(), node=int(os.environ.get("FTMEM_NODE_ID", "0")))

    @property
    def segment_prefix(self) -> str:
        return f"ftmem.{self.job}.n{self.node}."

    @property
    def control_address(self) -> str:
        return os.environ.get("FTMEM_SMP_ADDR") or f"ipc://{self.socket_path}"

    @property
    def socket_path(self) -> str:
        return os.path.join(runtime_dir(), f"{self.job}.n{self.node}.sock")

    @property
    def lock_path(self) -> str:
        return os.path.join(runtime_dir(), f"{self.job}.n{self.node}.lock")

    @property
    def info_path(self) -> str:
        """JSON written by the SMP: its pid, the launcher's pid, addresses (read by `ftmem status` and chaos)."""
        return os.path.join(runtime_dir(), f"{self.job}.n{self.node}.json")


def smp_process(info: dict) -> psutil.Process | None:
    """The SMP an info file (`running_smps`) names, if it still runs. An info file left by a dead SMP may name a pid
    reused since, so the process's command line must be the SMP's (`-m ftmem.smp --job-id J --node N`, as the
    launcher and `connect` start it). Unlike the SMP's lock, this check never gets in the way of an SMP starting."""
    try:
        smp = psutil.Process(info["pid"])
        args = " ".join(smp.cmdline())
    except (psutil.Error, KeyError, TypeError):
        return None
    return smp if "-m ftmem.smp" in args and f"--job-id {info.get('job')} --node {info.get('node')}" in args else None


def running_smps(job: str | None = None) -> list[dict]:
    """The info files (`NodeEnv.info_path`) of the SMPs on this machine, of `job` or of every job. An SMP removes
    its file when it stops; one killed with SIGKILL leaves it (and its pid may be reused since): see `smp_process`."""
    infos = []
    for path in sorted(glob.glob(os.path.join(runtime_dir(), f"{job or '*'}.n*.json"))):
        try:
            with open(path) as f:
                infos.append(json.load(f))
        except (OSError, ValueError):
            continue
    return infos
