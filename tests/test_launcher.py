"""`ftmem-run`'s own options: a node's identity and a multi-node job's EC settings are checked before anything
starts (no SMP, no shared memory), with an error that says what to pass. And the hang watchdog's judgement."""

from __future__ import annotations

import os

import pytest

import ftmem.launcher.main as launcher
from ftmem.launcher.main import _cluster_args, _node_id, build_parser
from ftmem.launcher.watchdog import Heartbeat
from torch.distributed.run import parse_min_max_nnodes

C10D = ["--rdzv-backend", "c10d", "--rdzv-endpoint", "127.0.0.1:29999"]


@pytest.fixture(autouse=True)
def _isolated(tmp_path):
    """main() exports its settings to the environment (for the SMP and the workers), and a node id left there
    would become every later test's --ftmem-node-id: the environment is restored whole afterwards."""
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith(("FTMEM_", "PET_"))]:
        del os.environ[name]
    os.environ["FTMEM_RUNTIME_DIR"] = str(tmp_path)
    yield
    os.environ.clear()
    os.environ.update(saved)


def node_id(argv: list[str]) -> int:
    """ftmem's node id for `ftmem-run ARGV train.py`."""
    args = build_parser().parse_args([*argv, "train.py"])
    return _node_id(args, parse_min_max_nnodes(args.nnodes)[1])


@pytest.mark.parametrize("argv, error", [
    (["--nnodes", "3", *C10D], "needs each node's identity: pass --node-rank"),
    (["--nnodes", "3", "--node-rank", "3", *C10D], "identity 3 is out of range for --nnodes 3: it must be in 0..2"),
    (["--nnodes", "2:4", "--ftmem-node-id", "-1", *C10D], "identity -1 is out of range"),
    (["--nnodes", "3", "--node-rank", "1", "--rdzv-backend", "static", "--master-addr", "127.0.0.1"],
     "needs --rdzv-backend c10d"),
    (["--nnodes", "4", "--node-rank", "1", *C10D, "--ftmem-ec-group", "3"], "--ftmem-ec-group 3 does not divide"),
    (["--nnodes", "3", "--node-rank", "1", *C10D, "--ftmem-ec-parity", "3"], "--ftmem-ec-parity 3 must be"),
    (["--standalone", "--ftmem-hang-timeout", "-1"], "--ftmem-hang-timeout must be >= 0"),
])
def test_a_misconfigured_node_is_refused_before_anything_starts(argv, error, monkeypatch):
    def started(*args, **kwargs):
        raise AssertionError("ftmem-run went on to start the SMP")
    monkeypatch.setattr(launcher, "SmpSupervisor", started)
    with pytest.raises(SystemExit, match=error):
        launcher.main([*argv, "train.py"])


def test_node_identity_comes_from_the_node_rank_or_the_ftmem_node_id(monkeypatch):
    assert node_id(["--nnodes", "3", "--node-rank", "2", *C10D]) == 2
    assert node_id(["--nnodes", "3", "--ftmem-node-id", "1", *C10D]) == 1
    assert node_id(["--nnodes", "3", "--node-rank", "0", "--ftmem-node-id", "2", *C10D]) == 2
    assert node_id(["--standalone", "--nproc-per-node", "2"]) == 0  # one node: no identity needed
    monkeypatch.setenv("PET_NODE_RANK", "1")  # torchrun's environment form of --node-rank
    assert node_id(["--nnodes", "3", *C10D]) == 1


@pytest.mark.parametrize("endpoint, store", [("127.0.0.1:29500", "127.0.0.1:29500"), ("node0", "node0:29400")])
def test_the_smps_meet_at_the_rendezvous_endpoint_torchrun_uses(endpoint, store):
    """torchrun's c10d backend defaults the endpoint's port to 29400; the SMPs' directory must use the same."""
    args = build_parser().parse_args(["--nnodes", "3", "--node-rank", "0", "--rdzv-backend", "c10d",
                                      "--rdzv-endpoint", endpoint, "train.py"])
    smp_args = _cluster_args(args, 3)
    assert smp_args[smp_args.index("--store") + 1] == store


def test_the_hang_watchdog_fires_once_per_hang_and_only_while_the_ranks_run_steadily():
    alive = {10, 11, 20, 21}
    beat = Heartbeat(5.0, alive=lambda pid: pid in alive)

    def ranks(commits, idle, pids=(10, 11), closed=(False, False)):
        """The SMP's status of ranks 0 and 1: snapshots each committed since it registered, seconds since it
        last committed (or registered)."""
        return {str(r): {"pid": p, "closed": c, "commits": n, "idle_s": i, "steps": []}
                for r, (p, c, n, i) in enumerate(zip(pids, closed, commits, idle))}

    # start-up (imports, compilation, a restore): however long, before any snapshot nothing is judged
    assert not beat.hung(ranks((0, 0), (600, 600)))
    # running: some rank committed within the timeout
    assert not beat.hung(ranks((9, 8), (0.1, 4.9))) and not beat.hung(ranks((9, 8), (5.0, 30)))
    # a hang right after the first snapshot counts as much as one after many; a rank that never committed counts
    # from its registration
    assert beat.hung(ranks((1, 0), (5.5, 7.0)))
    assert beat.ranks == {0: 10, 1: 11}
    assert not beat.hung(ranks((1, 0), (60, 60))), "the same workers are judged hung once"
    # the agent's new workers restore older snapshots: judged afresh, from their own first snapshot on
    assert not beat.hung(ranks((0, 0), (60, 60), pids=(20, 21)))
    assert beat.hung(ranks((3, 3), (6, 6), pids=(20, 21)))
    # a rank that died is the agent's to handle; ranks that finished (closed) are not watched
    alive.discard(21)
    assert not beat.hung(ranks((3, 3), (60, 60), pids=(20, 22)))
    assert not beat.hung(ranks((3, 3), (60, 60), pids=(30, 31), closed=(True, True)))


def test_an_smp_dying_at_start_is_restarted_with_a_backoff_not_in_a_loop(tmp_path, monkeypatch):
    """The first restart after a quick death is immediate (a crash), the next ones back off: 0.5 s, 1 s, 2 s..."""
    import subprocess
    import sys
    import time

    from ftmem.env import NodeEnv
    from ftmem.launcher import supervisor

    monkeypatch.setenv("FTMEM_RUNTIME_DIR", str(tmp_path))
    sup = supervisor.SmpSupervisor(NodeEnv("backoff", 0), [], timeout=10.0)
    spawned = []

    def spawn() -> None:  # an "SMP" that exits at once with an error
        spawned.append(time.monotonic())
        sup.proc = subprocess.Popen([sys.executable, "-c", "raise SystemExit(1)"])
        sup._spawned_at = spawned[-1]

    monkeypatch.setattr(sup, "_spawn", spawn)
    spawn()
    sup._thread.start()
    try:
        time.sleep(3.0)
    finally:
        sup._stopping.set()
        sup._thread.join(15)
        sup.proc.wait(15)
    gaps = [b - a for a, b in zip(spawned, spawned[1:])]
    assert 2 <= len(spawned) <= 4, f"{len(spawned)} starts in 3 s (gaps {gaps}): no backoff"
    assert len(gaps) < 2 or gaps[1] >= 0.5, gaps
    assert not sup._thread.is_alive()
