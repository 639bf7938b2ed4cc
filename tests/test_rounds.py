"""The erasure-coding round protocol of `Cluster`, node by node, with messages delivered (or lost) by hand.

Several Clusters live in this process; a `Net` carries their round messages and reports in order, and can lose
everything one node sends from some point on (its death, or its SMP's). Encoding itself is not run: a node's
share of a round claims its parity slot and reports success, as `encode_round` does. The invariant checked
throughout: the nodes always keep (data and parity) some protected step in common, so that any one of them
lost can be rebuilt. The real processes, sockets and zfec are exercised by tests/test_multinode.py.
"""

from __future__ import annotations

import time
import uuid
from types import SimpleNamespace
from typing import Any

import pytest

from ftmem.smp import shm
from ftmem.smp.cluster import SETTLE_S, Cluster, ClusterConfig, LeadSchedule, _Peer
from ftmem.smp.commit import CommitTracker
from ftmem.smp.parity import ParityStore
from ftmem.smp.peer import PeerCodec
from ftmem.smp.protect import GroupMeta


def group_meta(step: int, nnodes: int) -> GroupMeta:
    return GroupMeta(step, nnodes, 1, 4096, tuple(range(nnodes)),
                     tuple(((node, 100, b"header"),) for node in range(nnodes)))


class Net:
    """In-process delivery of the peer messages of a few Clusters, in the order sent."""

    def __init__(self, nnodes: int, buffers: int) -> None:
        self.prefix = f"ftmem-rounds-{uuid.uuid4().hex[:8]}."
        self.nnodes, self.buffers = nnodes, buffers
        self.queue: list[tuple[int, int, dict[str, Any]]] = []
        self.mute: set[int] = set()  # nodes whose messages are lost from now on (they died)
        self.nodes = [self.start(n) for n in range(nnodes)]

    def start(self, node: int, incarnation: str | None = None) -> Cluster:
        """Node `node`'s Cluster as an SMP's is once it joined, every other node alive and reported."""
        c = object.__new__(Cluster)
        c.node, c.nodes, c.members = node, tuple(range(self.nnodes)), tuple(range(self.nnodes))
        c.cfg = ClusterConfig(self.nnodes, self.nnodes, 1, "127.0.0.1:1", "127.0.0.1", None)
        tracker = CommitTracker(world=1)
        tracker.held_by_all = lambda step: True
        c.d = SimpleNamespace(tracker=tracker, store=SimpleNamespace(count=self.buffers, ranks={}), timeout=300.0,
                              on_commit_state_changed=lambda: None)
        c.parity = ParityStore(f"{self.prefix}n{node}.")
        c.incarnation = incarnation or f"n{node}"
        c.peers = {m: _Peer("", f"n{m}", discovered=0.0, last_seen=0.0, rebuilding=False, reported=True)
                   for m in range(self.nnodes) if m != node}
        c.clock, c.ready, c.rebuilding = 0.0, True, False
        c.meta = c.previous = c.protected = c.member_round = c.leading = c._announced = None
        c._rounds, c.schedule, c.jobs = 0, LeadSchedule(), []
        c.stats = {"rounds_ok": 0, "rounds_failed": 0, "last_round_s": None, "last_round_step": None,
                   "last_round_bytes": 0, "lag_steps": 0}
        c._send = lambda to, op, **fields: self.send(c, to, op, fields)
        c.jobs = SimpleNamespace(items=[], put=lambda job: c.jobs.items.append(job))
        return c

    def send(self, sender: Cluster, to: int, op: str, fields: dict[str, Any]) -> None:
        """Through the wire format and its schema checks, as between SMPs."""
        codec = PeerCodec(b"rounds test secret", "rounds", sender.node)
        msg, _ = codec.unpack(codec.pack(op, 0, incarnation=sender.incarnation, **fields))
        if sender.node in self.mute:
            return
        if to == sender.node:
            sender._dispatch(msg, [], None)
        else:
            self.queue.append((sender.node, to, msg))

    def deliver(self) -> None:
        while self.queue:
            _, to, msg = self.queue.pop(0)
            if to not in self.mute:
                self.nodes[to]._dispatch(msg, [], None)

    def encode(self, nodes: tuple[int, ...] | None = None) -> None:
        """The nodes' queued shares of a round: the parity slot claimed and written, success reported."""
        for c in self.nodes if nodes is None else [self.nodes[n] for n in nodes]:
            while c.jobs.items:
                _, step, round_id = c.jobs.items.pop(0)
                if c._round_aborted(round_id):
                    continue
                c.parity.write(c.parity.work(step, 4096), 0, bytes([step % 256]) * 4096)
                c._on_event({"ev": "encoded", "round": round_id, "meta": group_meta(step, self.nnodes).pack(),
                             "seconds": 0.0})

    def commit(self, step: int) -> None:
        for c in self.nodes:
            c.d.tracker.committed = step

    def lead(self) -> None:
        self.nodes[min(n for n in range(self.nnodes) if n not in self.mute)]._lead(time.monotonic())

    def round(self, step: int) -> None:
        self.commit(step)
        self.lead()
        self.deliver()
        self.encode()
        self.deliver()

    def announce(self, step: int, lost_to: int | None = None) -> None:
        """A round of `step` that every node completes; the leader (node 0) has sent its result to every node, but
        the one to `lost_to` is lost (the leader died between the two), and none is delivered yet."""
        self.commit(step)
        self.lead()
        self.deliver()
        self.encode()
        leader = self.nodes[0]
        for m in range(1, self.nnodes):  # their ec_done, handed over ahead of the queue
            leader._on_ec_done({"op": "ec_done", "from": m, "round": leader.leading.id, "step": step, "ok": True,
                                "detail": ""})
        self.queue = [(frm, to, msg) for frm, to, msg in self.queue
                      if msg["op"] != "ec_done" and not (to == lost_to and msg["op"] == "ec_result")]

    def common(self) -> set[int]:
        """The protected steps every live node keeps, data and parity."""
        live = [c for c in self.nodes if c.node not in self.mute]
        for c in live:
            assert sorted(c._kept_steps(), reverse=True) == c.parity.kept_steps(), (c.node, c._kept_steps())
            assert c.protected == (None if c.meta is None else c.meta.step)
        return set.intersection(*(c._kept_steps() for c in live))

    def close(self) -> None:
        for c in self.nodes:
            c.parity.close(unlink_all=True)
        for name in shm.list_segments(self.prefix):
            shm.unlink(name)


