"""`ftmem-chaos`: kill parts of a running ftmem job on this machine, to prove that it recovers.

    ftmem-chaos kill-rank --rank R          a training process, by global rank: its agent restarts the workers,
                                            which restore from their SMPs
    ftmem-chaos kill-smp [--node N]         a node's SMP: ftmem-run restarts it and it re-adopts its memory
    ftmem-chaos kill-node --node N [...]    whole nodes at once (launcher, agent, workers, SMP, shared memory),
                                            as if the machines died: start replacements with the same --node-rank

`--after-step S` first waits until the job has committed step S; `--job-id` may be left out while one job runs
here. Run it on the machine of the processes it kills: it finds them through the job's SMPs (their info files in
FTMEM_RUNTIME_DIR, the ranks they serve) and by PID from each node's launcher down, never by process name.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time

import psutil

from ftmem.chaos.nodes import kill_nodes
from ftmem.env import NodeEnv, running_smps, runtime_dir, smp_process
from ftmem.smp.protocol import ControlClient, SmpError, SmpUnavailable


class ChaosError(RuntimeError):
    """What was asked cannot be done here (no such job, node or rank; the step never came)."""


class NotRunning(ChaosError):
    """The job or node has no SMP here (yet: `--after-step` waits for it)."""


def _job(job: str | None) -> str:
    jobs = sorted({info["job"] for info in running_smps()})
    if not jobs or (job is not None and job not in jobs):
        raise NotRunning(f"no SMP of {'any job' if job is None else f'job {job!r}'} runs on this machine (jobs "
                         f"here: {jobs or 'none'}; SMP info files are read from {runtime_dir()})")
    if job is None and len(jobs) > 1:
        raise ChaosError(f"jobs {jobs} run on this machine: pass --job-id")
    return job or jobs[0]


def _live_smps(job: str) -> list[dict]:
    return [info for info in running_smps(job) if smp_process(info)]


def _smp(job: str, node: int | None, any_node: bool = False) -> dict:
    """The info of node `node`'s running SMP (`None`: the job's only one here, or with `any_node` the first)."""
    infos = _live_smps(job)
    found = [i for i in infos if node is None or i["node"] == node]
    if not found:
        raise NotRunning(f"{'job' if node is None else f'node {node} of job'} {job!r} has no running SMP on this "
                         f"machine (nodes here: {sorted(i['node'] for i in infos)})")
    if len(found) > 1 and not any_node:
        raise ChaosError(f"job {job!r} has nodes {sorted(i['node'] for i in found)} here: pass --node")
    return found[0]


def _status(info: dict, timeout: float = 5.0) -> dict | None:
    """The SMP's `status` answer, or None while it does not answer (it may be restarting)."""
    client = ControlClient(info["control"], timeout=timeout, retry_interval=timeout)
    try:
        return client.call("status")
    except (SmpError, SmpUnavailable):
        return None
    finally:
        client.close()


def wait_for_step(info: dict, step: int, timeout: float) -> None:
    """Until the SMP of `info` says the job committed `step`; ChaosError after `timeout` seconds."""
    deadline, committed = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        status = _status(info, timeout=min(5.0, max(0.1, deadline - time.monotonic())))
        committed = status and status["committed"]
        if committed is not None and committed >= step:
            return
        time.sleep(0.05)
    raise ChaosError(f"job {info['job']!r} did not commit step {step} within {timeout:.0f}s "
                     f"(newest committed: {committed})")


def _rank_process(job: str, rank: int) -> tuple[psutil.Process, int]:
    """(the live process registered as global `rank` with one of the job's SMPs here, its node). Under any
    launcher: the SMP knows its ranks' pids. The process must still say it is that rank (RANK in its environment,
    absent for a single process), so a recycled pid is never hit."""
    for info in _live_smps(job):
        entry = ((_status(info) or {}).get("ranks") or {}).get(str(rank))
        if entry is None or entry["closed"]:
            continue
        try:
            proc = psutil.Process(entry["pid"])
            if proc.environ().get("RANK", "0") == str(rank):
                return proc, info["node"]
        except psutil.Error:
            continue  # gone (a moved rank's old node still lists it): another node may run it now
    raise ChaosError(f"no live process of job {job!r} on this machine runs rank {rank}")


