"""Simulated multi-node jobs on one machine (DESIGN.md sections 5 and 7): one `ftmem-run --nnodes N --node-rank i`
per node, all on loopback, each with its own SMP and shared memory. A node is lost whole (launcher, agent,
workers, SMP and segments at once, `ftmem-chaos kill-node`) and a replacement with the same node rank and empty
memory joins; its SMP rebuilds the lost snapshot from the survivors' erasure code and the job ends with the same
final hash as a run without failures. More losses than the code tolerates must fail loudly, never restart from
step 0 or finish wrong. The SMP's peer socket drops forged and malformed messages and keeps serving, and an
SMP that stalled does not take its live peers for gone.

Node 0 is started first and, unless a test serves the rendezvous store apart (`ftmem store`), never killed: its
agent hosts the job's rendezvous store (and the SMPs' directory).
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import sys
import threading
import time
from datetime import timedelta
from unittest.mock import patch

import msgpack
import psutil
import pytest
import zmq
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from conftest import EXAMPLE, Cluster, final_hash, free_port
from ftmem.chaos import kill_nodes
from ftmem.env import NodeEnv
from ftmem.smp.cluster import PEER_TIMEOUT_S
from ftmem.smp.peer import MAX_PEER_BYTES, PeerCodec, PeerLink, secret_id
from ftmem.smp.process import autogrouping, effective_nice
from ftmem.smp.protocol import ControlClient, SmpError, SmpUnavailable
from ftmem.smp.shm import shm_dir

STEPS = 24
TRAIN = ["--steps", str(STEPS)]
SLOW = ["--step-sleep", "0.1"]  # so a kill from outside lands mid-run
DIM = ["--dim", "128"]  # ~5 MB per rank: an EC round takes ~0.1 s here, several times longer than a kill
# FTMEM_TIMEOUT of the jobs: far above any wait a healthy recovery needs here (~20 s), low enough that a wait for a
# dead node (which should never happen) ends well within the test's time
TIMEOUT = "60"
# torch's c10d rendezvous drops a dead node after keep_alive_interval x keep_alive_max_attempt seconds (5 x 3 by
# default). Jobs here use what the README recommends for fast recovery (~7 s less per node-kill test); the main
# golden test keeps torch's default, where a replacement joins while the dead node still counts as alive.
FAST_KEEPALIVE = ["--rdzv-conf", "keep_alive_interval=1,keep_alive_max_attempt=3"]
# the kill steps are drawn from this seed, printed by each test; FTMEM_TEST_SEED=N replays a failure
SEED = int(os.environ.get("FTMEM_TEST_SEED") or random.randrange(2**32))


@pytest.fixture(scope="module")
def golden(module_cluster):
    """golden(world, *args): final hash of the job without ftmem for `world` ranks (each computed once)."""
    c, cache = module_cluster, {}

    def get(world: int, *args: str) -> str:
        key = (world, args)
        if key not in cache:
            run = c.start([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                           str(world), str(EXAMPLE), *TRAIN, *args, "--no-ftmem"], name=f"golden{world}")
            cache[key] = final_hash(c.wait(run, timeout=180))
            assert run.returncode == 0, c.logs()
        return cache[key]

    return get


class Job:
    """The nodes of one simulated multi-node job; `procs[i]` is node i's current launcher."""

    def __init__(self, cluster: Cluster, nnodes: int, extra_args=(), script_args=(), keepalive=FAST_KEEPALIVE,
                 port: int | None = None, nproc: int = 1, **env: str) -> None:
        self.c, self.nnodes, self.port, self.nproc = cluster, nnodes, port or free_port(), nproc
        self.extra, self.script, self.env = [*keepalive, *extra_args], [*TRAIN, *SLOW, *script_args], env
        self.procs: dict = {}
        self.killed: list = []

    def start(self, i: int, name: str | None = None, **env: str):
        self.procs[i] = self.c.node(i, self.nnodes, self.port, self.extra, self.script, name=name, nproc=self.nproc,
                                    **{**self.env, **env})
        return self.procs[i]

    def start_all(self, node_env: dict[int, dict[str, str]] | None = None) -> None:
        """Start every node, node i with the extra environment `node_env[i]` if given. Node 0 comes first: on one
        machine any node's agent may host the rendezvous store (the first to bind its port does), and the tests
        count on node 0's, so the others start once the port listens (at once when `ftmem store` serves it)."""
        node_env = node_env or {}
        self.start(0, **node_env.get(0, {}))
        self.c.wait_until(lambda: listening(self.port) or self.procs[0].poll() is not None, 90,
                          f"the rendezvous store to listen on port {self.port}")
        assert self.procs[0].poll() is None, f"node 0 exited early\n{self.c.logs()}"
        for i in range(1, self.nnodes):
            self.start(i, **node_env.get(i, {}))

    def output(self) -> str:
        return "\n".join(self.c.output(p) for p, _ in self.c.procs if p in [*self.procs.values(), *self.killed])

    def wait_for_step(self, step: int, timeout: float = 120) -> None:
        """Until some rank printed `step {step} loss` (rank 0 prints; which node it runs on is the agents' choice)."""
        needle = re.compile(rf"^step {step} loss", re.M)

        def seen() -> bool:
            dead = [i for i, p in self.procs.items() if p.poll() is not None]
            if dead:
                pytest.fail(f"node(s) {dead} exited before step {step}\n{self.c.logs()}")
            return any(needle.search(self.c.output(p)) for p in self.procs.values())

        self.c.wait_until(seen, timeout, f"step {step}")

    def latest_step(self) -> int:
        """The newest step a rank printed."""
        return max(int(s) for s in re.findall(r"^step (\d+) loss", self.output(), re.M))

    def wait_protected(self, node: int, timeout: float = 120) -> None:
        """Until `node`'s SMP reports a protected step (every node keeps the same one). The first round also
        allocates every parity slot, and on a machine that the suite loads with two test files at once the niced
        SMPs may need many steps for it; a node lost before any step is protected cannot be rebuilt, as it must."""
        client = self.c.client(node, timeout=30.0, retry_interval=5.0)
        self.c.wait_until(lambda: client.call("status")["protected"] is not None, timeout,
                          f"node {node} to protect a step", interval=0.2)

    def kill(self, *nodes: int, now: bool = False) -> None:
        """Kill `nodes` whole, all at once, as a user would: `ftmem-chaos kill-node`. With `now`, by the same
        library call from this process instead, for a moment that the CLI's start-up (~0.3 s here) would miss."""
        if now:
            with patch.dict(os.environ, FTMEM_RUNTIME_DIR=str(self.c.runtime)):  # where NodeEnv's paths lie
                pids = kill_nodes({NodeEnv(self.c.job, i): self.procs[i].pid for i in nodes})
            print(f"killed node(s) {list(nodes)}: pids {pids}")
        else:
            chaos = self.c.python(["-m", "ftmem.chaos.cli", "kill-node", "--job-id", self.c.job,
                                   *[arg for i in nodes for arg in ("--node", str(i))]],
                                  name="chaos-kill-node-" + "-".join(map(str, nodes)))
            out = self.c.wait(chaos, timeout=60)
            assert chaos.returncode == 0, f"ftmem-chaos failed: {out}\n{self.c.logs()}"
            print(out.strip())
            for i in nodes:
                assert self.procs[i].wait(timeout=10) == -signal.SIGKILL, f"node {i}'s launcher survived\n{out}"
        self.killed.extend(self.procs.pop(i) for i in nodes)
        assert all(node_segments(self.c, i) == [] for i in nodes), "kill-node left segments behind"

    def replace(self, *nodes: int, expected: str, now: bool = False) -> None:
        """Kill `nodes` whole (see `kill`), start their replacements with the same node ranks, and expect every
        node to exit 0 with the baseline's final hash `expected`."""
        self.kill(*nodes, now=now)
        for i in nodes:
            self.start(i, name=f"node{i}-replacement")
        codes = self.finish()
        assert codes == {i: 0 for i in range(self.nnodes)}, f"exit codes {codes}\n{self.c.logs()}"
        hashes = self.final_hashes()
        assert hashes == [expected], f"final hashes {hashes}, baseline {expected}\n{self.c.logs()}"

    def crashes(self) -> list[str]:
        """SMP logs with a python traceback: an SMP (or its worker thread) died of a bug."""
        return [f"node {i}" for i in range(self.nnodes) if "Traceback (most recent call last)" in self.c.smp_log(i)]

    def finish(self, timeout: float = 240, poll=None) -> dict[int, int]:
        """Wait for every current node (calling `poll()` meanwhile); their exit codes by node. Fails at once, with
        every log, when an SMP crashed (the job would otherwise only end when some ftmem wait times out)."""
        def done() -> bool:
            if self.crashes():
                pytest.fail(f"SMP traceback in the log of {self.crashes()}\n{self.c.logs()}")
            if poll is not None:
                poll()
            return all(p.poll() is not None for p in self.procs.values())

        self.c.wait_until(done, timeout, "every node to exit", interval=0.2)
        return {i: p.returncode for i, p in self.procs.items()}

    def final_hashes(self) -> list[str]:
        return re.findall(r"^final-hash (\w+)", "\n".join(self.c.output(p) for p in self.procs.values()), re.M)


