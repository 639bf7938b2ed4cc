"""`python -m ftmem.smp`: run the node's snapshot-management process."""

from __future__ import annotations

import argparse
import os
import sys

from ftmem.env import SMP_LOCKED, NodeEnv, default_job_id
from ftmem.erasure import ErasureConfigError
from ftmem.smp.cluster import ClusterConfig
from ftmem.smp.daemon import SnapshotDaemon
from ftmem.smp.peer import default_peer_host
from ftmem.smp.process import keep_freed_memory


def _secret() -> bytes | None:
    """FTMEM_SECRET, or the contents of FTMEM_SECRET_FILE; None lets the job's SMPs agree on one."""
    if os.environ.get("FTMEM_SECRET_FILE"):
        with open(os.environ["FTMEM_SECRET_FILE"], "rb") as f:
            return f.read().strip()
    value = os.environ.get("FTMEM_SECRET")
    return value.encode() if value else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ftmem.smp", description=__doc__)
    p.add_argument("--job-id", default=default_job_id())
    p.add_argument("--node", type=int, default=int(os.environ.get("FTMEM_NODE_ID", "0")))
    p.add_argument("--buffers", type=int, default=2, help="snapshot buffers per rank (>= 2)")
    p.add_argument("--timeout", type=float, default=float(os.environ.get("FTMEM_TIMEOUT", "300")))
    p.add_argument("--parent-pid", type=int, help="exit (keeping segments) when this process is gone")
    p.add_argument("--exit-when-done", action="store_true",
                   help="exit and remove the segments once every rank has closed (self-started SMPs)")
    p.add_argument("--nnodes", type=int, default=1, help="nodes of the job (more than 1: peers and EC)")
    p.add_argument("--store", help="host:port of the job's rendezvous store (needed with --nnodes > 1)")
    p.add_argument("--ec-group", type=int, help="nodes per erasure-coding group (default: see ftmem-run)")
    p.add_argument("--ec-parity", type=int, default=1, help="parity blocks per stripe: node losses tolerated")
    p.add_argument("--nice", type=int, default=0,
                   help="multi-node: CPU priority (nice 0-19) while no node of the EC group is rebuilt")
    p.add_argument("--peer-host", help="address to bind the peer socket to (default: the one routing to --store)")
    args = p.parse_args(argv)
    if args.buffers < 2:
        p.error("--buffers must be at least 2")
    if not 0 <= args.nice <= 19:
        p.error("--nice must be in 0..19")
    cluster = None
    if args.nnodes > 1:
        if not args.store:
            p.error("--store is required when --nnodes > 1")
        from ftmem.erasure import default_group_size

        try:
            cluster = ClusterConfig(args.nnodes, args.ec_group or default_group_size(args.nnodes), args.ec_parity,
                                    args.store, args.peer_host or default_peer_host(args.store), _secret(), args.nice)
            cluster.validate()
        except ErasureConfigError as exc:
            p.error(str(exc))
        keep_freed_memory()
    daemon = SnapshotDaemon(NodeEnv(args.job_id, args.node), buffers=args.buffers, timeout=args.timeout,
                            exit_when_done=args.exit_when_done, parent_pid=args.parent_pid, cluster=cluster)
    if not daemon.acquire_lock():
        print(f"ftmem smp: another SMP already serves job {args.job_id} node {args.node}", file=sys.stderr)
        return SMP_LOCKED
    daemon.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
