"""`ftmem`: inspect and tidy the SMPs of running jobs on this machine, and host a job's rendezvous store.

    ftmem status [--job-id J]     committed and protected step (and the lag), memory and ranks of each SMP
    ftmem clean --job-id J        remove a job's shared memory (when no SMP of it is running)
    ftmem store [--port P]        serve a job's rendezvous store from a host that is not a training node
"""

from __future__ import annotations

import argparse
import signal
import sys

from ftmem.env import running_smps
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


def status(job: str | None) -> int:
    infos = running_smps(job)
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
    if running_smps(job):
        print(f"an SMP of job {job} is running; stop the job first", file=sys.stderr)
        return 1
    names = list_segments(f"ftmem.{job}.")
    for name in names:
        unlink(name)
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