def listening(port: int) -> bool:
    return any(c.status == psutil.CONN_LISTEN and c.laddr.port == port for c in psutil.net_connections("tcp"))


def node_segments(c: Cluster, node: int) -> list[str]:
    return [s for s in c.segments() if s.startswith(f"ftmem.{c.job}.n{node}.")]


def restored(output: str) -> list[tuple[int, int, str]]:
    """(rank, step, source) of every `rank R restored step S from SOURCE` line."""
    return [(int(r), int(s), src) for r, s, src in re.findall(r"rank (\d+) restored step (\d+) from ([^:]+):", output)]


def kill_and_replace(cluster: Cluster, golden, *, nnodes: int, victims: tuple[int, ...], kill_at: int,
                     extra_args=(), script_args=(), keepalive=FAST_KEEPALIVE, port: int | None = None,
                     nproc: int = 1) -> Job:
    """Run an nnodes-node job of `nproc` ranks per node (its rendezvous store at `port` when one serves it apart),
    kill `victims` whole after step `kill_at`, start replacements, expect the golden hash; returns the job for
    further checks."""
    expected = golden(nnodes * nproc, *script_args)
    survivor = min(set(range(nnodes)) - set(victims))
    job = Job(cluster, nnodes, ["--max-restarts", "3", *extra_args], script_args, keepalive, port, nproc,
              FTMEM_TIMEOUT=TIMEOUT)
    job.start_all()
    job.wait_for_step(kill_at)
    job.wait_protected(survivor)
    kill_at = job.latest_step()  # later than asked for only when protection had not begun by then
    assert effective_nice(cluster.smp_info(survivor)["pid"]) == 10, "the SMP should yield the cores to training"
    job.replace(*victims, expected=expected)
    out = job.output()
    for i in victims:
        assert f"rebuilt node {i}'s snapshot" in cluster.smp_log(i), cluster.logs()
    if AUTOGROUP:  # the survivors served the rebuild at full priority, then yielded again
        assert re.search(r"nice 0 \(a node of the EC group is new or being rebuilt\).*\n.*nice 10 \(training",
                         cluster.smp_log(survivor), re.S), cluster.smp_log(survivor)
    assert "resumed-at-step" in out, cluster.logs()
    rest = restored(out)
    print(f"restores: {rest}")
    # the rebuilt rank restores from the erasure code, or, when the re-rendezvous moved it to another node, from
    # the replacement's memory (which holds it rebuilt) through that node's SMP
    assert any(src.startswith("erasure code") or src.endswith("(rank moved)") for _, _, src in rest), cluster.logs()
    steps = {s for _, s, _ in rest}
    assert len(steps) == 1, f"ranks restored different steps {rest}"
    assert steps.pop() <= kill_at + 2, f"restored {rest} but the kill came after step {kill_at}"
    waited = waits_for_the_dead(cluster, [i for i in range(nnodes) if i not in victims])
    assert not waited, (f"a survivor waited FTMEM_TIMEOUT for a dead node instead of abandoning the interrupted EC "
                        f"round (see test_node_killed_while_its_parity_is_being_computed): {waited}\n{cluster.logs()}")
    return job


AUTOGROUP = autogrouping()


def waits_for_the_dead(cluster: Cluster, nodes) -> list[str]:
    """SMP log lines of `nodes` saying an EC round ran into FTMEM_TIMEOUT (a round or a read waiting for a node
    that was dead): never needed when the dead node is noticed, and it stalls protection, or training, that long."""
    return [f"node {i}: {line}" for i in nodes for line in cluster.smp_log(i).splitlines()
            if "EC round" in line and ("timed out" in line or "within" in line)]


# ---------------------------------------------------------------------------------------------- golden runs


def test_four_nodes_one_parity_lose_one_and_rebuild_it_bit_identically(cluster, golden):
    rng = random.Random(SEED)
    k, victim = rng.randint(8, 18), rng.randint(1, 3)
    print(f"FTMEM_TEST_SEED={SEED}: node {victim} dies after step {k}")
    kill_and_replace(cluster, golden, nnodes=4, victims=(victim,), kill_at=k, script_args=DIM, keepalive=())
    assert "EC group [0, 1, 2, 3] with 1 parity" in cluster.smp_log(0)


def test_four_nodes_two_parity_lose_two_at_once(cluster, golden):
    k = random.Random(SEED + 1).randint(8, 18)
    print(f"FTMEM_TEST_SEED={SEED}: nodes 2 and 3 die after step {k}")
    kill_and_replace(cluster, golden, nnodes=4, victims=(2, 3), kill_at=k, script_args=DIM,  # (the golden run
                     extra_args=["--ftmem-ec-group", "4", "--ftmem-ec-parity", "2"])  # of the test above)
    assert "EC group [0, 1, 2, 3] with 2 parity" in cluster.smp_log(0)


def test_a_lagging_group_and_another_each_lose_a_node_and_rebuild_at_the_step_every_group_protected(cluster, golden):
    """A step is protected once every EC group's parity is in place, and every node keeps that step, so nodes
    lost from any groups are rebuilt at a step all ranks still hold. Here 4 nodes form 2 groups of 2 (f=1: each
    node's data is mirrored on its partner) and the erasure coder of group [0, 1] is slow (FTMEM_STALL_AT: each
    of its rounds takes 1.5 s more, several steps), so protection lags training by several steps. Then nodes 1
    and 3 are lost at once, one per group. Had each group protected steps on its own, group [2, 3] would have
    protected (and kept) newer steps than the only one node 1 can be rebuilt at, and no step would be
    restorable on every rank."""
    expected = golden(4, *DIM)
    # slower steps than the other tests' (the sleep changes no result): the first protected step, which the
    # stalled coder delays by seconds, then still comes early in the run, with the kill well before its end
    job = Job(cluster, 4, ["--max-restarts", "3", "--ftmem-ec-group", "2"], [*DIM, "--step-sleep", "0.2"],
              FTMEM_TIMEOUT=TIMEOUT)
    slow = {"FTMEM_STALL_AT": "smp_mid_encode=1.5"}
    job.start_all(node_env={0: slow, 1: slow})
    job.wait_for_step(3)
    node1 = cluster.client(1, timeout=30.0, retry_interval=5.0)
    lagging: list[dict] = []

    def protection_lags() -> bool:
        st = node1.call("status")
        if st["protected"] is not None and st["committed"] - st["protected"] >= 4:
            lagging.append(st)
        return bool(lagging)

    cluster.wait_until(protection_lags, 120, "protection to lag training by 4 steps", interval=0.1)
    protected, committed = lagging[0]["protected"], lagging[0]["committed"]
    print(f"node 1: committed {committed}, protected {protected}; killing nodes 1 and 3")
    job.replace(1, 3, expected=expected, now=True)
    assert "EC group [0, 1] with 1 parity" in cluster.smp_log(0), cluster.smp_log(0)
    assert "EC group [2, 3] with 1 parity" in cluster.smp_log(2), cluster.smp_log(2)
    rest = restored(job.output())
    steps = {s for _, s, _ in rest}
    assert len(steps) == 1 and protected <= steps.pop() <= committed, \
        f"every rank restores the step protected when the nodes died: {rest}\n{cluster.logs()}"
    for i in (1, 3):
        assert f"rebuilt node {i}'s snapshot of step" in cluster.smp_log(i), cluster.logs()