@pytest.fixture
def net_of():
    nets = []

    def make(nnodes: int = 3, buffers: int = 4) -> Net:
        nets.append(Net(nnodes, buffers))
        return nets[-1]

    yield make
    for net in nets:
        net.close()
        assert shm.list_segments(net.prefix) == []


def test_rounds_keep_the_protected_step_and_the_one_before(net_of):
    net = net_of()
    net.round(1)
    assert [c.protected for c in net.nodes] == [1, 1, 1] and net.common() == {1}
    net.round(2)
    assert [c.protected for c in net.nodes] == [2, 2, 2] and net.common() == {2, 1}
    net.round(3)
    assert net.common() == {3, 2}, "a round keeps the step every node protects and drops the one before"


def test_the_leader_leads_again_only_once_every_node_reported_the_step_it_announced(net_of):
    net = net_of()
    net.round(1)
    net.announce(2)
    leader = net.nodes[0]
    assert leader.protected == 2 and net.nodes[1].protected == 1, "the results are on their way"
    net.commit(3)
    net.lead()
    assert leader.leading is None, "a round now would take every node back to step 1"
    net.deliver()  # the results, and the reports the nodes send once they promoted
    net.lead()
    assert leader.leading is not None and leader.leading.step == 3
    net.deliver()
    net.encode()
    net.deliver()
    assert [c.protected for c in net.nodes] == [3, 3, 3] and net.common() == {3, 2}


