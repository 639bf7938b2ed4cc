"""The SMP's side of a multi-node job: peers, global commit, erasure-coding rounds, rebuild and rank moves.

Everything here runs on the daemon's event loop except the blocking transfers (a round's reads, a rebuild, a
moved rank's payload), which run on one worker thread with its own peer links and report back as events.

- **Reports.** Each SMP tells every peer which (step, epoch) each of its ranks holds, on every change and once a
  second; the union drives the global commit and tells where a rank's snapshot lives.
- **Rounds.** The lowest-numbered live node of the job starts a round for the newest committed step (never a
  queue: a lagging encoder skips to the newest), every node computes its parity blocks for its EC group, and the
  step is *protected* when all nodes succeeded: every group's parity is in place. Rounds span the job, not a
  group, so that every node keeps the same protected step: a node lost from any group is rebuilt at a step that
  all ranks still hold (groups protecting steps on their own, a lagging group's would be gone elsewhere). With
  four buffers per rank (the default with erasure coding) the round's step is pinned for the round, which
  leaves two for double buffering; with fewer it is only softly kept: a rank needing the buffer takes it and
  the round fails. Either way encoding never blocks training.
- **The step before.** The leader tells the nodes a round's result one by one; dying in between, it leaves some
  nodes holding the step as protected and others not. So a node also keeps the step protected before (its data
  and parity) until the next round starts: the group can always rebuild a lost node at the newest step that all
  its survivors hold. Each round names that step (`base`, from the nodes' reports, which the leader lets settle
  after announcing a result): a node keeps it, falling back to it if it had learnt of a newer one, and drops
  the other; a node that does not keep it fails the round and drops nothing.
- **Rebuild.** A node that starts with nothing asks its group for the newest protected step and rebuilds its
  data and parity before its ranks may restore. A member whose SMP dies while serving it is restarted by its
  launcher with its memory intact, so a rebuild that fails only for such members asks the group again (up to
  REBUILD_ATTEMPTS, within FTMEM_TIMEOUT) once they are back, before it gives up.
"""

from __future__ import annotations

import queue
import random
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Sequence

import msgpack
import zmq

from ftmem.erasure import check_config, group_members
from ftmem.faults import fault_point
from ftmem.log import Throttled, get_logger
from ftmem.recovery.rebuild import RebuildError, fetch_payload, newest_protected, rebuild_node, verify
from ftmem.smp.buffers import Buffer
from ftmem.smp.directory import Directory, StoreUnreachable
from ftmem.smp.layout import HEADER_SIZE, BufferState, Header
from ftmem.smp.nodedata import NodeData, Part
from ftmem.smp.parity import ParityStore
from ftmem.smp.peer import (MAX_PEER_BYTES, Links, PeerAuthError, PeerCodec, new_incarnation, peer_socket,
                            secret_id, serving_node, tcp_address)
from ftmem.smp.process import Priority
from ftmem.smp.protect import GroupMeta, encode_round
from ftmem.smp.protocol import ProtocolError, loose_id

if TYPE_CHECKING:
    from ftmem.smp.daemon import SnapshotDaemon

log = get_logger("smp")
HEARTBEAT_S = 1.0
PEER_TIMEOUT_S = max(5.0, 5 * HEARTBEAT_S)  # a peer silent this long (on the clock of `Cluster.alive`) is gone
SETTLE_S = PEER_TIMEOUT_S  # how long a leader waits for every node to report the result it announced
HANDLE_BUDGET_S = 0.2 * HEARTBEAT_S
PROBE_S = PEER_TIMEOUT_S  # how long the SMP that published this node's id may take to answer, if it lives
REBUILD_ATTEMPTS = 3  # a rebuild that lost members mid-way (see RebuildError.silent) is tried this often in all
RETRY_S, RETRY_MAX_S = 1.0, 30.0  # a failed round's step is led again after this, doubling while rounds fail
EVENTS = "inproc://ftmem-events"


@dataclass(frozen=True)
class ClusterConfig:
    nnodes: int
    ec_group: int
    ec_parity: int
    store: str           # host:port of the job's rendezvous store
    peer_host: str       # interface to bind the peer socket to
    secret: bytes | None
    nice: int = 0        # CPU priority while no node of the group is being rebuilt (see process.Priority)

    def validate(self) -> None:
        check_config(self.nnodes, self.ec_group, self.ec_parity)


@dataclass
class _Peer:
    endpoint: str
    incarnation: str
    discovered: float  # on the listening clock, like last_seen (see `Cluster.alive`)
    last_seen: float | None = None
    committed: int = -1
    protected: int = -1
    previous: int = -1       # the step protected before, which it keeps until the next round starts
    rebuilding: bool = True  # until its first report: a new incarnation may be a replacement that rebuilds
    reported: bool = False   # what its ranks hold is known (an ec_start also proves it alive, but says nothing)

    def awaiting_first_report(self, clock: float) -> bool:
        """Discovered (in the store) but not heard from yet, for less than PEER_TIMEOUT_S: likely alive."""
        return self.last_seen is None and clock - self.discovered < PEER_TIMEOUT_S


@dataclass
class _Round:
    """A round this node leads."""

    id: int  # random: messages of an earlier round of the same step are never taken for this one's
    step: int
    deadline: float
    incarnations: dict[int, str]  # of the nodes when it started: a node that restarts fails the round
    done: set[int] = field(default_factory=set)


@dataclass
class _MemberRound:
    """This node's part of a round: computing its parity blocks for `step`."""

    step: int
    leader: int
    deadline: float
    pinned: bool           # the step's buffers may not be reused during the round
    round: int             # the leader's id of the round: tells it from an earlier one of the same step
    aborted: bool = False  # a rank reused one of them (or the job restarted before it): the round must fail
    meta: GroupMeta | None = None  # once encoded: what this node's parity was computed over
    reported_ok: bool = False      # ec_done(ok) sent: a later abort must tell the leader