def test_node_0_is_lost_and_rebuilt_with_both_its_ranks_when_the_store_is_served_apart(cluster, golden):
    """With `ftmem store` hosting the rendezvous store, no training node holds it: losing node 0 (the node whose
    agent would otherwise host it, and the leader of the EC rounds) costs only the step in flight, like losing any
    other node. Two nodes of two ranks each, one group with one parity (each node's data is mirrored in its
    partner's parity): a node's snapshot is its ranks' snapshots together (one member of the EC group), and the
    replacement rebuilds every one of them."""
    k = random.Random(SEED + 5).randint(8, 18)
    print(f"FTMEM_TEST_SEED={SEED}: node 0 (2 ranks) dies after step {k}")
    port = free_port()
    store = cluster.python(["-m", "ftmem.cli", "store", "--port", str(port)], name="store")
    cluster.wait_for_line(store, "serving the rendezvous store", timeout=60)
    job = kill_and_replace(cluster, golden, nnodes=2, victims=(0,), kill_at=k, script_args=DIM, port=port, nproc=2)
    assert "EC group [0, 1] with 1 parity" in cluster.smp_log(1)
    assert re.search(r"rebuilding node 0's snapshot of step \d+ \(2 rank\(s\)", cluster.smp_log(0)), cluster.smp_log(0)
    rest = restored(job.output())
    assert {r for r, _, _ in rest} == set(range(4)), f"every rank restores: {rest}\n{cluster.logs()}"
    assert store.poll() is None, cluster.output(store)


def test_a_leader_lost_while_announcing_a_protected_step_is_rebuilt_at_the_step_before(cluster, golden):
    """The round leader (node 0, the lowest) tells the nodes a round's result one by one, its own group first.
    Here 4 nodes form 2 groups of 2, and node 0 is lost whole right after telling node 1 that a step is
    protected (FTMEM_STALL_AT holds it there: the 10th pass through smp_ec_result_sent is the third round's,
    after the messages to node 0 and node 1), so group [0, 1] protects that step and group [2, 3] the one before.
    Node 3 is lost with it, one node per group. Both replacements must be rebuilt at the step before, which every
    survivor keeps (data and parity) until the next round starts: node 0's group alone would offer the newer
    step, which node 3's ranks never get back. Every rank restores it and the final hash is the baseline's."""
    expected = golden(4, *DIM)
    port = free_port()
    store = cluster.python(["-m", "ftmem.cli", "store", "--port", str(port)], name="store")
    cluster.wait_for_line(store, "serving the rendezvous store", timeout=60)
    job = Job(cluster, 4, ["--max-restarts", "3", "--ftmem-ec-group", "2"], DIM, port=port, FTMEM_TIMEOUT=TIMEOUT)
    job.start_all(node_env={0: {"FTMEM_STALL_AT": "smp_ec_result_sent#10=60"}})
    nodes = {i: cluster.client(i, timeout=5.0, retry_interval=5.0) for i in (1, 2)}
    seen: list[tuple[float, int | None, int | None]] = []

    def split_for_a_second() -> bool:
        """Node 1 protects a newer step than node 2, and did a second ago (not a result still on its way)."""
        try:
            now, (p1, p2) = time.monotonic(), (nodes[i].call("status")["protected"] for i in (1, 2))
        except (SmpError, SmpUnavailable):
            return False  # not started yet
        seen.append((now, p1, p2))
        split = p1 is not None and p2 is not None and p1 > p2
        return split and any(t <= now - 1.0 and (a, b) == (p1, p2) for t, a, b in seen)

    cluster.wait_until(split_for_a_second, 120, "node 0 to stall between telling node 1 and node 2", interval=0.2)
    _, newer, before = seen[-1]
    print(f"node 1 protects step {newer}, node 2 step {before}: killing nodes 0 and 3")
    job.replace(0, 3, expected=expected, now=True)
    for i in (0, 3):
        assert f"rebuilt node {i}'s snapshot of step {before}" in cluster.smp_log(i), cluster.logs()
    assert f"rebuilding at step {before}, the newest that every surviving group member keeps and the job's other " \
        f"nodes too" in cluster.smp_log(0), cluster.smp_log(0)
    rest = restored(job.output())
    assert {s for _, s, _ in rest} == {before}, f"every rank restores step {before}: {rest}\n{cluster.logs()}"
    assert store.poll() is None, cluster.output(store)


def test_ftmem_store_says_when_its_port_is_taken(cluster):
    with socket.socket() as taken:
        taken.bind(("0.0.0.0", 0))
        taken.listen()
        port = taken.getsockname()[1]
        store = cluster.python(["-m", "ftmem.cli", "store", "--port", str(port)], name="store")
        out = cluster.wait(store, 60)
    assert store.returncode == 1 and f"ftmem store: cannot serve port {port}" in out, out
    assert "address already in use" in out, out


def test_more_losses_than_parity_fail_loudly(cluster):
    """Nodes 1 and 2 of a 3-node f=1 group die at once: their snapshots are gone for good. The job must fail with
    an error naming the lost data (restore.py's `_agree`, carrying rebuild.py's RebuildError), never restart from
    step 0 and never finish (with a wrong hash)."""
    k = random.Random(SEED + 2).randint(8, 18)
    print(f"FTMEM_TEST_SEED={SEED}: nodes 1 and 2 die after step {k}")
    job = Job(cluster, 3, ["--max-restarts", "1"], FTMEM_TIMEOUT=TIMEOUT)
    job.start_all()
    job.wait_for_step(k)
    job.kill(1, 2)
    survivor = job.procs[0]
    mark = len(cluster.output(survivor))  # training ran on while ftmem-chaos started (seconds, on a busy machine)
    last = max(int(x) for x in re.findall(r"^step (\d+) loss", cluster.output(survivor)[:mark], re.M))
    for i in (1, 2):
        job.start(i, name=f"node{i}-replacement")
    codes = job.finish(timeout=200)
    print(f"exit codes {codes}")
    after = cluster.output(survivor)[mark:] + "".join(cluster.output(job.procs[i]) for i in (1, 2))
    smp = "".join(cluster.smp_log(i) for i in range(3))
    for line in (after + smp).splitlines():
        if re.search(r"restorable|cannot rebuild|cannot be rebuilt|restore failed|restored step|resumed-at|"
                     r"RestoreError|RebuildError", line):
            print(f"   {line[:300]}")
    assert all(code != 0 for code in codes.values()), f"exit codes {codes}\n{cluster.logs()}"
    assert job.final_hashes() == [], f"the job finished after losing more than f nodes\n{cluster.logs()}"
    assert "resumed-at-step" not in after and "starting at step 0" not in after, cluster.logs()
    # rank 0 may still print the step that was in flight at the kill, nothing after it
    late = [int(x) for x in re.findall(r"^step (\d+) loss", after, re.M)]
    assert all(s == last + 1 for s in late), f"training went on after the loss: steps {late} after {last}\n" \
                                             f"{cluster.logs()}"
    assert "no snapshot is restorable on every rank" in after, cluster.logs()
    assert re.search(r"cannot rebuild node [12]'s snapshot of step \d+: group members \[[12]\] are unavailable",
                     after + smp), cluster.logs()


