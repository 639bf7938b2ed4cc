"""`ftmem-run`: torchrun plus the node's snapshot-management process.

Every torchrun argument keeps its name and meaning (the parser *is* torchrun's); ftmem adds `--ftmem-*`
options, each also settable as the `FTMEM_*` environment variable of the same name. Before the elastic agent
starts the workers, the SMP is started in its own session (so worker restarts and terminal signals do not
reach it) and restarted whenever it dies. On success the job's segments are removed unless `--ftmem-keep`; on
failure they are kept, so rerunning the same job on the same node resumes from memory.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

from ftmem.env import NodeEnv, default_job_id
from ftmem.launcher.supervisor import SmpSupervisor
from ftmem.log import get_logger

log = get_logger("run")


def _env_default(name: str, default: str | None) -> str | None:
    return os.environ.get(f"FTMEM_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    parser = get_args_parser()
    parser.prog = "ftmem-run"
    parser.description = __doc__
    g = parser.add_argument_group("ftmem")
    g.add_argument("--ftmem-job-id", default=_env_default("JOB_ID", None),
                   help="names this job's shared memory (default: --rdzv-id, else 'default'); a rerun with the "
                        "same id on the same node re-adopts the snapshots kept in memory")
    g.add_argument("--ftmem-node-id", type=int, default=_env_default("NODE_ID", None),
                   help="stable identity of this node (default: --node-rank); a replacement node reuses it")
    g.add_argument("--ftmem-buffers", type=int, default=int(_env_default("BUFFERS", "2")),
                   help="snapshot buffers per rank (default 2: double buffering)")
    g.add_argument("--ftmem-timeout", type=float, default=float(_env_default("TIMEOUT", "300")),
                   help="seconds any ftmem wait may last before it fails with an error (default 300)")
    g.add_argument("--ftmem-keep", action="store_true", default=_env_default("KEEP", "0") == "1",
                   help="keep the job's snapshots in shared memory after a successful run")
    return parser


def _job_id(args: argparse.Namespace) -> str:
    if args.ftmem_job_id:
        os.environ["FTMEM_JOB_ID"] = args.ftmem_job_id
    elif args.rdzv_id and args.rdzv_id != "none":
        os.environ["FTMEM_JOB_ID"] = args.rdzv_id
    return default_job_id()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # torchrun shares its rendezvous store with the workers by default, and a restarted attempt then reads the
    # previous attempt's process-group keys (pytorch/pytorch#135712): restarts fail to connect. A store per
    # attempt is what restarting after failures needs.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    env = NodeEnv(_job_id(args), args.ftmem_node_id if args.ftmem_node_id is not None else args.node_rank)
    os.environ.update(FTMEM_JOB_ID=env.job, FTMEM_NODE_ID=str(env.node), FTMEM_MANAGED="1",
                      FTMEM_TIMEOUT=str(args.ftmem_timeout), FTMEM_SMP_ADDR=env.control_address)
    smp_args = ["--buffers", str(args.ftmem_buffers), "--timeout", str(args.ftmem_timeout)]
    supervisor = SmpSupervisor(env, smp_args, timeout=args.ftmem_timeout)
    supervisor.start()
    ok = False
    try:
        run(args)
        ok = True
    except ChildFailedError as exc:
        log.error("job %s failed on node %d; snapshots are kept in memory for a rerun:\n%s", env.job, env.node,
                  exc.format_msg())
    finally:
        supervisor.stop(cleanup=ok and not args.ftmem_keep)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