class LeadSchedule:
    """Which committed step the round leader protects next, and when: the newest, at once when it is newer than
    the last one led; the same again after a failure, after a backoff doubling from RETRY_S while rounds keep
    failing. Without the retry a transient failure (a node restarting, slow to report) would leave the job
    unprotected for as long as training stalls and commits nothing new."""

    def __init__(self) -> None:
        self.last_led = -1
        self.failures = 0                   # led rounds that failed in a row
        self.retry_at: float | None = None  # after a failure: when its step may be led again

    def due(self, committed: int | None, now: float) -> bool:
        return committed is not None and (committed > self.last_led or
                                          (self.retry_at is not None and now >= self.retry_at))

    def started(self, step: int) -> None:
        self.last_led, self.retry_at = step, None

    def finished(self, ok: bool, now: float) -> float | None:
        """Record a round's outcome; after a failure, the seconds until its step may be led again."""
        self.failures = 0 if ok else self.failures + 1
        self.retry_at = None if ok else now + min(RETRY_MAX_S, RETRY_S * 2 ** (self.failures - 1))
        return None if ok else self.retry_at - now

    def node_restarted(self) -> None:
        """A node lost its parity: protect the newest committed step again, even one already led, at once (the
        backoff of rounds that failed before, e.g. while that node was down, does not carry over)."""
        self.last_led, self.failures, self.retry_at = -1, 0, None


