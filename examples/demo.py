"""The ftmem demo: a simulated 3-node training job loses a whole node mid-run and recovers bit-identically.

1. Baseline: the same job (3 ranks) without ftmem prints the final hash of parameters and optimizer state.
2. Three "nodes" on this machine, each its own `ftmem-run --nnodes 3 --node-rank i` with its own SMP and
   shared-memory namespace, talking over loopback only. Snapshots are taken every step and erasure-coded across
   the three nodes (1 parity: any one node may be lost).
3. Mid-run, node 2 dies whole (`ftmem-chaos kill-node`): its launcher, its worker, its SMP and all of its
   shared memory. A replacement node 2 starts with empty memory; its SMP rebuilds the lost snapshot from the two
   survivors, every rank restores the same step, and training goes on.
4. The final hashes are compared: they must be identical.

`--nodes 1` instead kills one worker rank of a single-node job (`ftmem-chaos kill-rank`; recovery from the node's
own SMP).
"""

from __future__ import annotations

import argparse
import atexit
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path


HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "train_gpt.py"
SHOW = ("step ", "final-hash", "resumed", "[node")


class Job:
    def __init__(self, work: Path, timeout: float) -> None:
        self.work, self.timeout = work, timeout
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "FTMEM_RUNTIME_DIR": str(work / "run")}
        self.procs: dict[str, tuple[subprocess.Popen, Path]] = {}
        self.shown: dict[str, int] = {}
        atexit.register(self.kill_all)

    def kill_all(self) -> None:
        """Whatever happens to the demo, end the process groups it started (and only those)."""
        for proc, _ in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.work / f"{name}.log"
        with open(log, "wb") as out:
            proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)
        self.procs[name] = (proc, log)
        self.shown[name] = 0
        return proc

    def echo(self) -> None:
        """Print the new interesting lines of every log (steps from the first one only)."""
        for i, (name, (_, log)) in enumerate(self.procs.items()):
            lines = log.read_text(errors="replace").splitlines()
            for line in lines[self.shown[name]:]:
                if (i == 0 and line.startswith(SHOW[:3])) or "restored step" in line or "rebuil" in line:
                    print(f"   [{name}] {line.split('ftmem ')[-1] if 'ftmem ' in line else line}", flush=True)
            self.shown[name] = len(lines)

    def wait_for(self, name: str, needle: str, log: Path | None = None) -> None:
        proc, log = self.procs[name][0], log or self.procs[name][1]
        deadline = time.monotonic() + self.timeout
        while not log.exists() or needle not in log.read_text(errors="replace"):
            self.echo()
            if proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"demo: {name} never printed {needle!r}; see {log}")
            time.sleep(0.05)

    def finish(self) -> None:
        deadline = time.monotonic() + self.timeout
        while any(p.poll() is None for p, _ in self.procs.values()):
            self.echo()
            if time.monotonic() > deadline:
                sys.exit(f"demo: the job did not finish within {self.timeout:.0f}s; logs in {self.work}")
            time.sleep(0.05)
        self.echo()
        failed = [name for name, (p, _) in self.procs.items() if p.returncode not in (0, -9)]
        if failed:
            sys.exit(f"demo: {failed} failed; logs in {self.work}")

    def chaos(self, *args: str) -> str:
        """Run `ftmem-chaos ARGS` (as a user would, from another terminal) and say what it did."""
        print(f"   $ ftmem-chaos {' '.join(args)}", flush=True)
        done = subprocess.run([sys.executable, "-m", "ftmem.chaos.cli", *args], env=self.env, capture_output=True,
                              text=True, timeout=self.timeout)
        if done.returncode != 0:
            sys.exit(f"demo: ftmem-chaos failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def final_hash(self, name: str) -> str:
        text = self.procs[name][1].read_text(errors="replace")
        return next(line.split()[1] for line in reversed(text.splitlines()) if line.startswith("final-hash "))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def multi_node(args: argparse.Namespace, work: Path, train: list[str]) -> str:
    job_id, port, job = f"demo-{uuid.uuid4().hex[:6]}", _free_port(), Job(work, args.timeout)
    common = ["--nnodes", str(args.nodes), "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", job_id, "--max-restarts", "3"]

    def node(i: int, name: str) -> subprocess.Popen:
        return job.start(name, [sys.executable, "-m", "ftmem.launcher.main", *common, "--node-rank", str(i),
                                *train])

    _say(f"2/4 {args.nodes} nodes, each `ftmem-run --nnodes {args.nodes} --node-rank i` (job {job_id})")
    node(0, "node0")
    # node 0's agent hosts the rendezvous store (as torchrun's would on the endpoint host): let it come up first
    job.wait_for("node0", "peer endpoint", work / "run" / f"{job_id}.n0.smp.log")
    for i in range(1, args.nodes):
        node(i, f"node{i}")
    victim = args.nodes - 1
    job.wait_for("node0", f"step {args.kill_at} ")
    _say(f"3/4 node {victim} dies whole after step {args.kill_at}: its launcher, worker, SMP and shared memory")
    print(f"   {job.chaos('kill-node', '--job-id', job_id, '--node', str(victim))}", flush=True)
    print(f"   starting a replacement node {victim} with empty memory", flush=True)
    node(victim, f"node{victim}-replacement")
    job.finish()
    return job.final_hash("node0")


def single_node(args: argparse.Namespace, work: Path, train: list[str]) -> str:
    job = Job(work, args.timeout)
    _say("2/4 ftmem-run --nproc-per-node 2 --max-restarts 3")
    job_id = f"demo-{uuid.uuid4().hex[:6]}"
    job.start("node0", [sys.executable, "-m", "ftmem.launcher.main", "--nproc-per-node", "2", "--max-restarts", "3",
                        "--ftmem-job-id", job_id, *train])
    job.wait_for("node0", f"step {args.kill_at} ")
    _say(f"3/4 rank 1 dies after step {args.kill_at}")
    print(f"   {job.chaos('kill-rank', '--job-id', job_id, '--rank', '1')}", flush=True)
    job.finish()
    return job.final_hash("node0")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=3, help="simulated nodes, one rank each (1: kill a rank instead)")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--kill-at", type=int, default=15, help="the failure happens after this step")
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftmem-demo-"))
    (work / "run").mkdir(mode=0o700)
    train = [str(SCRIPT), "--steps", str(args.steps), "--step-sleep", "0.1"]
    world = max(args.nodes, 2) if args.nodes > 1 else 2

    _say(f"1/4 baseline: the same job ({world} ranks) without ftmem")
    base = Job(work, args.timeout)
    base.start("baseline", [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            str(world), *train, "--no-ftmem"])
    base.finish()
    golden = base.final_hash("baseline")

    got = multi_node(args, work, train) if args.nodes > 1 else single_node(args, work, train)
    _say("4/4 compare")
    print(f"   baseline : {golden}\n   recovered: {got}")
    if got != golden:
        print(f"demo: FAILED: the recovered run differs from the baseline (logs in {work})")
        return 1
    print(f"   identical: the failure cost at most the step in flight (logs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
