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
import signal
import sys
from typing import Sequence

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import DEFAULT_PORT as C10D_DEFAULT_PORT
from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint
from torch.distributed.run import get_args_parser, parse_min_max_nnodes, run

from ftmem.erasure import ErasureConfigError, check_config, default_group_size

from ftmem.env import NodeEnv, default_job_id
from ftmem.launcher.supervisor import SmpSupervisor
from ftmem.launcher.watchdog import HangWatchdog
from ftmem.log import get_logger

log = get_logger("run")


def _env_default(name: str, default: str | None) -> str | None:
    return os.environ.get(f"FTMEM_{name}", default)


def build_parser() -> argparse.ArgumentParser:
    parser = get_args_parser()
    parser.prog = "ftmem-run"
    parser.description = __doc__
    if "PET_NODE_RANK" not in os.environ:
        parser.set_defaults(node_rank=None)  # torchrun's default is 0; ftmem must know whether it was given
    g = parser.add_argument_group("ftmem")
    g.add_argument("--ftmem-job-id", default=_env_default("JOB_ID", None),
                   help="names this job's shared memory (default: --rdzv-id, else 'default'); a rerun with the "
                        "same id on the same node re-adopts the snapshots kept in memory")
    g.add_argument("--ftmem-node-id", type=int, default=_env_default("NODE_ID", None),
                   help="stable identity of this node, 0 <= id < --nnodes (default: --node-rank; a multi-node "
                        "job needs one of the two); a replacement node reuses the id of the node it replaces")
    g.add_argument("--ftmem-buffers", type=int, default=_env_default("BUFFERS", None),
                   help="snapshot buffers per rank (default 2, double buffering; 4 with erasure coding: the "
                        "protected step and the step being encoded stay while two more are written. With 3, a "
                        "round that outlasts a step fails and is retried on a newer step)")
    g.add_argument("--ftmem-ec-group", type=int, default=_env_default("EC_GROUP", None),
                   help="nodes per erasure-coding group; must divide --nnodes (default: all nodes up to 8)")
    g.add_argument("--ftmem-ec-parity", type=int, default=int(_env_default("EC_PARITY", "1")),
                   help="node losses each group survives (default 1)")
    g.add_argument("--ftmem-ec-nice", type=int, default=int(_env_default("EC_NICE", "10")),
                   help="CPU priority (nice 0-19) of the SMP of a multi-node job: erasure coding yields the "
                        "cores to training and, when it cannot keep up, protects a newer step instead; full "
                        "priority while a node of its EC group is rebuilt (default 10; 0 when the SMP has cores "
                        "of its own)")
    g.add_argument("--ftmem-peer-host", default=_env_default("PEER_HOST", None),
                   help="address the SMP binds for its peers (default: the interface routing to the "
                        "rendezvous endpoint; 127.0.0.1 for a local endpoint)")
    g.add_argument("--ftmem-secret-file", default=_env_default("SECRET_FILE", None),
                   help="file holding the job's peer secret (same on every node; default: FTMEM_SECRET, else "
                        "one generated through the rendezvous store)")
    g.add_argument("--ftmem-timeout", type=float, default=float(_env_default("TIMEOUT", "300")),
                   help="seconds any ftmem wait may last before it fails with an error (default 300)")
    g.add_argument("--ftmem-hang-timeout", type=float, default=float(_env_default("HANG_TIMEOUT", "0")),
                   help="seconds without a completed snapshot on any rank of this node, once they run steadily, "
                        "after which its workers are taken for hung and killed, so that they restart from memory "
                        "(default 0: off; set it well above the time between two snapshots)")
    g.add_argument("--ftmem-keep", action="store_true", default=_env_default("KEEP", "0") == "1",
                   help="keep the job's snapshots in shared memory after a successful run")
    return parser


def _job_id(args: argparse.Namespace) -> str:
    if args.ftmem_job_id:
        os.environ["FTMEM_JOB_ID"] = args.ftmem_job_id
    elif args.rdzv_id and args.rdzv_id != "none":
        os.environ["FTMEM_JOB_ID"] = args.rdzv_id
    return default_job_id()