class Cluster:
    def __init__(self, daemon: "SnapshotDaemon", config: ClusterConfig) -> None:
        config.validate()
        self.d = daemon
        self.cfg = config
        self.node = daemon.env.node
        self.members = group_members(self.node, config.ec_group)
        self.nodes = tuple(range(config.nnodes))  # every node takes part in every round (see the module doc)
        self.parity = ParityStore(daemon.env.segment_prefix)
        self.directory = Directory(config.store, daemon.env.job, self.node, config.nnodes, daemon.timeout)
        self.incarnation = new_incarnation()
        self.peers: dict[int, _Peer] = {}
        self.codec: PeerCodec | None = None
        self.sock: zmq.Socket | None = None
        self.links: Links | None = None
        self.events = zmq.Context.instance().socket(zmq.PULL)
        self.events.bind(EVENTS)
        self.jobs: queue.Queue = queue.Queue()
        self.ready = False
        self.rebuilding = True       # ranks may not restore before the rebuild check is done
        self.rebuild_error: str | None = None
        self.join_error: str | None = None  # why this SMP is not part of its EC group: its ranks may not start
        self.meta: GroupMeta | None = None   # of the protected step
        self.previous: GroupMeta | None = None  # of the step protected before, kept until the next round starts
        self.protected: int | None = None
        self.member_round: _MemberRound | None = None
        self.leading: _Round | None = None
        self._announced: tuple[int, float] | None = None  # (step, clock) of the last protected step announced
        self.schedule = LeadSchedule()
        self.stats: dict[str, Any] = {"rounds_ok": 0, "rounds_failed": 0, "last_round_s": None,
                                      "last_round_step": None, "last_round_bytes": 0, "rebuild_s": None, "lag_steps": 0}
        self._next_heartbeat = 0.0
        self._absent_warned = False  # that the job lacks nodes (see `_note_absent`)
        self._forged = Throttled(log, "peer messages rejected as not authentic")
        self._rebuild_started = 0.0
        self._rebuild_attempts = 0
        self.clock = 0.0  # seconds this SMP has been listening to its peers (see `alive`)
        self._last_tick = time.monotonic()
        self.priority = Priority()
        threading.Thread(target=self._connect, name="ftmem-connect", daemon=True).start()
        threading.Thread(target=self._work, name="ftmem-ec", daemon=True).start()

    # ---- start-up --------------------------------------------------------------------------------------------

    def _connect(self) -> None:
        """Reach the job's rendezvous store, agree on the EC settings and the secret, then hand over to the event
        loop. A store not up yet (its node starts later) is waited for as long as this SMP lives: the elastic agent
        waits for it too, and the ranks, which only start once it is up, wait for this SMP with a timeout."""
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(EVENTS)
        try:
            while True:
                try:
                    self.directory.connect()
                    break
                except StoreUnreachable as exc:
                    push.send(msgpack.packb({"ev": "store_unreachable", "error": str(exc)}))
            secret = self.cfg.secret or self.directory.secret()
            self.directory.agree(f"nnodes={self.cfg.nnodes} ec_group={self.cfg.ec_group} "
                                 f"ec_parity={self.cfg.ec_parity} secret={secret_id(secret)}")
            self._check_not_taken(secret)
            push.send(msgpack.packb({"ev": "connected", "secret": secret}))
        except Exception as exc:
            push.send(msgpack.packb({"ev": "connect_failed", "error": f"{type(exc).__name__}: {exc}"}))
        finally:
            push.close(linger=1000)

    def _check_not_taken(self, secret: bytes) -> None:
        """A node id is taken over only from a dead SMP (a replacement, a restart): one started with the
        --node-rank of a live node, on another host, would otherwise take its place in the group."""
        holder = self.directory.holder()
        if holder is not None and serving_node(PeerCodec(secret, self.d.env.job, self.node), holder[0],
                                               PROBE_S) == self.node:
            raise RuntimeError(f"node {self.node} is served by a live SMP at {holder[0]}: was this node started "
                               f"with the --node-rank (or --ftmem-node-id) of a running node?")

    def _on_connected(self, secret: bytes) -> None:
        self.codec = PeerCodec(secret, self.d.env.job, self.node)
        self.links = Links(self.codec)
        self.sock = peer_socket(zmq.ROUTER, ipv6=":" in self.cfg.peer_host)
        try:
            port = self.sock.bind_to_random_port(tcp_address(self.cfg.peer_host))
            endpoint = tcp_address(self.cfg.peer_host, port)
            self.directory.publish(endpoint, self.incarnation)
        except Exception as exc:  # an address not of this host, the store gone: the ranks must hear why
            self.sock.close(0)
            self.sock = None
            self._join_failed(f"cannot serve its peers at {self.cfg.peer_host}: {type(exc).__name__}: {exc}")
            return
        self.directory.start()
        self.ready = True
        log.info("peer endpoint %s; EC group %s with %d parity", endpoint, list(self.members), self.cfg.ec_parity)
        if self.d.store.has_complete():
            self.rebuilding = False
            self._readopt_parity()
        else:
            self.parity.retain(())  # nothing to take over: the node's data, and its parity, are rebuilt
            self.jobs.put(("probe",))

    def _readopt_parity(self) -> None:
        """A restarted SMP keeps the group protected: the parity its previous incarnation kept (the protected
        step, and the one before) is taken over when it was computed for this group and this node's re-adopted
        snapshots are still what it encoded."""
        valid = []
        for step, meta_bytes in self.parity.adopted:
            try:
                meta = GroupMeta.unpack(meta_bytes)
                if meta.step != step or meta.members != self.members or meta.f != self.cfg.ec_parity:
                    raise LookupError(f"it was computed for EC group {list(meta.members)} with {meta.f} parity")
                self._node_data(step, meta)  # LookupError unless this node's data of the step is what was encoded
            except (LookupError, ValueError, TypeError) as exc:
                log.warning("not re-adopting the parity of step %d: %s", step, exc)
                continue
            valid.append(meta)
            log.info("re-adopted the parity of protected step %d", step)
        self._keep_protected(valid[0] if valid else None,
                             valid[1] if len(valid) > 1 and self._spare_buffers() else None)

    # ---- event loop hooks ------------------------------------------------------------------------------------

    def sockets(self) -> list[zmq.Socket]:
        return [s for s in (self.events, self.sock) if s is not None]

    def handle(self, sock: zmq.Socket) -> None:
        """Handle what is queued on `sock`, for at most HANDLE_BUDGET_S: a queue of data reads (16 MiB each, slow on
        a niced SMP beside training) must not hold back the tick, whose heartbeats tell peers this node lives."""
        deadline = time.monotonic() + HANDLE_BUDGET_S
        while time.monotonic() < deadline:
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            if sock is self.events:
                self._on_event(msgpack.unpackb(frames[0], raw=False))
            else:
                self._on_peer(frames)

    def tick(self) -> None:
        now = time.monotonic()
        self.clock += min(now - self._last_tick, HEARTBEAT_S)
        self._last_tick = now
        self._forged.flush()
        if not self.ready:
            return
        self._set_priority()
        self._refresh_peers()
        if now >= self._next_heartbeat:
            self.broadcast_report()
            self._next_heartbeat = now + HEARTBEAT_S
        self._note_absent()
        self._lead(now)

    def _set_priority(self) -> None:
        """Full priority while this node or a member of its group is (or, new and not yet reporting, may be)
        rebuilt, else the configured nice."""
        recovering = self.rebuilding or any(
            p.rebuilding and (self.alive(n) or p.awaiting_first_report(self.clock))
            for n, p in self.peers.items() if n in self.members)
        nice = 0 if recovering else self.cfg.nice
        if nice != self.priority.nice and self.priority.set(nice):
            log.info("SMP CPU priority: nice %d (%s)", nice, "a node of the EC group is new or being rebuilt"
                     if recovering else "training gets the cores first")

    def _refresh_peers(self) -> None:
        """Take in the directory's peers. A new one (or a new incarnation: a restart, a replacement) gets this
        node's report at once rather than at the next heartbeat: a replacement's rebuild waits for its group's."""
        new = []
        for node, (endpoint, incarnation) in self.directory.snapshot().items():
            peer = self.peers.get(node)
            if peer is None or peer.incarnation != incarnation:
                if peer is not None:
                    log.info("node %d restarted (new incarnation); reconnecting", node)
                    self.schedule.node_restarted()  # its parity is gone: protect the newest step again
                self.peers[node] = _Peer(endpoint, incarnation, discovered=self.clock)
                self.d.tracker.set_source(node, {})
                new.append(node)
        if new:
            self.broadcast_report(new)

    def alive(self, node: int) -> bool:
        """Heard from within the last PEER_TIMEOUT_S on this SMP's listening clock, which runs with the event
        loop's ticks and counts a pause between two ticks as at most HEARTBEAT_S. A niced SMP starved beside
        training can spend seconds on one message (or not run at all), and the heartbeats queued unread meanwhile
        must not make its peers look gone (a round failed for nothing, a wrong leader), neither to its event
        loop nor to its EC thread waiting on a reply. A dead peer is still gone after PEER_TIMEOUT_S of ticks."""
        if node == self.node:
            return True
        peer = self.peers.get(node)
        return peer is not None and peer.last_seen is not None and self.clock - peer.last_seen < PEER_TIMEOUT_S

    def _live_incarnation(self, node: int) -> str | None:
        peer = self.peers.get(node)
        return peer.incarnation if peer is not None and self.alive(node) else None

    def _await_first_report(self, node: int) -> None:
        """On the worker thread: a peer this SMP discovered but has not heard from yet gets until its first
        heartbeat (bounded by PEER_TIMEOUT_S) before it counts as gone. A restarted SMP can be asked to take part
        in a round, by a leader that sees every member alive, before the other members' reports reach it."""
        peer = self.peers.get(node)
        while peer is not None and peer.awaiting_first_report(self.clock):
            time.sleep(0.05)

    def _send(self, node: int, op: str, **fields: Any) -> None:
        """A report or round message, which names this SMP's incarnation (see `_dispatch`)."""
        fields["incarnation"] = self.incarnation
        if node == self.node:
            self._dispatch({"op": op, "from": self.node, "id": 0, **fields}, [], None)
        elif node in self.peers and self.links is not None:
            self.links.to(node, self.peers[node].endpoint).send(op, **fields)

    # ---- reports and commit ----------------------------------------------------------------------------------

    def broadcast_report(self, nodes: list[int] | None = None) -> None:
        """Report to `nodes` (default: every peer) which (step, epoch) each rank here holds."""
        if not self.ready:
            return
        complete = [[rank, s, e] for rank, rb in self.d.store.ranks.items() for s, e in rb.complete()]
        fields = dict(epoch=self.d.tracker.epoch,
                      committed=-1 if self.d.tracker.committed is None else self.d.tracker.committed,
                      protected=-1 if self.protected is None else self.protected,
                      previous=-1 if self.previous is None else self.previous.step, rebuilding=self.rebuilding,
                      complete=complete)
        for node in self.peers if nodes is None else nodes:
            self._send(node, "report", **fields)

    def _on_report(self, msg: dict[str, Any]) -> None:
        peer = self.peers.get(msg["from"])
        if peer is None:
            return
        peer.last_seen, peer.committed = self.clock, msg["committed"]
        peer.protected, peer.previous = msg["protected"], msg["previous"]
        peer.rebuilding, peer.reported = msg["rebuilding"], True
        by_rank: dict[int, set[tuple[int, int]]] = {}
        for rank, step, epoch in msg["complete"]:
            by_rank.setdefault(rank, set()).add((step, epoch))
        self.d.tracker.set_source(msg["from"], by_rank)
        self.d.tracker.epoch = max(self.d.tracker.epoch, msg["epoch"])
        self.d.on_commit_state_changed()

    def reports_pending(self) -> bool:
        """Whether a live or just discovered peer has not reported yet: a restore must not decide on what every
        rank holds, or where a moved rank's snapshot lives, before it has (within a heartbeat, or PEER_TIMEOUT_S
        for a peer that never does)."""
        return any(not p.reported and (self.alive(n) or p.awaiting_first_report(self.clock))
                   for n, p in self.peers.items())

    # ---- erasure-coding rounds -------------------------------------------------------------------------------

    def keep(self) -> frozenset[int]:
        """Steps local buffers must keep: the protected one, the one before until the next round starts, and a
        running round's step when it is pinned (never more than two at once: a round starts keeping one)."""
        steps = set(self._kept_steps())
        if self.member_round is not None and self.member_round.pinned:
            steps.add(self.member_round.step)
        return frozenset(steps)

    def _kept_steps(self) -> set[int]:
        return {m.step for m in (self.meta, self.previous) if m is not None}

    def in_use(self) -> frozenset[int] | None:
        """Steps of this node's data the erasure code may still read: the protected one (to rebuild a member)
        and a running round's, pinned or not; None while this node is being rebuilt (all of it is)."""
        if self.rebuilding:
            return None
        return self.keep() | ({self.member_round.step} if self.member_round is not None else set())

    def buffer_taken(self, step: int | None) -> None:
        """A rank is about to overwrite a buffer holding `step`: a round of it fails, also when this node already
        told the leader it succeeded (the other nodes must not promote a step whose data is gone here)."""
        mr = self.member_round
        if mr is not None and step == mr.step and not mr.aborted:
            mr.aborted = True
            if mr.reported_ok:
                self._send(mr.leader, "ec_done", round=mr.round, step=step, ok=False,
                           detail=f"a buffer of step {step} on node {self.node} was reused before the round ended")

    def restarted_at(self, step: int | None) -> None:
        """The job restarts after `step` (a restore): the ranks drop their snapshots of later steps, so neither a
        later protected step (this node may have learnt of one that others did not) nor a round of one stays."""
        if self.member_round is not None and (step is None or self.member_round.step > step):
            self.buffer_taken(self.member_round.step)
        self.schedule.node_restarted()  # lead the newest committed step again, though older than the last led
        self._keep_only(lambda m: step is not None and m.step <= step, f"the job restarts after step {step}")

    def data_lost(self, step: int) -> None:
        """This node's data of `step` turned out corrupt: a round of it fails, and the step is no longer offered
        as kept (its block would count as lost in a rebuild anyway)."""
        self.buffer_taken(step)
        self._keep_only(lambda m: m.step != step, f"a rank's snapshot of step {step} is corrupt")

    def _keep_only(self, keeps: Callable[[GroupMeta], bool], why: str) -> None:
        """Stop keeping the protected steps that `keeps` rejects, and tell the peers."""
        kept = [m for m in (self.meta, self.previous) if m is not None and keeps(m)]
        dropped = self._kept_steps() - {m.step for m in kept}
        if dropped:
            log.warning("protected step(s) %s no longer kept here: %s", sorted(dropped), why)
            self._keep_protected(kept[0] if kept else None, kept[1] if len(kept) > 1 else None)
            self.broadcast_report()

    def _keep_protected(self, meta: GroupMeta | None, previous: GroupMeta | None) -> None:
        """The one place the kept protected steps change: the protected step, the one before, and their parity."""
        self.meta, self.previous = meta, previous
        self.protected = None if meta is None else meta.step
        self.parity.retain(self._kept_steps())

    def _spare_buffers(self) -> bool:
        """Whether the ranks' buffers leave two for double buffering while two more steps are kept: four do."""
        return self.d.store.count >= 4

    def _meta_of(self, step: int) -> GroupMeta | None:
        """What the group's parity of `step` was computed over, if this node keeps it (protected, or the one
        before)."""
        return next((m for m in (self.meta, self.previous) if m is not None and m.step == step), None)

    def _round_aborted(self, round_id: int) -> bool:
        mr = self.member_round
        return mr is None or mr.round != round_id or mr.aborted

    def _leader(self) -> int:
        return min(m for m in self.nodes if self.alive(m))

    def _lead(self, now: float) -> None:
        mr = self.member_round
        if mr is not None and (now > mr.deadline or not self.alive(mr.leader)):
            log.warning("abandoning EC round of step %d: %s", mr.step, f"its leader (node {mr.leader}) is gone"
                        if not self.alive(mr.leader) else f"it did not end within {self.d.timeout:.0f}s")
            self.member_round = None
        if self._leader() != self.node:
            return
        if self.leading is not None:
            changed = [m for m, inc in self.leading.incarnations.items()
                       if not self.alive(m) or (m != self.node and self.peers[m].incarnation != inc)]
            if changed or now > self.leading.deadline:
                log.warning("EC round of step %d failed: %s", self.leading.step,
                            f"nodes {changed} lost" if changed else "timed out")
                self._finish_round(False)
            return
        committed = self.d.tracker.committed
        if self.rebuilding or not self.schedule.due(committed, now) or not self.d.tracker.held_by_all(committed):
            return  # (not held by all: a node died with its ranks' copies; the restore will restart the job)
        if not all(self.alive(m) for m in self.nodes) or any(self.peers[m].rebuilding for m in self.nodes
                                                              if m != self.node):
            return  # a node being rebuilt could not take part; once rebuilt it reports, and the round starts
        base = self._base()
        if base is None:
            return
        round_id = random.getrandbits(62)
        self.leading = _Round(round_id, committed, now + self.d.timeout,
                              {m: self.incarnation if m == self.node else self.peers[m].incarnation
                               for m in self.nodes})
        self.schedule.started(committed)
        for m in self.nodes:
            if self.leading is None or self.leading.id != round_id:
                break  # it failed at once (this node could not take part): the others need not start it
            self._send(m, "ec_start", round=round_id, step=committed, base=base)

    def _base(self) -> int | None:
        """The newest step every node keeps protected, as their reports say (-1: none); None while the nodes may
        not have reported the result this leader announced last yet (for at most SETTLE_S), so that a round
        does not take them back to the step before for nothing."""
        views = [self._kept_steps()] + [{self.peers[m].protected, self.peers[m].previous} - {-1}
                                        for m in self.nodes if m != self.node]
        if self._announced is not None:
            step, at = self._announced
            if self.clock - at < SETTLE_S and any(step not in v for v in views):
                return None
            self._announced = None
        return max(set.intersection(*views), default=-1)

    def _note_absent(self) -> None:
        """Say so (every node, in its own log) while the job lacks nodes and has a committed step to protect: a
        node lost and not yet replaced, or one that never joined (an elastic job running below --nnodes'
        maximum). No step is protected meanwhile. Not for a peer that has just been discovered and not reported
        yet, nor in this SMP's first PEER_TIMEOUT_S (a restarted SMP has steps before it has heard its peers)."""
        gone = [m for m in self.nodes if not self.alive(m)]
        if not gone:
            if self._absent_warned:
                log.info("every node of the job is reachable again")
                self._absent_warned = False
            return
        absent = [m for m in gone if not (m in self.peers and self.peers[m].awaiting_first_report(self.clock))]
        if absent and not self._absent_warned and self.d.tracker.committed is not None \
                and self.clock >= PEER_TIMEOUT_S:
            log.warning("node(s) %s not reachable (never joined, or lost and not replaced); no newer step is "
                        "protected until they are back (newest protected: %s)", absent,
                        "none" if self.protected is None else self.protected)
            self._absent_warned = True

    def _finish_round(self, ok: bool) -> None:
        step, round_id = self.leading.step, self.leading.id
        self.leading = None
        delay = self.schedule.finished(ok, time.monotonic())
        if delay is not None:
            log.info("EC round of step %d failed; unless a newer step commits, it is led again in %.0fs", step, delay)
        if ok:
            self._announced = (step, self.clock)
        for m in self.nodes:
            self._send(m, "ec_result", round=round_id, step=step, ok=ok)
            fault_point("smp_ec_result_sent", step)

    def _on_ec_start(self, round_id: int, step: int, base: int, leader: int) -> None:
        peer = self.peers.get(leader)
        if peer is not None and peer.last_seen is None:
            # a leader this (restarted) SMP has not heard a report from yet is alive: it just sent this. Without
            # this the round would be abandoned at the next tick and the leader wait out its whole timeout.
            peer.last_seen = self.clock
        kept = {m.step: m for m in (self.meta, self.previous) if m is not None}
        if self.rebuilding or (base >= 0 and base not in kept):
            self._send(leader, "ec_done", round=round_id, step=step, ok=False,
                       detail=f"node {self.node} is still being rebuilt"
                       if self.rebuilding else f"node {self.node} keeps steps {sorted(kept)}, not step {base}")
            return
        if self.member_round is not None:
            log.warning("EC round of step %d starts while step %d is still running; abandoning that",
                        step, self.member_round.step)
        if base >= 0 and base != self.protected:
            log.warning("step %s was not protected on every node (a leader did not tell them all); back to step "
                        "%d, which every node keeps", self.protected, base)
        self._keep_protected(kept.get(base, self.meta), None)  # every node keeps `base`: the other step can go
        self.member_round = _MemberRound(step, leader, time.monotonic() + self.d.timeout,
                                         pinned=self._spare_buffers(), round=round_id)
        self.jobs.put(("encode", step, round_id))

    def _on_ec_done(self, msg: dict[str, Any]) -> None:
        if self.leading is None or msg["round"] != self.leading.id:
            return  # of a round that ended (e.g. a late answer to an earlier round of the same step)
        if not msg["ok"]:
            log.warning("EC round of step %d failed on node %d: %s", msg["step"], msg["from"], msg["detail"])
            self._finish_round(False)
            return
        self.leading.done.add(msg["from"])
        if self.leading.done >= set(self.nodes):
            self._finish_round(True)

    def _on_ec_result(self, round_id: int, step: int, ok: bool) -> None:
        mr = self.member_round
        if mr is None or mr.round != round_id:
            return  # a round this node abandoned (its data may be gone): it never promotes it
        self.member_round = None
        self.stats["rounds_ok" if ok else "rounds_failed"] += 1
        if ok and mr.meta is not None and not mr.aborted:
            committed = self.d.tracker.committed
            self.stats["lag_steps"] = 0 if committed is None else committed - step
            self.parity.promote(step, mr.meta.pack())
            before = self.meta if self._spare_buffers() and self.meta is not None and self.meta.step != step else None
            self._keep_protected(mr.meta, before)
            log.debug("step %d is protected (EC group %s)", step, list(self.members))
            self.broadcast_report()  # the leader waits for every node's before it leads the next round
        self.d.on_commit_state_changed()

    # ---- the worker thread -----------------------------------------------------------------------------------

    def _work(self) -> None:
        push = zmq.Context.instance().socket(zmq.PUSH)
        push.connect(EVENTS)
        links: Links | None = None

        def link_to(node: int):
            if node == self.node:
                return links.to(node, self.own_endpoint())
            self._await_first_report(node)
            incarnation = self._live_incarnation(node)
            if incarnation is None:
                return None
            # a request to this incarnation fails fast once it stops heartbeating or is replaced
            return links.to(node, self.peers[node].endpoint,
                            gone=lambda: self._live_incarnation(node) != incarnation)

        while True:
            job = self.jobs.get()
            if links is None:
                links = Links(self.codec)
            try:
                event = getattr(self, f"_job_{job[0]}")(link_to, *job[1:])
            except Exception as exc:  # reported to the event loop, which decides; ints name the job's subject
                event = {"ev": f"{job[0]}_failed", "args": [a for a in job[1:] if type(a) is int],
                         "error": f"{type(exc).__name__}: {exc}"}
            push.send(msgpack.packb(event, use_bin_type=True))

    def own_endpoint(self) -> str:
        bound = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        return bound.replace("0.0.0.0", "127.0.0.1").replace("[::]", "[::1]")  # a wildcard: reach it on loopback

    def _job_encode(self, link_to, step: int, round_id: int) -> dict:
        if self._round_aborted(round_id):  # superseded while queued: it must not claim a parity slot
            raise RuntimeError(f"round of step {step} superseded before it started")
        start = time.perf_counter()
        meta = encode_round(step, self.node, self.members, self.cfg.ec_parity, link_to, self.parity,
                            self.d.timeout, lambda: self._round_aborted(round_id))
        return {"ev": "encoded", "round": round_id, "meta": meta.pack(), "seconds": time.perf_counter() - start}

    def _job_probe(self, link_to) -> dict:
        deadline = time.monotonic() + min(self.d.timeout, 30.0)
        while time.monotonic() < deadline and (not all(self.alive(m) for m in self.members) or self.reports_pending()):
            time.sleep(0.2)  # give the group's SMPs a chance to appear after a whole-job start, and to report
        meta = newest_protected(self.members, self.node, link_to, min(self.d.timeout, 30.0), self._kept_by_job())
        return {"ev": "probed", "meta": meta.pack() if meta else None}

    def _kept_by_job(self) -> set[int] | None:
        """The protected steps every other live node of the job keeps, as reported (None: no report to go by)."""
        views = [{p.protected, p.previous} - {-1} for n, p in self.peers.items()
                 if n not in self.members and self.alive(n) and p.reported and not p.rebuilding]
        return set.intersection(*views) if views else None

    def _job_rebuild(self, link_to, meta_bytes: bytes, data: NodeData, headers: dict[int, Header]) -> dict:
        meta = GroupMeta.unpack(meta_bytes)
        try:
            rebuild_node(meta, self.node, data, self.parity, link_to, self.d.timeout)
        except RebuildError as exc:
            return {"ev": "rebuild_failed", "error": f"{type(exc).__name__}: {exc}", "silent": list(exc.silent)}
        problems = verify(data, headers)
        if problems:
            raise RebuildError("rebuilt data fails its checksums: " + "; ".join(problems))
        return {"ev": "rebuilt", "meta": meta_bytes}

    def _job_transfer_lookup(self, link_to, rank: int, step: int, source: int) -> dict:
        """First half of fetching a moved rank's snapshot: its header (size, checksums) from the holder."""
        link = link_to(source)
        if link is None:
            raise RuntimeError(f"node {source} holding rank {rank}'s step {step} is gone")
        _, blobs = link.request("manifest", self.d.timeout, step=step)
        header_bytes = next((bytes(h) for r, _, h in msgpack.unpackb(blobs[0], raw=False) if r == rank), None)
        if header_bytes is None:
            raise RuntimeError(f"node {source} no longer holds rank {rank}'s step {step}")
        return {"ev": "transfer_found", "rank": rank, "step": step, "source": source, "header": header_bytes}

    def _job_transfer(self, link_to, rank: int, step: int, source: int, buf: Buffer, header_bytes: bytes) -> dict:
        """Second half: the payload, into a buffer the event loop sized for it, verified against the header."""
        link = link_to(source)
        if link is None:
            raise RuntimeError(f"node {source} holding rank {rank}'s step {step} is gone")
        header = Header.unpack(header_bytes)

        def write(off: int, data: bytes) -> None:
            buf.segment.buf[HEADER_SIZE + off: HEADER_SIZE + off + len(data)] = data

        fetch_payload(link, rank, step, header.payload_len, write, self.d.timeout)
        if header.bad_chunks_in(buf.segment.buf):
            raise RuntimeError(f"rank {rank}'s step {step} fetched from node {source} fails its checksums")
        return {"ev": "transferred", "rank": rank, "step": step, "header": header_bytes, "source": source}

    # ---- events from threads ---------------------------------------------------------------------------------

    def _on_event(self, ev: dict[str, Any]) -> None:
        kind = ev["ev"]
        if kind == "connected":
            self._on_connected(ev["secret"])
        elif kind == "store_unreachable":
            log.warning("the job's rendezvous store at %s is not reachable yet (%s); still trying", self.cfg.store,
                        ev["error"])
        elif kind == "connect_failed":
            self._join_failed(f"rendezvous store {self.cfg.store}: {ev['error']}")
        elif kind == "encoded":
            meta = GroupMeta.unpack(ev["meta"])
            self.stats["last_round_s"], self.stats["last_round_step"] = ev["seconds"], meta.step
            self.stats["last_round_bytes"] = sum(meta.layout.sizes)
            self._report_round(ev["round"], meta, "")
        elif kind == "encode_failed":
            self._report_round(ev["args"][1], None, ev["error"])
        elif kind == "probed":
            self._start_rebuild(ev["meta"])
        elif kind == "rebuilt":
            self._finish_rebuild(GroupMeta.unpack(ev["meta"]))
        elif kind in ("probe_failed", "rebuild_failed"):
            self._rebuild_failed(ev["error"], ev.get("silent", ()))
        elif kind == "transfer_found":
            self.d.transfer_target(ev["rank"], Header.unpack(ev["header"]), lambda buf: self.jobs.put(
                ("transfer", ev["rank"], ev["step"], ev["source"], buf, ev["header"])))
        elif kind == "transferred":
            self.d.install_transfer(ev["rank"], ev["step"], Header.unpack(ev["header"]), ev["source"])
        elif kind in ("transfer_lookup_failed", "transfer_failed"):
            self.d.fail_transfer(ev["args"][0], ev["args"][1], ev["error"])

    def _join_failed(self, error: str) -> None:
        self.join_error = error
        log.error("this SMP cannot join its EC group: %s", error)
        self.rebuilding = False
        self.d.on_commit_state_changed()

    def _report_round(self, round_id: int, meta: GroupMeta | None, error: str) -> None:
        """Tell the leader how this node's part of round `round_id` ended (`meta`: encoded; else `error`)."""
        mr = self.member_round
        if mr is None or mr.round != round_id:
            return  # superseded or abandoned meanwhile
        mr.meta = meta
        mr.reported_ok = ok = meta is not None and not mr.aborted
        detail = "" if ok else error or "a local buffer was reused during the round"
        self._send(mr.leader, "ec_done", round=round_id, step=mr.step, ok=ok, detail=detail)

    def _start_rebuild(self, meta_bytes: bytes | None) -> None:
        if meta_bytes is None:
            self.rebuilding = False
            self.d.on_commit_state_changed()
            return
        meta = GroupMeta.unpack(meta_bytes)
        mine = meta.manifests[meta.members.index(self.node)]
        log.info("rebuilding node %d's snapshot of step %d (%d rank(s), %d bytes) from EC group %s", self.node,
                 meta.step, len(mine), sum(length for _, length, _ in mine), list(meta.members))
        if self._rebuild_attempts == 0:
            self._rebuild_started = time.monotonic()
        self._rebuild_attempts += 1
        self.d.store.when_ready([(rank, self.d.store.of(rank).buffers[0], HEADER_SIZE + length)
                                 for rank, length, _ in mine],
                                lambda: self._rebuild_into(meta_bytes, mine),
                                lambda exc: self._rebuild_failed(str(exc)))  # no room: the ranks hear why

    def _rebuild_into(self, meta_bytes: bytes, mine: tuple[tuple[int, int, bytes], ...]) -> None:
        """The node's buffers are sized: mark them WRITING and rebuild into them on the worker thread."""
        parts, headers = [], {}
        for rank, length, header_bytes in mine:
            header = Header.unpack(header_bytes)
            buf = self.d.store.of(rank).buffers[0]
            buf.write_header(Header(BufferState.WRITING, rank=rank, world=header.world, step=header.step,
                                    epoch=header.epoch))
            parts.append(Part(rank, buf, length))
            headers[rank] = header
        self.jobs.put(("rebuild", meta_bytes, NodeData(parts), headers))

    def _rebuild_failed(self, error: str, silent: Sequence[int] = ()) -> None:
        """Give up, unless members stopped answering mid-way and there is time and an attempt left: their SMPs may
        be back soon with their memory (the probe waits for every member to be alive and to have reported)."""
        if (silent and self._rebuild_attempts < REBUILD_ATTEMPTS
                and time.monotonic() - self._rebuild_started < self.d.timeout):
            log.warning("node %d's rebuild lost group member(s) %s mid-way (%s); asking the group again once they "
                        "are back (attempt %d of %d)", self.node, list(silent), error, self._rebuild_attempts + 1,
                        REBUILD_ATTEMPTS)
            self.jobs.put(("probe",))
            return
        self.rebuilding, self.rebuild_error = False, error
        log.error("node %d cannot be rebuilt: %s", self.node, error)
        self.d.on_commit_state_changed()

    def _finish_rebuild(self, meta: GroupMeta) -> None:
        for rank, _, header_bytes in meta.manifests[meta.members.index(self.node)]:
            self.d.store.of(rank).buffers[0].write_header(
                Header.unpack(header_bytes), origin=f"erasure code of EC group {list(meta.members)}")
            self.d.refresh_rank(rank)
        self.parity.promote(meta.step, meta.pack())
        self._keep_protected(meta, None)
        self.rebuilding = False
        self.stats["rebuild_s"] = time.monotonic() - self._rebuild_started
        log.info("rebuilt node %d's snapshot of step %d in %.2fs", self.node, meta.step, self.stats["rebuild_s"])
        self.broadcast_report()
        self.d.on_commit_state_changed()

    def start_transfer(self, rank: int, step: int, epoch: int) -> bool:
        """Fetch rank's (step, epoch) from a live peer; False when no live peer holds it."""
        for source in self.d.tracker.holders(rank, (step, epoch)):
            if source >= 0 and self.alive(source):
                self.jobs.put(("transfer_lookup", rank, step, source))
                return True
        return False

    # ---- peer requests ---------------------------------------------------------------------------------------

    def _on_peer(self, frames: list[bytes]) -> None:
        identity, rest = frames[0], frames[1:]
        try:
            msg, blobs = self.codec.unpack(rest)
        except PeerAuthError as exc:
            self._forged.warning("rejected a peer message: %s", exc)
            return
        except ProtocolError as exc:
            log.warning("rejected a peer message (authentic but malformed): %s", exc)
            self._reply(identity, loose_id(rest[1]), (), error=str(exc))
            return
        try:
            self._dispatch(msg, blobs, identity)
        except (KeyError, TypeError, ValueError) as exc:  # authentic but ill-formed inside its fields
            log.warning("rejected a malformed %r from node %s: %s", msg.get("op"), msg.get("from"), exc)

    def _dispatch(self, msg: dict[str, Any], blobs: list[bytes], identity: bytes | None) -> None:
        op = msg["op"]
        peer = self.peers.get(msg["from"])
        if "incarnation" in msg and peer is not None and msg["incarnation"] != peer.incarnation:
            if op != "report":  # a replaced SMP still running (a partition healed) must not drive rounds
                log.warning("ignored %r from node %d's incarnation %s: the node is %s now", op, msg["from"],
                            msg["incarnation"], peer.incarnation)
            return
        if op == "report":
            self._on_report(msg)
        elif op == "ec_start":
            self._on_ec_start(msg["round"], msg["step"], msg["base"], msg["from"])
        elif op == "ec_done":
            self._on_ec_done(msg)
        elif op == "ec_result":
            self._on_ec_result(msg["round"], msg["step"], msg["ok"])
        elif identity is not None and op in ("manifest", "data", "parity", "ec_status", "payload"):
            try:
                self._reply(identity, msg["id"], getattr(self, f"_read_{op}")(msg))
            except (KeyError, TypeError, ValueError, LookupError) as exc:
                self._reply(identity, msg["id"], (), error=str(exc))

    def _reply(self, identity: bytes, req_id: int, blobs, error: str = "") -> None:
        reply = self.codec.pack("reply", req_id, blobs, ok=not error, error=error, body=b"")
        self.sock.send_multipart([identity, *reply], copy=False)

    def _node_data(self, step: int, meta: GroupMeta | None = None) -> NodeData:
        """This node's data of `step` as the code sees it; LookupError unless it is whole and still the data the
        group encoded (`meta`, by default that of a kept step; a reader that gets the error ignores this member:
        its block counts as lost)."""
        if self.rebuilding:
            raise LookupError(f"node {self.node} is being rebuilt")
        mr = self.member_round
        if mr is not None and mr.step == step and mr.aborted:
            raise LookupError(f"node {self.node} no longer holds step {step} (a buffer was reused)")
        parts = [Part(rank, buf, buf.header.payload_len) for rank, rb in self.d.store.ranks.items()
                 if (buf := rb.holding(step)) is not None]
        if not parts:
            raise LookupError(f"node {self.node} holds no snapshot of step {step}")
        meta = meta or self._meta_of(step)
        if meta is not None:
            manifest = meta.manifests[meta.members.index(self.node)]
            coded = {rank for rank, _, _ in manifest}
            parts = [p for p in parts if p.rank in coded]  # not a rank that moved here since (its copy of the step)
            if sorted((p.rank, p.length, p.buffer.header.pack()) for p in parts) != sorted(manifest):
                raise LookupError(f"node {self.node}'s step {step} is not the data its parity was computed over")
        return NodeData(parts)

    def _read_manifest(self, msg) -> list[bytes]:
        data = self._node_data(msg["step"])
        return [msgpack.packb([[p.rank, p.length, p.buffer.header.pack()] for p in data.parts], use_bin_type=True)]

    def _read_data(self, msg) -> list[bytes]:
        data = self._node_data(msg["step"])
        return [data.read(off, length) for off, length in _checked_ranges(msg["ranges"])]

    def _read_parity(self, msg) -> list[bytes]:
        meta = self._meta_of(msg["step"])
        if meta is None:
            raise LookupError(f"no parity of step {msg['step']} (protected: {self.protected})")
        fault_point("smp_serving_rebuild", msg["step"])  # parity is read only to rebuild a node
        chunk = meta.chunk
        return [self.parity.read(msg["step"], off, length)
                for off, length in _checked_ranges([[slot * chunk, chunk] for slot in _checked_ints(msg["slots"])])]

    def _read_ec_status(self, msg) -> list[bytes]:
        if self.rebuilding:
            return []
        return [m.pack() for m in (self.meta, self.previous) if m is not None]

    def _read_payload(self, msg) -> list[bytes]:
        buf = self.d.store.of(msg["rank"]).holding(msg["step"])
        if buf is None:
            raise LookupError(f"rank {msg['rank']}'s step {msg['step']} is not here")
        start = HEADER_SIZE + msg["offset"]
        return [bytes(buf.segment.buf[start: start + msg["length"]])]

    def status(self) -> dict[str, Any]:
        peers = {str(n): {"alive": self.alive(n), "committed": p.committed, "protected": p.protected}
                 for n, p in sorted(self.peers.items())}
        endpoint = self.own_endpoint() if self.sock is not None else None  # None until the store is reached
        return {"protected": self.protected, "endpoint": endpoint, "peers": peers,
                "ec_group": list(self.members), "ec_parity": self.cfg.ec_parity, "parity_bytes": self.parity.nbytes(),
                "rebuilding": self.rebuilding, "rebuild_error": self.rebuild_error, "ec_stats": self.stats}

    def close(self, unlink_all: bool) -> None:
        self.directory.stop()
        self.parity.close(unlink_all)
        if self.sock is not None:
            self.sock.close(0)
        self.events.close(0)
        if self.links is not None:
            self.links.close()


def _checked_ints(values: list) -> list[int]:
    if not all(type(v) is int and v >= 0 for v in values):
        raise ValueError("expected a list of non-negative ints")
    return values


def _checked_ranges(ranges: list) -> list[tuple[int, int]]:
    """[offset, length] pairs of a peer read, within the frame limit."""
    pairs = [tuple(_checked_ints(r)) for r in ranges if isinstance(r, list) and len(r) == 2]
    if len(pairs) != len(ranges) or sum(length for _, length in pairs) > MAX_PEER_BYTES:
        raise ValueError(f"bad read ranges (pairs of [offset, length] totalling at most {MAX_PEER_BYTES} bytes)")
    return pairs