def test_peer_smp_killed_while_serving_a_rebuild_is_waited_for_and_the_rebuild_retried(cluster, golden):
    """Node 2 is lost whole; while its replacement rebuilds, node 1's SMP dies (crash point smp_serving_rebuild:
    at its first parity read, which only a rebuild makes) and its ftmem-run restarts it with node 1's memory
    intact. With f=1 that attempt has lost a second member: it must notice within the peer timeout (not wait out
    FTMEM_TIMEOUT on the dead SMP), ask the group again once node 1's SMP is back, rebuild, and the job must end
    with the baseline's hash, never restarting from step 0. (A member that does not come back: the retry finds
    it gone and the rebuild fails loudly, as in test_more_losses_than_parity_fail_loudly.)"""
    k = random.Random(SEED + 3).randint(8, 18)
    print(f"FTMEM_TEST_SEED={SEED}: node 2 dies after step {k}; node 1's SMP dies serving the rebuild")
    expected = golden(3)
    job = Job(cluster, 3, ["--max-restarts", "3"], FTMEM_TIMEOUT=TIMEOUT)
    marker = cluster.tmp / "crash"
    job.start_all(node_env={1: {"FTMEM_CRASH_AT": "smp_serving_rebuild@*", "FTMEM_CRASH_MARKER": str(marker)}})
    job.wait_for_step(k)
    job.kill(2)
    started = time.monotonic()
    job.start(2, name="node2-replacement")
    cluster.wait_until(lambda: "asking the group again" in cluster.smp_log(2), 60,
                       "node 2's rebuild to notice node 1's SMP is gone")
    noticed_after = time.monotonic() - started
    codes = job.finish(timeout=240)
    print(f"the rebuild lost node 1 {noticed_after:.1f}s after the replacement started; exit codes {codes}")
    assert marker.with_name("crash.smp_serving_rebuild.*").exists(), f"the crash point never fired\n{cluster.logs()}"
    assert re.search(r"node 2's rebuild lost group member\(s\) \[1\] mid-way .*cannot rebuild node 2's snapshot "
                     r"of step \d+: group members \[1\] are unavailable", cluster.smp_log(2)), cluster.logs()
    assert noticed_after < float(TIMEOUT), f"the rebuild waited out FTMEM_TIMEOUT on the dead SMP\n{cluster.logs()}"
    assert "restarting it (restart 1)" in cluster.output(job.procs[1]), cluster.logs()
    assert "rebuilt node 2's snapshot" in cluster.smp_log(2), cluster.logs()
    assert codes == {i: 0 for i in range(3)}, f"exit codes {codes}\n{cluster.logs()}"
    assert job.final_hashes() == [expected], f"final hashes {job.final_hashes()}, baseline {expected}\n{cluster.logs()}"
    assert job.output().count("no snapshot to restore") == 3, f"a rank started over\n{cluster.logs()}"
    assert {src for _, _, src in restored(job.output())} == {"local memory", "erasure code of EC group [0, 1, 2]"}, \
        cluster.logs()


def test_smp_restarted_while_training_stalls_is_protected_again(cluster, golden):
    """A restarted SMP re-adopts its snapshots and the parity of the protected step (so its group stays
    protected); the round leader also protects the newest committed step again at once, even while training is
    stalled and commits nothing new. A node lost next is still rebuilt (node 2's data shares stripes with node
    1's parity) and the job ends bit-identically. `ftmem status` shows every node's committed and protected
    step, and the lag between them, while training is stalled."""
    k = random.Random(SEED + 4).randint(6, 14)
    print(f"FTMEM_TEST_SEED={SEED}: training stalls after step {k}; node 1's SMP dies, then node 2 whole")
    expected = golden(3, *DIM)
    job = Job(cluster, 3, ["--max-restarts", "3"], DIM, FTMEM_TIMEOUT=TIMEOUT)
    job.start_all()
    job.wait_for_step(k)
    workers = {i: list(cluster.workers(job.procs[i]).values()) for i in range(3)}
    assert all(len(w) == 1 for w in workers.values()), f"workers {workers}\n{cluster.logs()}"
    for w in workers.values():
        w[0].suspend()

    clients: dict[int, ControlClient] = {}

    def statuses() -> list[dict]:
        out = []
        for i in range(3):
            try:
                if i not in clients:
                    clients[i] = cluster.client(i, timeout=5.0, retry_interval=5.0)
                out.append(clients[i].call("status"))
            except (SmpError, SmpUnavailable, TimeoutError):
                clients.pop(i, None)  # a fresh client for the restarted SMP (cluster closes them all at the end)
                return []
        return out

    def all_protected(pid_of_1: int | None = None) -> bool:
        st = statuses()
        return (len(st) == 3 and st[0]["committed"] is not None and (pid_of_1 is None or st[1]["pid"] != pid_of_1)
                and all(s["committed"] == st[0]["committed"] == s["protected"] for s in st))

    cluster.wait_until(all_protected, 60, "the committed step to be protected on every node", interval=0.5)
    step = statuses()[0]["committed"]
    table = cluster.wait(cluster.python(["-m", "ftmem.cli", "status", "--job-id", cluster.job], name="status"), 60)
    rows = {int(f[1]): f[3:6] for f in map(str.split, table.splitlines()) if f and f[0] == cluster.job}
    assert rows == {i: [str(step), str(step), "0"] for i in range(3)}, f"committed, protected, lag:\n{table}"
    old_smp = cluster.smp_info(1)["pid"]
    psutil.Process(old_smp).kill()
    cluster.wait_until(lambda: all_protected(old_smp), 60, "node 1's restarted SMP to be protected again",
                       interval=0.5)
    assert "re-adopted" in cluster.smp_log(1), cluster.logs()
    assert f"re-adopted the parity of protected step {step}" in cluster.smp_log(1), cluster.logs()
    assert statuses()[0]["committed"] == step, "training was stalled: nothing new may commit"
    job.kill(2)
    for i in (0, 1):
        workers[i][0].resume()
    job.start(2, name="node2-replacement")
    codes = job.finish()
    assert codes == {i: 0 for i in range(3)}, f"exit codes {codes}\n{cluster.logs()}"
    assert job.final_hashes() == [expected], cluster.logs()
    assert f"rebuilt node 2's snapshot of step {step}" in cluster.smp_log(2), cluster.logs()


# ----------------------------------------------------------------------------- a node lost during an EC round