def _node_id(args: argparse.Namespace, max_nodes: int) -> int:
    """This node's stable identity, which names its shared memory and its place in its EC group: --ftmem-node-id,
    else --node-rank. torchrun's c10d rendezvous ignores --node-rank (it assigns group ranks itself), so its
    default of 0 says nothing: without an explicit id every node of a multi-node job would claim node 0."""
    given = args.ftmem_node_id if args.ftmem_node_id is not None else args.node_rank
    if max_nodes == 1:
        return given or 0
    if given is None:
        raise SystemExit(f"ftmem-run: a multi-node job needs each node's identity: pass --node-rank I (or "
                         f"--ftmem-node-id I), 0 <= I < {max_nodes}, distinct per node; a replacement node reuses "
                         f"the identity of the node it replaces")
    if not 0 <= given < max_nodes:
        raise SystemExit(f"ftmem-run: node identity {given} is out of range for --nnodes {args.nnodes}: it must be "
                         f"in 0..{max_nodes - 1}")
    return given


def _cluster_args(args: argparse.Namespace, max_nodes: int) -> list[str]:
    """SMP options for a multi-node job: peers meet through the rendezvous store, data is erasure-coded."""
    buffers = args.ftmem_buffers
    if max_nodes == 1:
        return ["--buffers", str(buffers or 2)]
    if args.rdzv_backend != "c10d" or not args.rdzv_endpoint:
        raise SystemExit("ftmem-run: a multi-node job needs --rdzv-backend c10d --rdzv-endpoint HOST:PORT "
                         "(the SMPs find each other through that store)")
    ec_group = args.ftmem_ec_group or default_group_size(max_nodes)
    try:
        check_config(max_nodes, ec_group, args.ftmem_ec_parity)
    except ErasureConfigError as exc:
        raise SystemExit(f"ftmem-run: {exc}") from exc
    if not 0 <= args.ftmem_ec_nice <= 19:
        raise SystemExit(f"ftmem-run: --ftmem-ec-nice must be in 0..19, got {args.ftmem_ec_nice}")
    if args.ftmem_secret_file:
        os.environ["FTMEM_SECRET_FILE"] = os.path.abspath(args.ftmem_secret_file)
    host, port = parse_rendezvous_endpoint(args.rdzv_endpoint, default_port=C10D_DEFAULT_PORT)  # as torchrun does
    out = ["--buffers", str(buffers or 4), "--nnodes", str(max_nodes), "--store", f"{host}:{port}",
           "--ec-group", str(ec_group), "--ec-parity", str(args.ftmem_ec_parity), "--nice", str(args.ftmem_ec_nice)]
    return out + (["--peer-host", args.ftmem_peer_host] if args.ftmem_peer_host else [])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # torchrun shares its rendezvous store with the workers by default, and a restarted attempt then reads the
    # previous attempt's process-group keys (pytorch/pytorch#135712): restarts fail to connect. A store per
    # attempt is what restarting after failures needs.
    os.environ.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    if args.ftmem_hang_timeout < 0:
        raise SystemExit(f"ftmem-run: --ftmem-hang-timeout must be >= 0 (0: off), got {args.ftmem_hang_timeout}")
    _, max_nodes = parse_min_max_nnodes(args.nnodes)
    env = NodeEnv(_job_id(args), _node_id(args, max_nodes))
    if args.node_rank is None:
        args.node_rank = 0  # torchrun's default, which its static rendezvous reads
    os.environ.update(FTMEM_JOB_ID=env.job, FTMEM_NODE_ID=str(env.node), FTMEM_MANAGED="1",
                      FTMEM_TIMEOUT=str(args.ftmem_timeout), FTMEM_SMP_ADDR=env.control_address)
    smp_args = ["--timeout", str(args.ftmem_timeout), *_cluster_args(args, max_nodes)]
    supervisor = SmpSupervisor(env, smp_args, timeout=args.ftmem_timeout)
    supervisor.start()
    watchdog = HangWatchdog(env, args.ftmem_hang_timeout) if args.ftmem_hang_timeout > 0 else None
    if watchdog is not None:
        watchdog.start()
    code = 1
    try:
        run(args)
        code = 0
    except ChildFailedError as exc:
        log.error("job %s failed on node %d; snapshots are kept in memory for a rerun:\n%s", env.job, env.node,
                  exc.format_msg())
    except SignalException as exc:  # Ctrl-C, or the scheduler preempting the node: an ending, not a bug
        log.error("job %s stopped on node %d by %s; its snapshots are kept in memory: the same command resumes "
                  "from them", env.job, env.node, signal.Signals(exc.sigval).name)
        code = 128 + exc.sigval
    finally:
        if watchdog is not None:
            watchdog.stop()
        supervisor.stop(cleanup=code == 0 and not args.ftmem_keep)
    return code


if __name__ == "__main__":
    sys.exit(main())