def kill_rank(job: str, rank: int, sig: signal.Signals) -> str:
    proc, node = _rank_process(job, rank)
    proc.send_signal(sig)
    return f"sent {sig.name} to rank {rank} of job {job} (pid {proc.pid}, node {node})"


def kill_smp(job: str, node: int | None, sig: signal.Signals) -> str:
    info = _smp(job, node)
    psutil.Process(info["pid"]).send_signal(sig)
    return f"sent {sig.name} to the SMP of job {job} node {info['node']} (pid {info['pid']})"


def _launcher(job: str, node: int) -> int:
    """The pid of the `ftmem-run` that started node `node`'s SMP (still its parent)."""
    info = _smp(job, node)
    smp = smp_process(info)
    if info.get("parent_pid") is None or smp is None or smp.ppid() != info["parent_pid"]:
        raise ChaosError(f"node {node}'s SMP was not started by a running ftmem-run (its launcher is what "
                         f"kill-node kills first); kill-rank and kill-smp still work")
    return info["parent_pid"]


def kill_node(job: str, nodes: list[int]) -> str:
    launchers = {NodeEnv(job, n): _launcher(job, n) for n in nodes}
    pids = kill_nodes(launchers)
    return (f"killed node(s) {nodes} of job {job} whole: SIGKILL to pids {pids}, their shared memory unlinked; "
            f"start each replacement with the same --node-rank")


def _watched(job: str, args: argparse.Namespace) -> dict:
    """The SMP whose view of the job's committed step `--after-step` waits on: the target node's, or any."""
    if args.cmd == "kill-rank":
        return _smp(job, None, any_node=True)
    return _smp(job, args.node[0] if args.cmd == "kill-node" else args.node)


def _signal(name: str) -> signal.Signals:
    try:
        return signal.Signals[f"SIG{name.upper().removeprefix('SIG')}"]
    except KeyError:
        raise argparse.ArgumentTypeError(f"unknown signal {name!r}") from None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftmem-chaos", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--job-id", help="the job (default: the only one with SMPs on this machine)")
    common.add_argument("--after-step", type=int,
                        help="first wait until the job (started already or not yet) has committed this step")
    common.add_argument("--timeout", type=float, default=300.0, help="seconds --after-step may wait (default 300)")
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("kill-rank", parents=[common], help="kill a training process by global rank")
    r.add_argument("--rank", type=int, required=True)
    r.add_argument("--signal", type=_signal, default=signal.SIGKILL, help="default KILL")
    s = sub.add_parser("kill-smp", parents=[common], help="kill a node's SMP")
    s.add_argument("--node", type=int, help="its node id (default: the job's only node here)")
    s.add_argument("--signal", type=_signal, default=signal.SIGKILL, help="default KILL")
    n = sub.add_parser("kill-node", parents=[common], help="kill whole nodes at once, memory included")
    n.add_argument("--node", type=int, action="append", required=True, help="a node id; repeat for several")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    deadline = time.monotonic() + args.timeout
    try:
        while True:  # with --after-step, started along with the job: wait for its SMP to come up
            try:
                job = _job(args.job_id)
                watched = _watched(job, args) if args.after_step is not None else None
                break
            except NotRunning:
                if args.after_step is None or time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        if watched is not None:
            wait_for_step(watched, args.after_step, deadline - time.monotonic())
        if args.cmd == "kill-rank":
            done = kill_rank(job, args.rank, args.signal)
        elif args.cmd == "kill-smp":
            done = kill_smp(job, args.node, args.signal)
        else:
            done = kill_node(job, args.node)
    except (ChaosError, psutil.NoSuchProcess) as exc:
        print(f"ftmem-chaos: {exc}", file=sys.stderr)
        return 1
    print(f"ftmem-chaos: {done}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