def test_node_killed_while_its_parity_is_being_computed(cluster, golden):
    """Deterministic trigger instead of a random moment: an SMP's second parity slot (parity1) is created when it
    starts the first EC round after a step was protected (parity0 then holds that step), right after fetching the
    manifests and before reading any data. The test polls /dev/shm and kills node 2 whole as soon as node 2's
    parity1 appears, i.e. while node 2 computes parity for that round (and its peers read node 2's data for
    theirs); rounds of this model take ~0.1 s here, the kill a few ms. Node 0's protected step, sampled all along,
    proves it: if it is still the first step ever protected after the kill, the second round never completed.
    The survivors keep the previously protected step, the replacement rebuilds it, every rank restores it and the
    final hash is the baseline's. Afterwards the group must protect newer steps again: the interrupted round must
    not block erasure coding for the rest of the job."""
    expected = golden(3, *DIM)
    job = Job(cluster, 3, ["--max-restarts", "3"], DIM, FTMEM_TIMEOUT=TIMEOUT)
    job.start_all()
    node0 = ControlClient(cluster.control_address(0), timeout=10.0, retry_interval=2.0)
    cluster.clients.append(node0)
    slot = f"ftmem.{cluster.job}.n2.parity1."
    first: list[int] = []  # the first step node 0 reported protected

    def round_started() -> bool:
        if any(p.poll() is not None for p in job.procs.values()):
            pytest.fail(f"a node exited before node 2's second EC round\n{cluster.logs()}")
        if any(s.startswith(slot) for s in node_segments(cluster, 2)):
            return True
        if not first:
            protected = node0.call("status", timeout=5.0)["protected"]
            first.extend([] if protected is None else [protected])
        return False

    cluster.wait_until(round_started, 120, "node 2 to start its second EC round", interval=0.001)
    start = time.monotonic()
    job.kill(2, now=True)
    print(f"node 2 killed {1000 * (time.monotonic() - start):.0f} ms after its second round was "
          f"seen starting")
    status = node0.call("status")
    print(f"node 0: first protected step {first}; right after the kill: committed {status['committed']}, "
          f"protected {status['protected']}")
    assert first and status["protected"] == first[0], (
        f"node 2's second round completed before the kill landed (first protected step {first}, protected after "
        f"the kill {status['protected']}): the kill was not mid-round\n{cluster.logs()}")
    job.start(2, name="node2-replacement")
    seen: list[tuple[int, int]] = []

    def watch() -> None:
        try:
            st = node0.call("status", timeout=1.0)
        except (SmpUnavailable, SmpError):
            return
        if st["protected"] is not None and (not seen or seen[-1] != (st["committed"], st["protected"])):
            seen.append((st["committed"], st["protected"]))

    codes = job.finish(poll=watch)
    assert codes == {0: 0, 1: 0, 2: 0}, f"exit codes {codes}\n{cluster.logs()}"
    assert job.final_hashes() == [expected], f"{job.final_hashes()} vs baseline {expected}\n{cluster.logs()}"
    rebuilt = re.findall(r"rebuilt node 2's snapshot of step (\d+)", cluster.smp_log(2))
    rest = restored(job.output())
    print(f"rebuilt {rebuilt}, restores {rest}")
    print(f"node 0's (committed, protected) from the replacement's start to the end: {seen}")
    for i in (0, 1, 2):
        for line in cluster.smp_log(i).splitlines():
            if "EC round" in line:
                print(f"   node {i}: {line}")
    assert rebuilt and int(rebuilt[0]) == status["protected"], cluster.logs()
    assert {s for _, s, _ in rest} == {status["protected"]}, cluster.logs()
    waited = waits_for_the_dead(cluster, (0, 1))
    assert not waited, (f"a survivor waited FTMEM_TIMEOUT for the dead node instead of abandoning the interrupted "
                        f"round: {waited} (node 0's (committed, protected): {seen})\n{cluster.logs()}")
    assert max((p for _, p in seen), default=-1) > status["protected"], (
        f"no step after {status['protected']} was protected again before the job ended (node 0 saw {seen}): the "
        f"round interrupted by the kill blocks erasure coding until it times out\n{cluster.logs()}")


# ------------------------------------------------------------------------------------------ the peer socket

SECRET = "s3cret-for-ftmem-peer-tests-0001"  # 32 characters


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _mac(secret: bytes, frames: list[bytes]) -> bytes:
    """The MAC documented in ftmem/smp/peer.py, independent of PeerCodec: nonce + ChaCha20-Poly1305's tag (one-shot
    AEAD) of an empty plaintext with the length-prefixed frames as associated data, keyed by HKDF-SHA256."""
    key = HKDF(SHA256(), 32, salt=None, info=b"ftmem 2026-11 peer message MAC").derive(secret)
    nonce = os.urandom(12)
    aad = b"".join(len(f).to_bytes(8, "little") + f for f in frames)
    return nonce + ChaCha20Poly1305(key).encrypt(nonce, b"", aad)


class Peers:
    """Two bare SMPs of a 2-node job (`python -m ftmem.smp --nnodes 2`), sharing a known secret and meeting
    through a TCPStore hosted by this process."""

    def __init__(self, c: Cluster) -> None:
        from torch.distributed import TCPStore

        self.c, port = c, free_port()
        self.store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False,
                              timeout=timedelta(seconds=30))
        self.args = ["--nnodes", "2", "--store", f"127.0.0.1:{port}", "--peer-host", "127.0.0.1", "--timeout", "30"]
        self.smp0 = self._start(0)
        self.smp1 = c.start_smp(*self.args, node=1, name="smp1", FTMEM_SECRET=SECRET)

    def _start(self, node: int):
        key = f"ftmem/{self.c.job}/smp/{node}"
        old = self.store.get(key) if self.store.check([key]) else None
        proc = self.c.start_smp(*self.args, node=node, name=f"smp{node}-{len(self.c.procs)}", FTMEM_SECRET=SECRET)
        self.c.wait_until(lambda: self.store.check([key]) and self.store.get(key) != old, 30,
                          f"node {node}'s SMP to publish its peer endpoint")
        self.endpoint, _ = msgpack.unpackb(self.store.get(key), raw=False)
        assert f"peer endpoint {self.endpoint}" in self.c.output(proc), self.c.logs()
        return proc

    def live(self):
        """(node 0's peer endpoint, its SMP process), restarting that SMP if an earlier test killed it; returned
        once each SMP has heard the other (a message from a node not yet discovered names no incarnation to
        check)."""
        if self.smp0.poll() is not None:
            print(f"(node 0's SMP had exited with {self.smp0.returncode}: starting a new one)")
            self.smp0 = self._start(0)
        clients = [self.c.client(node, timeout=10.0) for node in (0, 1)]
        self.c.wait_until(lambda: all(c.call("status")["peers"].get(str(1 - i), {}).get("alive")
                                      for i, c in enumerate(clients)), 60, "the two SMPs to hear each other")
        return self.endpoint, self.smp0


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("peers"))
    try:
        p = Peers(c)
        yield p
        del p.store
    finally:
        c.cleanup()


