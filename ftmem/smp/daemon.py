"""The SMP daemon: one per node, serving its ranks over a zmq ipc socket from a single-threaded event loop.

It owns the node's snapshot buffers (BufferStore), decides which buffer a rank writes next and when a step is
committed (CommitTracker), and keeps serving whatever a client sends: a bad request gets an error reply and
changes nothing. All of its state that matters lives in shared memory, so a restarted daemon re-adopts it.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import psutil
import zmq

from ftmem.env import NodeEnv
from ftmem.faults import fault_point
from ftmem.log import get_logger
from ftmem.smp.buffers import Buffer, BufferStore
from ftmem.smp.cluster import Cluster, ClusterConfig
from ftmem.smp.commit import LOCAL, CommitTracker, reusable
from ftmem.smp.layout import HEADER_SIZE, MAX_CHUNKS, BufferState, Header
from ftmem.smp.protocol import CONTROL_SCHEMA, MAX_CONTROL_BYTES, ProtocolError, decode, encode, loose_id
from ftmem.smp.shm import ShmFullError

log = get_logger("smp")
TICK_MS = 200


class RequestError(Exception):
    """A well-formed request that cannot be served; its text goes back to the client."""


@dataclass
class _Pending:
    identity: bytes
    msg: dict[str, Any]
    deadline: float


@dataclass
class _RankInfo:
    pid: int
    local_rank: int
    closed: bool = False
    commits: int = 0  # snapshots this registration (this process) committed
    active: float = field(default_factory=time.monotonic)  # when it registered or last committed

    def committed(self) -> None:
        self.commits += 1
        self.active = time.monotonic()


class SnapshotDaemon:
    def __init__(self, env: NodeEnv, *, buffers: int = 2, timeout: float = 300.0,
                 exit_when_done: bool = False, parent_pid: int | None = None,
                 cluster: ClusterConfig | None = None) -> None:
        self.env = env
        self.timeout = timeout
        self.exit_when_done = exit_when_done
        self.parent_pid = parent_pid
        self.store = BufferStore(env.segment_prefix, buffers)
        self.tracker = CommitTracker()
        self.ranks: dict[int, _RankInfo] = {}
        self.pending: list[_Pending] = []
        self._stop: bool | None = None  # None: running; else whether to unlink segments on exit
        self._lock_fd: int | None = None
        self._cluster_config = cluster
        self.cluster: Cluster | None = None
        self.transfers: set[tuple[int, int]] = set()  # (rank, step) being fetched from a peer (rank moved)
        self.transfer_errors: dict[tuple[int, int], str] = {}

    # ---- lifecycle -------------------------------------------------------------------------------------------

    def acquire_lock(self) -> bool:
        """Only one SMP per job and node: the lock is held for the daemon's lifetime (released on death)."""
        fd = os.open(self.env.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._lock_fd = fd
        return True

    def run(self) -> None:
        adopted = self.store.adopt()
        for rank, rb in self.store.ranks.items():
            self.tracker.set_complete(rank, rb.complete())
        self.tracker.world = self.store.snapshot_world() or None
        self.tracker.evaluate()
        if adopted:
            log.info("re-adopted %d verified snapshot(s) of job %s node %d; committed step %s",
                     adopted, self.env.job, self.env.node, self.tracker.committed)
        ctx = zmq.Context.instance()
        sock = ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, MAX_CONTROL_BYTES + 1024)
        if os.path.exists(self.env.socket_path):
            os.unlink(self.env.socket_path)  # stale: we hold the lock, so no live SMP owns it
        sock.bind(self.env.control_address)
        self._write_info()
        if self._cluster_config is not None and self._cluster_config.nnodes > 1:
            self.cluster = Cluster(self, self._cluster_config)
        signal.signal(signal.SIGTERM, lambda *_: self._request_stop(False))
        log.info("serving job %s node %d at %s (pid %d)", self.env.job, self.env.node,
                 self.env.control_address, os.getpid())
        try:
            self._loop(sock)
        finally:
            sock.close(0)
            cleanup = bool(self._stop)
            self.store.close(unlink_all=cleanup)
            if self.cluster is not None:
                self.cluster.close(unlink_all=cleanup)
            for path in (self.env.info_path, self.env.socket_path):
                if os.path.exists(path):
                    os.unlink(path)
            log.info("stopped (%s)", "segments removed" if cleanup else "segments kept")

    def _write_info(self) -> None:
        tmp = self.env.info_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"pid": os.getpid(), "job": self.env.job, "node": self.env.node,
                       "control": self.env.control_address, "parent_pid": self.parent_pid}, f)
        os.replace(tmp, self.env.info_path)

    def _request_stop(self, cleanup: bool) -> None:
        self._stop = cleanup

    def _loop(self, sock: zmq.Socket) -> None:
        self._sock = sock
        while self._stop is None:
            poller = zmq.Poller()
            for s in [sock, self.store.wakeup_fd, *(self.cluster.sockets() if self.cluster else [])]:
                poller.register(s, zmq.POLLIN)
            for ready, _ in poller.poll(TICK_MS):
                if ready == self.store.wakeup_fd:
                    self.store.drain_wakeups()  # a segment is created: _tick answers the prepare waiting for it
                elif ready is sock:
                    while True:
                        try:
                            frames = sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        self._handle(sock, frames)
                else:
                    self.cluster.handle(ready)
            self._tick(sock)

    def _tick(self, sock: zmq.Socket) -> None:
        self.store.run_ready()
        self._retry_pending(sock)
        if self.cluster is not None:
            self.cluster.tick()
        if self.parent_pid is not None and not psutil.pid_exists(self.parent_pid):
            log.warning("launcher (pid %d) is gone; exiting and keeping the segments", self.parent_pid)
            self._request_stop(False)

    # ---- request handling ------------------------------------------------------------------------------------

    def _handle(self, sock: zmq.Socket, frames: list[bytes]) -> None:
        identity, data, *extra = frames
        if extra:
            log.warning("rejected a message of %d frames (expected one)", len(frames) - 1)
            sock.send_multipart([identity, encode({"id": loose_id(data), "ok": False,
                                                   "error": f"a request is one frame, got {len(frames) - 1}"})])
            return
        try:
            msg = decode(data, CONTROL_SCHEMA, MAX_CONTROL_BYTES)
        except ProtocolError as exc:
            log.warning("rejected a malformed request: %s", exc)
            sock.send_multipart([identity, encode({"id": loose_id(data), "ok": False, "error": str(exc)})])
            return
        self._serve(sock, identity, msg)

    def _serve(self, sock: zmq.Socket, identity: bytes, msg: dict[str, Any]) -> bool:
        """Answer `msg` unless it must wait; True when answered."""
        try:
            reply = getattr(self, f"_op_{msg['op']}")(msg)
        except (RequestError, ShmFullError) as exc:
            reply = {"ok": False, "error": str(exc)}
        except Exception as exc:  # a bug must cost one request, not the node's snapshots
            log.exception("internal error serving %s", msg)
            reply = {"ok": False, "error": f"internal SMP error ({type(exc).__name__}: {exc}); see the SMP log"}
        if reply is None:
            waiting = next((p for p in self.pending if p.msg["id"] == msg["id"]), None)
            if waiting is None:
                self.pending.append(_Pending(identity, msg, time.monotonic() + self.timeout))
            else:
                waiting.identity = identity  # a retry on a fresh socket: answer there
            return False
        reply.setdefault("ok", True)
        sock.send_multipart([identity, encode({"id": msg["id"], **reply})])
        return True

    def _retry_pending(self, sock: zmq.Socket) -> None:
        waiting, self.pending = self.pending, []
        now = time.monotonic()
        for p in waiting:
            if now > p.deadline:
                sock.send_multipart([p.identity, encode({"id": p.msg["id"], "ok": False,
                                                         "error": self._stuck_reason(p.msg)})])
            elif not self._serve(sock, p.identity, p.msg):
                self.pending[-1].deadline = p.deadline

    def _stuck_reason(self, msg: dict[str, Any]) -> str:
        if msg["op"] != "prepare":
            unjoined = (f" (this node's SMP has not reached the job's rendezvous store at {self.cluster.cfg.store})"
                        if self.cluster is not None and not self.cluster.ready else "")
            return (f"timed out after {self.timeout:.0f}s: {msg['op']} of rank {msg.get('rank')} still cannot be "
                    f"served{unjoined}")
        rb = self.store.of(msg["rank"])
        newest = max((b.complete_step for b in rb.buffers if b.complete_step is not None), default=None)
        epoch = self.tracker.epoch
        missing = self.tracker.missing(newest, epoch) if newest is not None else []
        return (f"timed out after {self.timeout:.0f}s waiting for step {newest} to commit before rank "
                f"{msg['rank']} may write step {msg['step']}; ranks that have not completed it: {missing}")

    # ---- ops -------------------------------------------------------------------------------------------------

    def _op_ping(self, msg):
        return {"pid": os.getpid()}

    def _op_status(self, msg):
        return {"job": self.env.job, "node": self.env.node, "pid": os.getpid(), "epoch": self.tracker.epoch,
                "committed": self.tracker.committed, "world": self.tracker.world, "shm_bytes": self.store.nbytes(),
                "ranks": {str(r): {"pid": info.pid, "closed": info.closed, "commits": info.commits,
                                   "idle_s": time.monotonic() - info.active,
                                   "steps": sorted(s for s, _ in self.store.of(r).complete())}
                          for r, info in sorted(self.ranks.items())},
                **(self.cluster.status() if self.cluster else {})}

    def _op_register(self, msg):
        rank, world = msg["rank"], msg["world"]
        if not 0 <= rank < world:
            raise RequestError(f"rank {rank} is outside a world of {world}")
        if self.tracker.world not in (None, world):
            log.warning("world size changed from %s to %d; the snapshots of the old world cannot be restored",
                        self.tracker.world, world)
        self.tracker.world = world
        self.ranks[rank] = _RankInfo(msg["pid"], msg["local_rank"])
        rb = self.store.of(rank)
        for buf in rb.buffers:
            if buf.header.state == BufferState.WRITING:
                rb.invalidate(buf)  # left by a previous incarnation that died mid-copy
        return {}

    def _know_rank(self, msg) -> None:
        """Learn a rank that prepares a snapshot without having registered here: this SMP restarted since the
        rank's restore. Without its world no step would ever commit (and buffers of the last committed step would
        be reused), and without its pid the hang watchdog could not judge the node's ranks."""
        if not 0 <= msg["rank"] < msg["world"]:
            raise RequestError(f"rank {msg['rank']} is outside a world of {msg['world']}")
        if self.tracker.world is None:
            self.tracker.world = msg["world"]
        info = self.ranks.get(msg["rank"])
        if info is None or info.pid != msg["pid"]:
            self.ranks[msg["rank"]] = _RankInfo(msg["pid"], msg["local_rank"])

    def _op_available(self, msg):
        """What this rank can restore: its snapshots here and at live peers (moved ranks), newest first."""
        if self.cluster is None:
            snaps, lost = self.store.of(msg["rank"]).complete(), ""
        elif self.cluster.join_error:
            raise RequestError(f"node {self.env.node}'s SMP cannot join its EC group: {self.cluster.join_error}")
        elif self.cluster.rebuilding or self.cluster.reports_pending():
            return None  # ranks restore only after this node's data is rebuilt and every live peer reported
        else:
            live = {LOCAL} | {n for n in self.cluster.peers if self.cluster.alive(n)}
            snaps, lost = self.tracker.complete(msg["rank"], live), self.cluster.rebuild_error or ""
        return {"epoch": self.tracker.epoch, "steps": [list(s) for s in sorted(snaps, reverse=True)], "lost": lost,
                "world": self.store.snapshot_world()}

    def _op_begin(self, msg):
        """Open epoch `epoch` restarting after `step` (-1: from scratch); only once the rank's snapshot is here."""
        rank, step, epoch = msg["rank"], msg["step"], msg["epoch"]
        restart = None if step < 0 else step
        rb = self.store.of(rank)
        if restart is not None and rb.holding(restart) is None:
            self._fetch_moved(rank, restart)
            return None  # a transfer from a peer is under way
        if epoch > self.tracker.epoch or self.tracker.committed != restart:
            self.tracker.restart_at(restart, epoch)
            if self.cluster is not None:
                self.cluster.restarted_at(restart)
        for buf in rb.buffers:
            if buf.header.state != BufferState.EMPTY and (restart is None or buf.header.step > restart):
                rb.invalidate(buf)
        self._update_complete(rank)
        if restart is None:
            return {"source": "none"}
        buf = rb.holding(restart)
        return {"source": buf.origin, "segment": buf.segment.name}

    def _fetch_moved(self, rank: int, step: int) -> None:
        """Start (or keep waiting for) fetching a moved rank's snapshot from the peer that holds it; RequestError
        when no live node holds it or the fetch failed."""
        error = self.transfer_errors.pop((rank, step), None)
        if error is not None:
            raise RequestError(error)
        if (rank, step) in self.transfers or (self.cluster is not None and self.cluster.reports_pending()):
            return
        epoch_of = [e for s, e in self.tracker.complete(rank) if s == step]
        holders = [n for n in self.tracker.holders(rank, (step, epoch_of[0])) if n != LOCAL] if epoch_of else []
        if self.cluster is not None and holders and self.cluster.start_transfer(rank, step, epoch_of[0]):
            self.transfers.add((rank, step))
            log.info("fetching rank %d's snapshot of step %d from node %s", rank, step, holders)
            return
        raise RequestError(f"rank {rank} has no snapshot of step {step} on node {self.env.node} or a live peer")

    def _op_corrupt(self, msg):
        rb = self.store.of(msg["rank"])
        buf = rb.holding(msg["step"])
        log.error("rank %d reports its snapshot of step %d corrupt: %s", msg["rank"], msg["step"], msg["detail"])
        if buf is not None:
            if self.cluster is not None:
                self.cluster.data_lost(msg["step"])
            rb.invalidate(buf)
            self._update_complete(msg["rank"])
        return {"retry": False}

    def transfer_target(self, rank: int, header: Header, then: Callable[[Buffer], None]) -> None:
        """Size a buffer for a moved rank's snapshot fetched from a peer (its segment created off the event loop),
        mark it WRITING and hand it to `then`; a shared-memory shortage fails the transfer. Never a buffer of a
        step this node must keep (the committed one, or one the erasure code protects or is encoding)."""
        rb = self.store.of(rank)
        steps = [b.complete_step for b in rb.buffers]
        keep = self.cluster.keep() if self.cluster is not None else frozenset()
        free = reusable(steps, self.tracker.committed, None, keep)
        if not free:
            self.fail_transfer(rank, header.step, f"every buffer of rank {rank} here holds a step that must stay "
                                                  f"({sorted(s for s in steps if s is not None)})")
            return
        target = rb.buffers[free[0]]
        if self.cluster is not None:
            self.cluster.buffer_taken(target.complete_step)
        rb.invalidate(target)

        def sized() -> None:
            target.write_header(Header(BufferState.WRITING, rank=rank, world=header.world, step=header.step,
                                       epoch=header.epoch))
            then(target)

        self.store.when_ready([(rank, target, HEADER_SIZE + header.payload_len)], sized,
                              lambda exc: self.fail_transfer(rank, header.step, str(exc)))

    def install_transfer(self, rank: int, step: int, header: Header, source: int) -> None:
        rb = self.store.of(rank)
        buf = rb.writing(header.step, header.epoch)
        if buf is None:  # the rank re-registered meanwhile, which drops WRITING buffers
            self.fail_transfer(rank, step, "the buffer was released during the transfer")
            return
        self.transfers.discard((rank, step))
        buf.write_header(header, origin=f"node {source}'s memory (rank moved)")
        log.info("rank %d's snapshot of step %d is now local", rank, step)
        self.refresh_rank(rank)

    def fail_transfer(self, rank: int, step: int, error: str) -> None:
        self.transfers.discard((rank, step))
        rb = self.store.of(rank)
        for buf in rb.buffers:
            if buf.header.state == BufferState.WRITING and buf.header.step == step:
                rb.invalidate(buf)
        self.transfer_errors[(rank, step)] = f"fetching rank {rank}'s step {step} from a peer failed: {error}"
        self.on_commit_state_changed()

    def _op_prepare(self, msg):
        rank, step, epoch, nbytes = msg["rank"], msg["step"], msg["epoch"], msg["nbytes"]
        if epoch < self.tracker.epoch:
            raise RequestError(f"rank {rank} writes epoch {epoch} but the job restarted in epoch "
                               f"{self.tracker.epoch}; this process is stale")
        self._know_rank(msg)
        rb = self.store.of(rank)
        buf = rb.writing(step, epoch)
        if buf is None:
            steps = [b.complete_step for b in rb.buffers]
            newest = max((s for s in steps if s is not None), default=None)
            keep = self.cluster.keep() if self.cluster else frozenset()
            free = reusable(steps, self.tracker.committed, newest, keep)
            if not free:
                return None  # wait until the newest step commits
            buf = rb.buffers[free[0]]
            taken = buf.complete_step  # before `ready` replaces a segment too small for this snapshot
            if not self.store.ready(rank, buf, nbytes):
                self.store.reserve(rank, nbytes)
                return None  # its segment is being created; answered once it is (wakeup_fd)
            if self.cluster is not None:
                self.cluster.buffer_taken(taken)
            buf.write_header(Header(BufferState.WRITING, rank=rank, world=self.tracker.world or 0, step=step,
                                    epoch=epoch))
            self._update_complete(rank)
        return {"buffer": buf.index, "segment": buf.segment.name}

    def _op_commit(self, msg):
        rank, step, epoch = msg["rank"], msg["step"], msg["epoch"]
        rb = self.store.of(rank)
        if (step, epoch) in rb.complete():
            return {}
        buf = rb.writing(step, epoch)
        if buf is None:
            raise RequestError(f"rank {rank} commits step {step} (epoch {epoch}) that it never prepared")
        crcs = msg["crcs"]
        n = len(crcs) // 4
        if len(crcs) % 4 or n > MAX_CHUNKS or msg["chunk_size"] <= 0:
            raise RequestError("commit: malformed checksum table")
        if n * msg["chunk_size"] < msg["payload_len"] or msg["desc_off"] + msg["desc_len"] > msg["payload_len"] \
                or HEADER_SIZE + msg["payload_len"] > buf.segment.size:
            raise RequestError("commit: payload, descriptor and checksums do not fit the buffer")
        buf.write_header(Header(BufferState.COMPLETE, rank=rank, world=self.tracker.world or 0, step=step,
                                epoch=epoch, payload_len=msg["payload_len"], desc_off=msg["desc_off"],
                                desc_len=msg["desc_len"], chunk_size=msg["chunk_size"],
                                crcs=list(struct.unpack(f"<{n}I", crcs))))
        self._update_complete(rank)
        if rank in self.ranks:
            self.ranks[rank].committed()
        fault_point("smp_after_local_commit", step)
        return {}

    def _op_close(self, msg):
        info = self.ranks.get(msg["rank"])
        if info is not None:
            info.closed = True
        world = self.tracker.world or 0
        if self.exit_when_done and world and all(self.ranks.get(r) and self.ranks[r].closed for r in range(world)):
            keep = os.environ.get("FTMEM_KEEP") == "1"
            log.info("every rank of job %s closed; exiting", self.env.job)
            self._request_stop(not keep)
        return {}

    def _op_shutdown(self, msg):
        self._request_stop(msg["cleanup"])
        return {}

    def _update_complete(self, rank: int) -> None:
        self.tracker.set_complete(rank, self.store.of(rank).complete())
        self.tracker.evaluate()
        self._release_departed()
        if self.cluster is not None:
            self.cluster.broadcast_report()

    def _release_departed(self) -> None:
        """Free the buffers of ranks that moved to another node at a re-rendezvous: the job committed a step
        newer than all of a rank's snapshots here, and a peer holds a newer one of it, so no restore reads these;
        they go once the erasure code no longer needs them (protected and running rounds' steps) and nothing
        writes them. Without this every move would leave a whole set of buffers in /dev/shm until the job ends
        (and the rank's old registration, whose dead pid keeps the hang watchdog from judging this node).
        (A rank that runs here can also lag the committed step here, when its copy of it was found corrupt: the
        peer's newer copy is what tells a move apart.)"""
        committed = self.tracker.committed
        in_use = self.cluster.in_use() if self.cluster is not None else None
        if committed is None or in_use is None:
            return
        for rank, rb in list(self.store.ranks.items()):
            steps = {b.complete_step for b in rb.buffers} - {None}
            if not steps or max(steps) >= committed or steps & in_use:
                continue
            elsewhere = self.tracker.newest_elsewhere(rank)
            if (elsewhere is None or elsewhere <= max(steps)
                    or any(b.header.state == BufferState.WRITING for b in rb.buffers)
                    or any(r == rank for r, _ in self.transfers)):
                continue
            freed = self.store.release(rank)
            self.tracker.set_complete(rank, set())
            self.ranks.pop(rank, None)  # its old process here is gone: the hang watchdog judges the ranks that run here
            log.info("released rank %d's buffers (%.1f MB): its snapshots here end at step %d, the job committed "
                     "step %d and a peer holds its step %d (the rank runs on another node now)", rank, freed / 1e6,
                     max(steps), committed, elsewhere)

    refresh_rank = _update_complete

    def on_commit_state_changed(self) -> None:
        """Peers reported, a round ended or a rebuild finished: re-evaluate and serve what was waiting."""
        self.tracker.evaluate()
        self._release_departed()
        self._retry_pending(self._sock)

