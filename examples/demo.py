"""The ftmem demo: train a small GPT, kill a rank in the middle, and show the job recover bit-identically.

1. A baseline run without ftmem prints the final hash of parameters and optimizer state.
2. The same job runs under `ftmem-run --max-restarts 3`; mid-run, one worker rank is SIGKILLed. torch's elastic
   agent restarts the workers, every rank restores the newest committed snapshot from the node's SMP in shared
   memory, and training resumes at the next step.
3. The final hashes are compared: they must be identical.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "train_gpt.py"


def _say(msg: str) -> None:
    print(f"\n== {msg}", flush=True)


def _hash(output: str) -> str:
    return next(line.split()[1] for line in reversed(output.splitlines()) if line.startswith("final-hash "))


def _launch(args: list[str], log: Path, env: dict[str, str]) -> subprocess.Popen:
    out = open(log, "wb")
    return subprocess.Popen([sys.executable, "-m", "ftmem.launcher.main", *args], stdout=out,
                            stderr=subprocess.STDOUT, env=env, start_new_session=True)


def _worker(launcher: psutil.Process, local_rank: int) -> psutil.Process | None:
    for child in launcher.children(recursive=True):
        try:
            if str(SCRIPT) in " ".join(child.cmdline()) and child.environ().get("LOCAL_RANK") == str(local_rank):
                return child
        except psutil.Error:
            continue
    return None


def _follow(proc: subprocess.Popen, log: Path, kill_at: int | None, timeout: float) -> str:
    """Echo the interesting lines of the job's log; SIGKILL local rank 1 once step `kill_at` is printed."""
    shown, deadline = 0, time.monotonic() + timeout
    while True:
        text = log.read_text(errors="replace")
        for line in text.splitlines()[shown:]:
            if line.startswith(("step ", "final-hash", "resumed")) or "ftmem" in line and "INFO" in line:
                print("   " + line, flush=True)
            if kill_at is not None and line.startswith(f"step {kill_at} "):
                victim = _worker(psutil.Process(proc.pid), 1)
                if victim is not None:
                    print(f"\n   >>> SIGKILL rank 1 (pid {victim.pid}) after step {kill_at}\n", flush=True)
                    victim.send_signal(signal.SIGKILL)
                    kill_at = None
        shown = len(text.splitlines())
        if proc.poll() is not None:
            return log.read_text(errors="replace")
        if time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)
            sys.exit(f"demo: the job did not finish within {timeout:.0f}s; log: {log}")
        time.sleep(0.05)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--kill-at", type=int, default=17, help="step after which rank 1 is killed")
    p.add_argument("--timeout", type=float, default=300)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ftmem-demo-"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    train = [str(SCRIPT), "--steps", str(args.steps), "--step-sleep", "0.05"]

    _say("1/3 baseline: the same job without ftmem")
    base = _launch(["--nproc-per-node", "2", *train, "--no-ftmem"], work / "baseline.log", env)
    golden = _hash(_follow(base, work / "baseline.log", None, args.timeout))

    job = f"demo-{uuid.uuid4().hex[:6]}"
    _say(f"2/3 ftmem-run --nproc-per-node 2 --max-restarts 3 (job {job}); rank 1 dies after step {args.kill_at}")
    run = _launch(["--nproc-per-node", "2", "--max-restarts", "3", "--ftmem-job-id", job, *train],
                  work / "ftmem.log", env)
    out = _follow(run, work / "ftmem.log", args.kill_at, args.timeout)
    if run.returncode != 0:
        print(out[-5000:])
        return 1

    _say("3/3 compare")
    got = _hash(out)
    print(f"   baseline : {golden}\n   recovered: {got}")
    if got != golden:
        print("demo: FAILED: the recovered run differs from the baseline")
        return 1
    print(f"   identical: the job lost at most the step in flight (logs in {work})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