def test_peer_socket_drops_forged_and_malformed_messages(peers):
    """Raw frames at a real SMP's peer socket: each is rejected with a `rejected a peer message` log line saying
    why, and the SMP goes on serving its peers (PeerLink) and its ranks (control socket). A message that is not
    authentic gets no reply; an authentic one that breaks the schema gets an error reply saying why, so its
    sender does not wait out a timeout."""
    c, (endpoint, smp0) = peers.c, peers.live()
    job, secret = c.job, SECRET.encode()
    good = PeerCodec(secret, job, 1)
    header = good.pack("ec_status", 1)[1]

    def signed(hdr: bytes, *blobs: bytes) -> list[bytes]:
        return [_mac(secret, [hdr, *blobs]), hdr, *blobs]

    def garbled(at: int) -> bytes:
        mac = bytearray(_mac(secret, [header]))
        mac[at] ^= 0x40
        return bytes(mac)

    big = bytes(129 << 20)  # under zmq's per-frame MAXMSGSIZE; two of them exceed MAX_PEER_BYTES
    cases = {
        "wrong secret": (PeerCodec(b"W" * 32, job, 1).pack("ec_status", 1), "bad or missing MAC"),
        "truncated (MAC frame only)": ([_mac(secret, [header])], "truncated"),
        "one empty frame": ([b""], "truncated"),
        "garbled nonce": ([garbled(5), header], "bad or missing MAC"),
        "garbled tag": ([garbled(20), header], "bad or missing MAC"),
        "short MAC": ([_mac(secret, [header])[:16], header], "bad or missing MAC"),
        "MAC of another header": ([_mac(secret, [header]), good.pack("manifest", 2, step=0)[1]], "bad or missing"),
        "blob appended after signing": ([*good.pack("ec_status", 3), b"extra"], "bad or missing MAC"),
        "oversized (2 x 129 MiB)": (signed(header, big, big), f"larger than {MAX_PEER_BYTES}"),
        "signed for another job": (PeerCodec(secret, "otherjob", 5).pack("ec_status", 1),
                                   f"for job 'otherjob', not '{job}'"),
    }
    malformed = {  # correctly signed
        "unknown op": (good.pack("shutdown", 4), "unknown op"),
        "unexpected field": (good.pack("ec_status", 5, admin=True), "unexpected fields"),
        "wrong field type": (good.pack("manifest", 6, step="0"), "field 'step' must be int"),
        "missing field": (good.pack("parity", 7, step=0), "missing field 'slots'"),
        "bool as id": (signed(msgpack.packb({"op": "ec_status", "id": True, "job": job, "from": 1})), "'id'"),
        "not msgpack": (signed(b"\xc1\xc1\xc1"), "undecodable"),
        "not a map": (signed(msgpack.packb([1, 2, 3])), "must be a map"),
    }
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        cases_seen = list(cases)
        for what, (frames, reason) in [*cases.items(), *malformed.items()]:
            count = c.output(smp0).count("rejected a peer message")
            sock.send_multipart(frames, copy=False)
            c.wait_until(lambda: c.output(smp0).count("rejected a peer message") > count or smp0.poll() is not None,
                         30, f"the SMP to reject a message: {what}")
            assert smp0.poll() is None, f"{what} killed the SMP\n{c.logs()}"
            line = [x for x in c.output(smp0).splitlines() if "rejected a peer message" in x][count]
            print(f"{what}: {line.split('rejected a peer message: ')[-1][:160]}")
            assert reason in line, f"{what}: {line}"
            if what in malformed:
                assert sock.poll(10_000), f"no error reply to an authentic but malformed message: {what}"
                reply, _ = good.unpack(sock.recv_multipart())
                assert reply["op"] == "reply" and not reply["ok"] and reason in reply["error"], (what, reply)
            else:
                assert sock.poll(500) == 0, f"a rejected forgery got a reply: {what}: {sock.recv_multipart()}"
        del big, cases

        # a flood of forgeries is logged one by one only up to a budget (Throttled): it must not fill the disk
        forged = PeerCodec(b"W" * 32, job, 1).pack("ec_status", 1)
        for _ in range(300):
            sock.send_multipart(forged, copy=False)
        sock.send_multipart(good.pack("ec_status", 8, admin=True), copy=False)  # answered after the flood
        assert sock.poll(30_000), "no reply after a flood of forgeries"
        sock.recv_multipart()
        assert smp0.poll() is None, c.logs()
        lines = c.output(smp0).count("rejected a peer message: ")
        assert len(cases_seen) <= lines <= 20, f"{lines} lines for {len(cases_seen)} + 300 forgeries\n{c.logs()}"

        # one frame beyond the socket's MAXMSGSIZE: zmq drops the connection before any ftmem code sees it
        count = c.output(smp0).count("rejected a peer message")
        sock.send_multipart(signed(header, bytes(MAX_PEER_BYTES + 8192)), copy=False)
        time.sleep(1.0)
        assert smp0.poll() is None, c.logs()
        assert c.output(smp0).count("rejected a peer message") == count

        link = PeerLink(good, endpoint)
        try:
            msg, blobs = link.request("ec_status", timeout=10)
            assert msg["ok"] and msg["op"] == "reply" and blobs == [], (msg, blobs)
        finally:
            link.close()
        client = ControlClient(c.control_address(0), timeout=10.0, retry_interval=2.0)
        try:
            assert client.call("ping")["ok"]
        finally:
            client.close()
    finally:
        sock.close(0)


def test_round_messages_of_a_replaced_incarnation_are_ignored(peers):
    """An SMP that was replaced but still runs (its node came back after a partition healed) believes it is its
    node: its round messages, authentic as they are, name an incarnation the directory no longer has, and the
    live SMPs ignore them (with a log line) instead of starting or finishing rounds on its word."""
    c, (endpoint, smp0) = peers.c, peers.live()
    stale = PeerCodec(SECRET.encode(), c.job, 1)
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    try:
        for op, fields in [("ec_start", {"round": 1, "step": 0, "base": -1}),
                           ("ec_result", {"round": 1, "step": 0, "ok": True})]:
            sock.send_multipart(stale.pack(op, 0, incarnation="1-stale", **fields), copy=False)
            c.wait_until(lambda: f"ignored {op!r} from node 1's incarnation 1-stale" in c.output(smp0), 30,
                         f"node 0 to ignore the stale {op}")
    finally:
        sock.close(0)
    assert "EC round of step 0" not in c.output(smp0) and smp0.poll() is None, c.logs()


def _request(c: Cluster, endpoint: str, smp0, op: str, **fields) -> tuple[dict, list[bytes]]:
    """A correctly signed request from node 1; fails the test at once (with the logs) if the SMP died of it."""
    link = PeerLink(PeerCodec(SECRET.encode(), c.job, 1), endpoint)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                return link.request(op, timeout=0.5, **fields)
            except TimeoutError:
                if smp0.poll() is not None:
                    pytest.fail(f"a signed {op} {fields} killed the SMP (exit {smp0.returncode})\n{c.logs()}")
                link.close()
        pytest.fail(f"no reply to a signed {op} {fields}\n{c.logs()}")
    finally:
        link.close()


@pytest.mark.parametrize("op, fields", [("manifest", {"step": 5}), ("data", {"step": 5, "ranges": [[0, 4096]]})])
def test_reads_of_a_step_not_held_are_refused(peers, op, fields):
    """An SMP holding no snapshot of step 5 (here: none at all, like a replacement node still being rebuilt) must
    refuse to serve step 5's manifest or data, not answer with an empty manifest or empty chunks: a rebuilding
    peer that reads those takes them for real data (see test_four_nodes_two_parity_lose_two_at_once)."""
    c, (endpoint, smp0) = peers.c, peers.live()
    with pytest.raises(RuntimeError, match="step 5"):
        msg, blobs = _request(c, endpoint, smp0, op, **fields)
        print(f"{op} {fields} was answered: {[bytes(b)[:64] for b in blobs]}")


@pytest.mark.parametrize("op, fields", [
    ("parity", {"step": 0, "slots": ["x"]}),
    ("payload", {"rank": 0, "step": 0, "offset": -5, "length": -5}),
    ("payload", {"rank": -1, "step": 0, "offset": 0, "length": 1 << 40}),
    ("data", {"step": 0, "ranges": [5]}),
    ("data", {"step": 0, "ranges": [["a", "b"]]}),
])
def test_signed_requests_with_bad_values_get_an_error_not_a_crash(peers, op, fields):
    """Signed messages that pass the schema but carry nonsense inside a list, or out-of-range numbers: like a bad
    control request, they get an error reply and the SMP goes on serving (it must not die of a peer message).
    (A case that kills node 0's SMP fails, and the next test starts a new one.)"""
    c, (endpoint, smp0) = peers.c, peers.live()
    try:
        msg, blobs = _request(c, endpoint, smp0, op, **fields)
        print(f"{op} {fields}: answered ok with {len(blobs)} blob(s)")
    except RuntimeError as exc:
        print(f"{op} {fields}: {exc}")
    msg, _ = _request(c, endpoint, smp0, "ec_status")
    assert msg["ok"] and smp0.poll() is None