def test_a_leader_lost_while_announcing_leaves_a_common_step_through_the_restore_and_the_rounds_after(net_of):
    """Node 0 dies after telling node 1 that step 2 is protected, not node 2. Its replacement is rebuilt at step
    1, every rank restores step 1 (the ranks drop their later snapshots), and the rounds go on: at no point may
    the nodes be left without a step in common. Before, node 1 kept step 2 as protected after the restore (its
    data gone), and the next round dropped the step before on every node: a second loss was unrecoverable."""
    net = net_of()
    net.round(1)
    net.announce(2, lost_to=2)
    leader, node1, node2 = net.nodes
    net.mute.add(0)  # killed after telling node 1
    net.deliver()
    assert (node1.protected, node2.protected) == (2, 1) and net.common() == {1}

    leader.parity.close(unlink_all=True)  # the whole node is lost, its memory with it
    replacement = net.nodes[0] = net.start(0, incarnation="n0-replacement")  # rebuilt at step 1
    replacement.parity.write(replacement.parity.work(1, 4096), 0, b"\x01" * 4096)
    replacement.parity.promote(1, group_meta(1, 3).pack())
    replacement._keep_protected(group_meta(1, 3), None)
    for c in (node1, node2):
        c.peers[0] = _Peer("", "n0-replacement", discovered=0.0, last_seen=0.0, rebuilding=False, reported=True)
        c.schedule.node_restarted()
    net.mute.clear()
    for c in net.nodes:
        c.d.tracker.restart_at(1, 1)
        c.restarted_at(1)
    net.deliver()
    assert net.common() == {1} and node1.protected == 1, "step 2's data is gone with the restore"

    net.round(3)
    assert [c.protected for c in net.nodes] == [3, 3, 3] and net.common() == {3, 1}


def test_a_round_falls_back_to_the_step_every_node_keeps_when_a_result_reached_only_some(net_of):
    """The leader's SMP restarts after announcing step 2 to itself and node 1 only (no restore follows: no
    rank was lost). The restarted SMP re-adopts both kept steps; its next round names step 1, the newest every
    node keeps: node 0 and 1 fall back to it, and nobody drops it before the round succeeds."""
    net = net_of()
    net.round(1)
    net.announce(2, lost_to=2)
    leader, node1, node2 = net.nodes
    net.deliver()

    restarted = net.nodes[0] = net.start(0, incarnation="n0-restarted")  # re-adopts the parity it recorded
    restarted._node_data = lambda step, meta=None: None                   # (its ranks' data is still there)
    restarted._readopt_parity()
    assert restarted.parity.kept_steps() == [2, 1] and (restarted.protected, restarted.previous.step) == (2, 1)
    for c in (node1, node2):
        c.peers[0].incarnation = "n0-restarted"
        c.member_round = None  # the round's leader restarted: abandoned
    for c in net.nodes:
        c.broadcast_report()
    net.deliver()
    assert net.common() == {1}

    net.commit(3)
    net.lead()
    net.deliver()
    assert [c.protected for c in net.nodes] == [1, 1, 1], "step 2 was never protected on every node"
    assert net.common() == {1}
    net.encode()
    net.deliver()
    assert [c.protected for c in net.nodes] == [3, 3, 3] and net.common() == {3, 1}


def test_the_protected_step_led_again_replaces_its_parity_and_frees_the_other_slot(net_of):
    """A member that restarts makes the leader protect the newest committed step again, which may be the step
    already protected (training stalled): its new parity replaces the old, and the next round has a slot."""
    net = net_of()
    net.round(1)
    net.nodes[0].schedule.node_restarted()
    net.round(1)
    assert [c.parity.kept_steps() for c in net.nodes] == [[1], [1], [1]] and net.common() == {1}
    net.round(2)
    assert [c.protected for c in net.nodes] == [2, 2, 2] and net.common() == {2, 1}


def test_a_node_that_lacks_the_step_the_leader_names_fails_the_round_and_drops_nothing(net_of):
    net = net_of()
    net.round(1)
    net.round(2)
    node2 = net.nodes[2]
    node2._on_ec_start(7, 3, 9, 0)  # a leader whose view of node 2 was wrong: it names step 9
    assert node2._kept_steps() == {2, 1} and node2.member_round is None and node2.jobs.items == []
    (_, to, done), = net.queue
    assert to == 0 and done["op"] == "ec_done" and not done["ok"] and "keeps steps [1, 2], not step 9" in done["detail"]


