"""`ftmem`: inspect and tidy the SMPs of running jobs on this machine, and host a job's rendezvous store.

    ftmem status [--job-id J]     committed and protected step (and the lag), memory and ranks of each SMP
    ftmem clean --job-id J        remove a job's shared memory (when no SMP of it is running)
    ftmem store [--port P]        serve a job's rendezvous store from a host that is not a training node
"""

from __future__ import annotations

import argparse
import fcntl
import glob
import os
import re
import signal
import sys

from ftmem.env import NodeEnv, running_smps, runtime_dir, smp_process
from ftmem.smp.protocol import ControlClient, SmpError, SmpUnavailable
from ftmem.smp.shm import list_segments, unlink


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _dash(value: int | None) -> int | str:
    return "-" if value is None else value


def _lock_if_stopped(env: NodeEnv) -> int | None:
    """An fd holding the lock of `env`'s SMP, or None while that SMP runs. The lock, not an info file, says whether
    it runs: the kernel releases it when the SMP dies, SIGKILL included, while its info file stays behind (naming
    a pid that may be reused since)."""
    fd = os.open(env.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def status(job: str | None) -> int:
    infos = [info for info in running_smps(job) if smp_process(info)]
    if not infos:
        print(f"no running SMP{' for job ' + job if job else ''} on this machine")
        return 1
    print(f"{'job':<20} {'node':>4} {'pid':>7} {'committed':>9} {'protected':>9} {'lag':>4} {'memory':>10}  "
          f"ranks (steps held)")
    for info in infos:
        client = ControlClient(info["control"], timeout=5.0, retry_interval=5.0)
        try:
            st = client.call("status")
        except (SmpUnavailable, SmpError) as exc:
            print(f"{info['job']:<20} {info['node']:>4} {info['pid']:>7}  not answering: {exc}")
            continue
        finally:
            client.close()
        ranks = " ".join(f"{r}:{v['steps']}" for r, v in st["ranks"].items()) or "-"
        committed, protected = st["committed"], st.get("protected")
        lag = "-" if None in (committed, protected) else committed - protected  # steps a node loss would cost now
        print(f"{st['job']:<20} {st['node']:>4} {st['pid']:>7} {_dash(committed):>9} {_dash(protected):>9} {lag:>4} "
              f"{_human(st['shm_bytes']):>10}  {ranks}")
    return 0


def clean(job: str) -> int:
    """Remove the job's segments and its dead SMPs' info, socket and lock files, holding every node's lock
    meanwhile, so that no SMP of the job starts (and adopts half-removed memory) while this runs."""
    locks = glob.glob(os.path.join(runtime_dir(), f"{glob.escape(job)}.n*.lock"))
    nodes = sorted(int(m.group(1)) for path in locks
                   if (m := re.fullmatch(rf"{re.escape(job)}\.n(\d+)\.lock", os.path.basename(path))))
    held: list[tuple[NodeEnv, int]] = []
    try:
        for env in (NodeEnv(job, node) for node in nodes):
            fd = _lock_if_stopped(env)
            if fd is None:
                print(f"the SMP of job {job} node {env.node} is running; stop the job first", file=sys.stderr)
                return 1
            held.append((env, fd))
        names = list_segments(f"ftmem.{job}.")
        for name in names:
            unlink(name)
        for env, _ in held:  # the lock last: an SMP starting now locks a new file, and finds no memory to adopt
            for path in (env.info_path, env.socket_path, env.lock_path):
                if os.path.exists(path):
                    os.unlink(path)
    finally:
        for _, fd in held:
            os.close(fd)
    print(f"removed {len(names)} segment(s) of job {job}")
    return 0


def store(port: int | None) -> int:
    """Host the c10d rendezvous store (torch's TCPStore, as torchrun's agent would) until SIGINT or SIGTERM.

    With `--rdzv-endpoint` on a training node, that node's agent hosts the store, and the job (torch's rendezvous
    as well as the SMPs' directory) dies with it. Served from elsewhere, any node may be lost, node 0 included:
    every agent then finds the port taken, or the host not its own, and connects as a client."""
    from torch.distributed import DistNetworkError, TCPStore
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import DEFAULT_PORT

    port = DEFAULT_PORT if port is None else port
    stop = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stop)  # before the store's threads start: they inherit the mask
    try:
        server = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False)
    except DistNetworkError as exc:
        print(f"ftmem store: cannot serve port {port}: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"ftmem store: serving the rendezvous store on port {server.port} (every interface); pass "
          f"--rdzv-endpoint THIS_HOST:{server.port} to every node. Ctrl-C stops it.", flush=True)
    signal.sigwait(stop)
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="ftmem", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="show the SMPs of running jobs")
    s.add_argument("--job-id")
    c = sub.add_parser("clean", help="remove a stopped job's shared memory")
    c.add_argument("--job-id", required=True)
    r = sub.add_parser("store", help="serve a job's rendezvous store apart from its training nodes")
    r.add_argument("--port", type=int, help="TCP port (default 29400: c10d's, for an endpoint given without one)")
    args = p.parse_args(argv)
    if args.cmd == "store":
        return store(args.port)
    return status(args.job_id) if args.cmd == "status" else clean(args.job_id)


if __name__ == "__main__":
    sys.exit(main())