def test_a_stalled_smp_does_not_take_its_live_peers_for_gone(peers):
    """An SMP that did not run for longer than PEER_TIMEOUT_S (SIGSTOP here; in a job, a niced SMP starved beside
    training, spending seconds on one message) finds its peer's heartbeats queued unread when it runs again: that
    peer is alive, also to a request already waiting, which it answers before it reads the queued reports. (Taken
    for gone, it would fail EC rounds for nothing and move the leader.) Its peer, meanwhile, rightly missed it:
    with a step committed and protected (a fake rank on each node), it says once that no step can be protected
    without node 0 (as for a node lost and not replaced, or one that never joined an elastic job running below
    --nnodes' maximum), and that the job is whole again when node 0 is back."""
    from test_smp_protocol import payload_for, write_snapshot

    c, (_, smp0) = peers.c, peers.live()
    client = c.client(0, timeout=60.0, retry_interval=60.0)
    ranks = {node: c.client(node, timeout=60.0) for node in (0, 1)}
    for rank in (0, 1):
        ranks[rank].call("register", rank=rank, world=2, local_rank=0, pid=1000 + rank)
        ranks[rank].call("begin", rank=rank, step=-1, epoch=1)
    for rank in (0, 1):
        write_snapshot(ranks[rank], rank, 0, 1, payload_for(rank, 0))
    c.wait_until(lambda: client.call("status")["protected"] == 0, 30, "step 0 to be protected")
    answer: dict = {}
    asking = threading.Thread(target=lambda: answer.update(client.call("status")), daemon=True)
    seen_by_1 = len(c.output(peers.smp1))
    warning = ("node(s) [0] not reachable (never joined, or lost and not replaced); no newer step is protected "
               "until they are back (newest protected: 0)")
    smp0.send_signal(signal.SIGSTOP)
    try:
        time.sleep(PEER_TIMEOUT_S + 2)  # node 1 heartbeats all along
        c.wait_until(lambda: warning in c.output(peers.smp1)[seen_by_1:], 30, "node 1 to say node 0 is gone")
        asking.start()
        time.sleep(0.3)  # the request is queued before the reports' newer ones
    finally:
        smp0.send_signal(signal.SIGCONT)
    asking.join(60)
    print(f"node 0's view of its peers on waking: {answer.get('peers')}")
    assert answer["peers"]["1"]["alive"], f"node 0 took node 1 for gone after its own stall\n{c.logs()}"
    c.wait_until(lambda: "every node of the job is reachable again" in c.output(peers.smp1)[seen_by_1:], 30,
                 "node 1 to see node 0 back")
    assert c.output(peers.smp1)[seen_by_1:].count(warning) == 1, c.logs()


# ------------------------------------------------------------------------------------- ranks that move away

def test_a_rank_that_moved_frees_its_buffers_on_its_old_node_once_the_job_moved_on(cluster):
    """Two bare SMPs of a 2-node job with fake ranks (the control protocol a rank speaks). In epoch 1 rank r
    lives on node r; in epoch 2 a re-rendezvous swaps them, each fetches its snapshot from its old node and
    writes the next steps on its new one. The old node keeps the moved rank's buffers while anything may read
    them (the restore's transfer, the parity of the protected step and of the one before), then frees them:
    once newer steps are protected without them. Without that, every move leaves a whole set of buffers
    behind."""
    from torch.distributed import TCPStore

    from test_smp_protocol import payload_for, write_snapshot

    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    args = ["--nnodes", "2", "--store", f"127.0.0.1:{port}", "--peer-host", "127.0.0.1", "--timeout", "30",
            "--buffers", "4"]
    smp = {node: cluster.start_smp(*args, node=node, name=f"smp{node}", FTMEM_SECRET=SECRET) for node in (0, 1)}
    client = {node: cluster.client(node, timeout=60.0) for node in (0, 1)}

    def rank_segments(node: int, rank: int) -> list[str]:
        return [s for s in cluster.segments() if s.startswith(f"ftmem.{cluster.job}.n{node}.r{rank}.")]

    def protected(step: int) -> bool:
        return all(client[n].call("status").get("protected") == step for n in (0, 1))

    for rank in (0, 1):  # epoch 1: rank r on node r
        client[rank].call("register", rank=rank, world=2, local_rank=0, pid=1000 + rank)
        client[rank].call("begin", rank=rank, step=-1, epoch=1)
    for step in range(3):
        for rank in (0, 1):
            write_snapshot(client[rank], rank, step, 1, payload_for(rank, step))
    cluster.wait_until(lambda: protected(2), 60, "step 2 to be protected on both nodes", interval=0.2)

    for rank in (0, 1):  # epoch 2: swapped; each rank's step 2 is fetched from its old node
        new = 1 - rank
        client[new].call("register", rank=rank, world=2, local_rank=0, pid=2000 + rank)
        try:
            reply = client[new].call("begin", rank=rank, step=2, epoch=2)
        except SmpError as exc:
            pytest.fail(f"{exc}\n{cluster.logs()}")
        assert "rank moved" in reply["source"], reply
    for rank in (0, 1):
        assert rank_segments(rank, rank), f"rank {rank}'s old buffers went while they are the protected step's data"
        assert "released rank" not in cluster.output(smp[rank]), cluster.logs()
    for rank in (0, 1):
        write_snapshot(client[1 - rank], rank, 3, 2, payload_for(rank, 3))
    cluster.wait_until(lambda: protected(3), 60, "step 3 to be protected on both nodes", interval=0.2)
    for rank in (0, 1):
        assert rank_segments(rank, rank), f"rank {rank}'s old buffers went while step 2 is the one protected before"
        write_snapshot(client[1 - rank], rank, 4, 2, payload_for(rank, 4))
    cluster.wait_until(lambda: protected(4), 60, "step 4 to be protected on both nodes", interval=0.2)
    cluster.wait_until(lambda: not rank_segments(0, 0) and not rank_segments(1, 1), 30,
                       "the moved ranks' old buffers to be freed", interval=0.2)
    for rank in (0, 1):
        assert f"released rank {rank}'s buffers" in cluster.output(smp[rank]), cluster.logs()
        assert str(rank) not in client[rank].call("status")["ranks"], "its old registration must go too"
        assert rank_segments(1 - rank, rank), "the rank's buffers on its new node must stay"
        assert [s for s, _ in client[1 - rank].call("available", rank=rank)["steps"]][:1] == [4]
    del store



