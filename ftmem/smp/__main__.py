"""`python -m ftmem.smp`: run the node's snapshot-management process."""

from __future__ import annotations

import argparse
import os
import sys

from ftmem.env import NodeEnv, default_job_id
from ftmem.smp.daemon import SnapshotDaemon


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ftmem.smp", description=__doc__)
    p.add_argument("--job-id", default=default_job_id())
    p.add_argument("--node", type=int, default=int(os.environ.get("FTMEM_NODE_ID", "0")))
    p.add_argument("--buffers", type=int, default=2, help="snapshot buffers per rank (>= 2)")
    p.add_argument("--timeout", type=float, default=float(os.environ.get("FTMEM_TIMEOUT", "300")))
    p.add_argument("--parent-pid", type=int, help="exit (keeping segments) when this process is gone")
    p.add_argument("--exit-when-done", action="store_true",
                   help="exit and remove the segments once every rank has closed (self-started SMPs)")
    args = p.parse_args(argv)
    if args.buffers < 2:
        p.error("--buffers must be at least 2")
    daemon = SnapshotDaemon(NodeEnv(args.job_id, args.node), buffers=args.buffers, timeout=args.timeout,
                            exit_when_done=args.exit_when_done, parent_pid=args.parent_pid)
    if not daemon.acquire_lock():
        print(f"ftmem smp: another SMP already serves job {args.job_id} node {args.node}", file=sys.stderr)
        return 3
    daemon.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