def test_a_node_whose_buffer_is_reused_after_it_reported_success_fails_the_round(net_of):
    """With three buffers a round's step is only softly kept: a rank may take its buffer once the node told
    the leader it succeeded. It must then say the round failed, and no node may promote the step."""
    net = net_of(buffers=3)
    net.round(1)
    net.commit(2)
    net.lead()
    net.deliver()
    net.encode((0, 1))
    net.nodes[1].buffer_taken(2)
    net.encode((2,))  # node 2 is slower: its success reaches the leader after node 1's failure
    net.deliver()
    assert [c.protected for c in net.nodes] == [1, 1, 1] and net.common() == {1}


def test_a_round_abandoned_by_a_member_is_not_promoted_there_when_its_result_comes_late(net_of):
    net = net_of()
    net.round(1)
    net.commit(2)
    net.lead()
    net.deliver()
    net.encode()
    node1 = net.nodes[1]
    node1.member_round = None  # abandoned (the leader looked gone): its buffers of step 2 may be reused
    net.deliver()
    assert node1.protected == 1, "this node's data of step 2 may be gone: it must not promote it"


def test_an_encode_job_of_a_superseded_round_never_claims_a_parity_slot(net_of):
    net = net_of()
    net.round(1)
    node1 = net.nodes[1]
    node1._on_ec_start(11, 2, 1, 0)
    stale = node1.jobs.items.pop()
    node1._on_ec_start(12, 2, 1, 0)  # the same step led again before the first job ran
    with pytest.raises(RuntimeError, match="superseded"):
        node1._job_encode(None, *stale[1:])
    node1._on_event({"ev": "encoded", "round": stale[2], "meta": group_meta(2, 3).pack(), "seconds": 0.0})
    assert net.queue == [], "a stale job's result is not reported"


def test_a_late_answer_to_an_earlier_round_of_the_same_step_is_not_taken_for_the_retry(net_of):
    """A round of step 2 fails (node 2's part), and is led again. Node 1's success in the first round, arriving
    late, must not count for the second: only its answer to the second round does."""
    net = net_of()
    net.round(1)
    net.commit(2)
    net.lead()
    net.deliver()
    leader = net.nodes[0]
    first = leader.leading.id
    net.encode((0, 1))
    late = [m for m in net.queue if m[2]["op"] == "ec_done"]  # node 1's success, held back
    net.queue = [m for m in net.queue if m[2]["op"] != "ec_done"]
    leader._on_ec_done({"op": "ec_done", "from": 2, "round": first, "step": 2, "ok": False, "detail": "no room"})
    net.deliver()
    net.nodes[2].jobs.items.clear()
    leader.schedule.retry_at = 0.0  # the retry is due
    net.lead()
    assert leader.leading is not None and leader.leading.id != first
    net.deliver()
    net.encode((0, 2))
    net.queue = late + net.queue
    net.deliver()
    assert leader.leading is not None, "node 1 has not answered the second round yet"
    net.encode((1,))
    net.deliver()
    assert [c.protected for c in net.nodes] == [2, 2, 2] and net.common() == {2, 1}


def test_a_restore_drops_the_protected_steps_after_the_restored_one(net_of):
    net = net_of()
    net.round(1)
    net.round(2)
    for c in net.nodes:
        c.restarted_at(1)
    assert [c.protected for c in net.nodes] == [1, 1, 1] and net.common() == {1}
    for c in net.nodes:
        c.restarted_at(None)
    assert net.common() == set() and [c.parity.kept_steps() for c in net.nodes] == [[], [], []]


def test_a_corrupt_snapshot_of_a_kept_step_is_no_longer_offered(net_of):
    """A rank found its snapshot of the protected step corrupt: the node keeps only the step before, says so in
    its report, and the next round falls back to the step every node keeps."""
    net = net_of()
    net.round(1)
    net.round(2)
    node1 = net.nodes[1]
    node1.data_lost(2)
    assert node1._kept_steps() == {1} and node1.parity.kept_steps() == [1]
    net.deliver()
    assert net.nodes[0].peers[1].protected == 1 and net.common() == {1}
    net.commit(3)
    net.lead()
    assert net.nodes[0].leading is None, "within SETTLE_S the leader waits for node 1 to report step 2"
    net.nodes[0].clock += SETTLE_S
    for c in net.nodes:  # heartbeats meanwhile
        c.broadcast_report()
    net.deliver()
    net.round(3)
    assert [c.protected for c in net.nodes] == [3, 3, 3] and net.common() == {3, 1}