def protected_pair(cluster: Cluster, host: str, payload_bytes: int):
    """Two bare SMPs of a 2-node job meeting through a TCPStore at `host` (peer addresses: their default, the one
    routing to the store), each with a fake rank whose snapshot of step 0 (`payload_bytes` bytes) is protected.
    Returns the store (keep it referenced), the SMPs' arguments and the SMP processes by node."""
    from torch.distributed import TCPStore

    from test_smp_protocol import write_snapshot

    port = free_port()
    store = TCPStore(host, port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    args = ["--nnodes", "2", "--store", f"{host}:{port}", "--timeout", "30"]
    smp = {node: cluster.start_smp(*args, node=node, name=f"smp{node}", FTMEM_SECRET=SECRET) for node in (0, 1)}
    client = {node: cluster.client(node, timeout=60.0) for node in (0, 1)}
    for rank in (0, 1):
        client[rank].call("register", rank=rank, world=2, local_rank=0, pid=1000 + rank)
        client[rank].call("begin", rank=rank, step=-1, epoch=1)
    for rank in (0, 1):
        write_snapshot(client[rank], rank, 0, 1, os.urandom(payload_bytes))
    cluster.wait_until(lambda: all(client[n].call("status").get("protected") == 0 for n in (0, 1)), 60,
                       "step 0 to be protected on both nodes", interval=0.2)
    return store, args, smp


def test_a_replacement_without_room_for_its_snapshot_says_so(cluster):
    """A replacement node whose /dev/shm cannot hold the node's snapshot does not rebuild it: its SMP logs why and
    goes on serving, and its ranks get that error instead of waiting out their timeout. (The shortage is real but
    forced: under an RLIMIT_FSIZE below the snapshot's size posix_fallocate fails, with EFBIG instead of ENOSPC.)
    The node's segments are created off the event loop (`BufferStore.when_ready`), like a rank's first ones."""
    store, args, smp = protected_pair(cluster, "127.0.0.1", 6 << 20)
    smp[1].kill()
    smp[1].wait(30)
    for name in node_segments(cluster, 1):
        os.unlink(os.path.join(shm_dir(), name))
    limited = ("import resource, runpy; resource.setrlimit(resource.RLIMIT_FSIZE, (4 << 20, 4 << 20)); "
               "runpy.run_module('ftmem.smp', run_name='__main__', alter_sys=True)")
    new = cluster.python(["-c", limited, "--job-id", cluster.job, "--node", "1", *args], "smp1-replacement",
                         FTMEM_SECRET=SECRET)
    cluster.wait_until(lambda: "cannot be rebuilt" in cluster.output(new) or new.poll() is not None, 60,
                       "the replacement to give up its rebuild")
    assert new.poll() is None, f"the replacement's SMP died\n{cluster.logs()}"
    assert re.search(r"node 1 cannot be rebuilt: ftmem: could not allocate \d+ bytes .*File too large",
                     cluster.output(new)), cluster.logs()
    client = cluster.client(1, timeout=30.0)
    client.call("register", rank=1, world=2, local_rank=0, pid=2001)
    assert "File too large" in client.call("available", rank=1)["lost"], cluster.logs()
    assert smp[0].poll() is None
    del store


@pytest.mark.skipif(not socket.has_ipv6 or not _ipv6_loopback(), reason="no IPv6 loopback (::1) here")
def test_smps_meet_and_protect_over_ipv6(cluster):
    """A job whose rendezvous endpoint is an IPv6 address: each SMP binds its peer socket to the IPv6 address that
    routes to the store, publishes it in brackets, and the nodes protect their steps over it."""
    store, _, smp = protected_pair(cluster, "::1", 64 << 10)
    for node in (0, 1):
        assert "peer endpoint tcp://[::1]:" in cluster.output(smp[node]), cluster.logs()
    del store


def test_a_node_started_with_other_ec_settings_or_secret_is_refused(cluster):
    """Every node must lay out the same EC groups and share the peer secret. A node started with another
    --ftmem-ec-parity than the job's first one, or another FTMEM_SECRET, does not join (its parity would not fit
    the group's; every message of it would be rejected): its SMP logs why and its ranks cannot start, with an
    error saying what differs, while the first node goes on serving."""
    from torch.distributed import TCPStore

    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    args = ["--nnodes", "3", "--store", f"127.0.0.1:{port}", "--peer-host", "127.0.0.1", "--timeout", "30"]
    smp0 = cluster.start_smp(*args, "--ec-parity", "1", node=0, name="smp0", FTMEM_SECRET=SECRET)
    cluster.wait_until(lambda: "peer endpoint" in cluster.output(smp0), 30, "node 0 to join")
    ours, other = secret_id(SECRET.encode()), secret_id(SECRET.upper().encode())
    job = f"nnodes=3 ec_group=3 ec_parity=1 secret={ours}"
    for node, (flag, secret, settings) in enumerate([
            (["--ec-parity", "2"], SECRET, f"nnodes=3 ec_group=3 ec_parity=2 secret={ours}"),
            (["--ec-parity", "1"], SECRET.upper(), f"nnodes=3 ec_group=3 ec_parity=1 secret={other}")], start=1):
        smp = cluster.start_smp(*args, *flag, node=node, name=f"smp{node}", FTMEM_SECRET=secret)
        client = cluster.client(node, timeout=30.0)
        client.call("register", rank=node, world=3, local_rank=0, pid=1000 + node)
        with pytest.raises(SmpError) as refused:
            client.call("available", rank=node)
        why = f"this node runs with {settings}, the job's other nodes with {job}: start every node with the same"
        assert f"node {node}'s SMP cannot join its EC group: " in str(refused.value), refused.value
        assert why in str(refused.value), refused.value
        assert why in cluster.output(smp) and "peer endpoint" not in cluster.output(smp), cluster.logs()
    assert cluster.client(0).call("status")["ec_parity"] == 1 and smp0.poll() is None
    del store


def test_an_smp_started_before_the_rendezvous_store_waits_for_it(cluster):
    """A node may start before the node hosting the rendezvous store. Its SMP keeps trying (saying so in its log)
    and joins once the store is up; its ranks, meanwhile, wait for it."""
    from torch.distributed import TCPStore

    port = free_port()
    args = ["--nnodes", "2", "--store", f"127.0.0.1:{port}", "--peer-host", "127.0.0.1", "--timeout", "2"]
    smp = cluster.start_smp(*args, node=0, name="smp0", FTMEM_SECRET=SECRET)
    cluster.wait_until(lambda: "is not reachable yet" in cluster.output(smp), 30, "the SMP to miss the store")
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    cluster.wait_until(lambda: "peer endpoint" in cluster.output(smp), 30, "the SMP to join once the store is up")
    assert cluster.client(0).call("status")["endpoint"], cluster.logs()
    del store


def test_an_smp_claiming_a_live_nodes_id_is_refused(cluster, tmp_path):
    """A second SMP for node 1 on "another host" (its own runtime and shared-memory directories, as a node
    started with the --node-rank of a running node would be) finds node 1's published SMP alive and does not
    take its place: its ranks get an error saying why, and the store still names the live SMP. (A replacement
    or a restarted SMP takes the id over from a dead one: the multi-node golden tests.)"""
    from torch.distributed import TCPStore

    port = free_port()
    store = TCPStore("127.0.0.1", port, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=30))
    args = ["--nnodes", "2", "--store", f"127.0.0.1:{port}", "--peer-host", "127.0.0.1", "--timeout", "30"]
    live = cluster.start_smp(*args, node=1, name="smp1", FTMEM_SECRET=SECRET)
    cluster.wait_until(lambda: "peer endpoint" in cluster.output(live), 30, "node 1's SMP to join")
    key = f"ftmem/{cluster.job}/smp/1"
    published = store.get(key)
    other = tmp_path / "other-host"
    for d in ("run", "shm"):
        (other / d).mkdir(parents=True)
    dup = cluster.python(["-m", "ftmem.smp", "--job-id", cluster.job, "--node", "1", *args], "smp1-duplicate",
                         FTMEM_SECRET=SECRET, FTMEM_RUNTIME_DIR=str(other / "run"), FTMEM_SHM_DIR=str(other / "shm"))
    cluster.wait_until(lambda: "cannot join its EC group" in cluster.output(dup), 60, "the duplicate to be refused")
    endpoint = msgpack.unpackb(published, raw=False)[0]
    assert (f"node 1 is served by a live SMP at {endpoint}: was this node started with the --node-rank (or "
            f"--ftmem-node-id) of a running node?") in cluster.output(dup), cluster.logs()
    client = ControlClient(f"ipc://{other / 'run'}/{cluster.job}.n1.sock", timeout=30.0)
    try:
        client.call("register", rank=1, world=2, local_rank=0, pid=1001)
        with pytest.raises(SmpError, match="node 1's SMP cannot join its EC group: .*served by a live SMP"):
            client.call("available", rank=1)
    finally:
        client.close()
    assert store.get(key) == published and live.poll() is None, cluster.logs()
    dup.terminate()
    dup.wait(30)
    del store
