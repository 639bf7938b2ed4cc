"""Fixtures for tests that run real ftmem processes: unique job ids, private runtime dirs, free ports, and
cleanup of every child process and shared-memory segment a test leaves, even when it fails."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest

from ftmem.smp.protocol import ControlClient, SmpUnavailable
from ftmem.smp.shm import list_segments, unlink

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "train_gpt.py"


_EPHEMERAL_LOW = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
_handed_out: set[int] = set()


def free_port() -> int:
    """A free TCP port for a process to bind later. It lies below the kernel's ephemeral range, which bind(0)
    and connect() draw from, so no other process of the suite is handed it meanwhile (a launcher binds its
    rendezvous port only after importing torch, seconds later); pytest-xdist workers draw from disjoint sets."""
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw"))
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    for _ in range(1000):
        port = random.randrange(10_000 + worker, _EPHEMERAL_LOW, workers)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    raise RuntimeError(f"no free port in [10000, {_EPHEMERAL_LOW})")


def rank_identity(rank: int, world: int = 8) -> dict[str, int]:
    """The fields a rank's `register` and `prepare` name it by (the pid the tests register it with). An SMP takes
    the world from `prepare` only when it knows none (it restarted since the ranks registered)."""
    return {"world": world, "local_rank": rank, "pid": 1000 + rank}


class Cluster:
    """Processes of one test job; each is started in its own session so it can be ended by process group."""

    def __init__(self, tmp: Path) -> None:
        self.job = f"t{uuid.uuid4().hex[:10]}"
        self.tmp = tmp
        self.runtime = tmp / "run"
        self.runtime.mkdir(mode=0o700)
        self.procs: list[tuple[subprocess.Popen, Path]] = []
        self.clients: list[ControlClient] = []
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "FTMEM_RUNTIME_DIR": str(self.runtime),
                    "FTMEM_JOB_ID": self.job, "PYTHONUNBUFFERED": "1", "FTMEM_TIMEOUT": "120"}

    def start(self, args: list[str], name: str, **env: str) -> subprocess.Popen:
        log = self.tmp / f"{name}.log"
        out = open(log, "wb")
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env={**self.env, **env}, start_new_session=True, cwd=self.tmp)
        out.close()
        self.procs.append((proc, log))
        return proc

    def ftmem_run(self, torchrun_args: list[str], script_args: list[str], name: str = "run", **env: str):
        return self.start([sys.executable, "-m", "ftmem.launcher.main", *torchrun_args, str(EXAMPLE),
                           *script_args], name, **env)

    def python(self, args: list[str], name: str, **env: str) -> subprocess.Popen:
        return self.start([sys.executable, *args], name, **env)

    def wait(self, proc: subprocess.Popen, timeout: float = 240) -> str:
        """Wait for `proc` and return its output; on timeout or failure the assertion shows every log."""
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"process {proc.args} did not finish within {timeout}s\n{self.logs()}")
        return self.output(proc)

    def output(self, proc: subprocess.Popen) -> str:
        return next(log for p, log in self.procs if p is proc).read_text(errors="replace")

    def wait_for_line(self, proc: subprocess.Popen, needle: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.output(proc):
                return
            if proc.poll() is not None:
                pytest.fail(f"process exited before printing {needle!r}\n{self.logs()}")
            time.sleep(0.05)
        pytest.fail(f"{needle!r} not printed within {timeout}s\n{self.logs()}")

    def smp_info(self, node: int = 0) -> dict:
        with open(self.runtime / f"{self.job}.n{node}.json") as f:
            return json.load(f)

    # ---- helpers for tests that drive or kill processes directly -------------------------------------------

    def control_address(self, node: int = 0) -> str:
        return f"ipc://{self.runtime}/{self.job}.n{node}.sock"

    def start_smp(self, *args: str, node: int = 0, name: str = "smp", **env: str) -> subprocess.Popen:
        """A bare SMP of this job (`python -m ftmem.smp`), returned once it answers `ping`."""
        proc = self.python(["-m", "ftmem.smp", "--job-id", self.job, "--node", str(node), *args], name, **env)
        client = ControlClient(self.control_address(node), timeout=60.0, retry_interval=0.5)
        try:
            deadline = time.monotonic() + 60
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"SMP exited with {proc.returncode} at start\n{self.logs()}")
                try:
                    client.call("ping", timeout=1.0)
                    return proc
                except SmpUnavailable:
                    if time.monotonic() > deadline:
                        pytest.fail(f"SMP did not answer within 60s\n{self.logs()}")
        finally:
            client.close()

    def client(self, node: int = 0, timeout: float = 10.0, retry_interval: float = 5.0) -> ControlClient:
        c = ControlClient(self.control_address(node), timeout=timeout, retry_interval=retry_interval)
        self.clients.append(c)
        return c

    def segments(self) -> list[str]:
        return list_segments(f"ftmem.{self.job}.")

    def smp_log(self, node: int = 0) -> str:
        path = self.runtime / f"{self.job}.n{node}.smp.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def workers(self, proc: subprocess.Popen) -> dict[int, psutil.Process]:
        """Live worker processes under `proc` (a launcher), by LOCAL_RANK."""
        found = {}
        try:
            children = psutil.Process(proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return found
        for child in children:
            try:
                if str(EXAMPLE) not in " ".join(child.cmdline()) and EXAMPLE.name not in child.cmdline():
                    continue
                local_rank = child.environ().get("LOCAL_RANK")
            except psutil.Error:
                continue
            if local_rank is not None:
                found[int(local_rank)] = child
        return found

    def wait_until(self, predicate, timeout: float, what: str, interval: float = 0.05) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                pytest.fail(f"timed out after {timeout}s waiting for {what}\n{self.logs()}")
            time.sleep(interval)

    def logs(self) -> str:
        parts = [f"--- {log.name} ---\n{log.read_text(errors='replace')[-6000:]}" for _, log in self.procs]
        parts += [f"--- {p.name} ---\n{p.read_text(errors='replace')[-4000:]}"
                  for p in sorted(self.runtime.glob("*.log"))]
        return "\n".join(parts)

    def cleanup(self) -> None:
        for client in self.clients:
            client.close()
        for proc, _ in self.procs:
            try:
                members = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                members = []
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            for m in members:
                try:
                    m.kill()
                except psutil.NoSuchProcess:
                    pass
            proc.wait(timeout=30)
        for info in self.runtime.glob(f"{self.job}.n*.json"):  # SMPs run in sessions of their own
            try:
                pid = json.loads(info.read_text())["pid"]
                if psutil.pid_exists(pid) and self.job in " ".join(psutil.Process(pid).cmdline()):
                    os.kill(pid, signal.SIGKILL)
            except (ValueError, OSError, psutil.Error):
                pass
        for name in list_segments(f"ftmem.{self.job}."):
            unlink(name)


@pytest.fixture
def cluster(tmp_path: Path):
    c = Cluster(tmp_path)
    yield c
    c.cleanup()


@pytest.fixture(scope="module")
def module_cluster(tmp_path_factory):
    """A Cluster shared by the tests of one module (e.g. for a golden run computed once)."""
    c = Cluster(tmp_path_factory.mktemp("mod"))
    yield c
    c.cleanup()


def final_hash(output: str) -> str:
    lines = [line for line in output.splitlines() if line.startswith("final-hash ")]
    assert lines, f"no final-hash line in output:\n{output[-4000:]}"
    return lines[-1].split()[1]


# ---- simulated multi-node jobs (tests/test_multinode.py): one `ftmem-run` per node, all on loopback ------------


def _node(self: Cluster, i: int, nnodes: int, port: int, extra_args=(), script_args=(), name: str | None = None,
          nproc: int = 1, **env: str) -> subprocess.Popen:
    """Node `i` of an `nnodes`-node job: `ftmem-run --nnodes N --node-rank i --nproc-per-node NPROC` with the c10d
    rendezvous at 127.0.0.1:port (hosted by the agent of whichever node starts first, unless `ftmem store` serves
    it: start node 0 first and never kill it) and this cluster's job id as the rendezvous id, running
    examples/train_gpt.py."""
    args = ["--nnodes", str(nnodes), "--node-rank", str(i), "--nproc-per-node", str(nproc), "--rdzv-backend", "c10d",
            "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", self.job, *extra_args]
    return self.ftmem_run(args, [*script_args], name=name or f"node{i}", **env)


Cluster.node = _node
