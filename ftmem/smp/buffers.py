"""A rank's snapshot buffers on the SMP side: shared-memory segments plus the header state of each."""

from __future__ import annotations

import os
import re
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable

from ftmem.log import get_logger
from ftmem.smp.layout import HEADER_SIZE, BufferState, Header, LayoutError
from ftmem.smp.shm import Segment, list_segments, unlink

log = get_logger("smp")
_NAME = re.compile(r"r(\d+)\.b(\d+)\.g(\d+)$")
_SLACK = 1 << 20
CREATORS = 4  # segments created at once for snapshots waiting on them (the kernel zeroes their pages: that
# scales with cores); segments reserved ahead of need are created one at a time beside them


def _segment_size(nbytes: int) -> int:
    return (nbytes + nbytes // 16 + _SLACK + 4095) // 4096 * 4096


@dataclass(frozen=True)
class _Creation:
    size: int
    segment: Future  # of the Segment
    reserved: bool   # ahead of need (`BufferStore.reserve`)


@dataclass
class Buffer:
    index: int
    segment: Segment | None = None
    header: Header = field(default_factory=lambda: Header(BufferState.EMPTY))
    origin: str = "local memory"  # how its snapshot got here: written by the rank, rebuilt, fetched

    @property
    def complete_step(self) -> int | None:
        return self.header.step if self.header.state == BufferState.COMPLETE else None

    def write_header(self, header: Header, origin: str = "local memory") -> None:
        assert self.segment is not None
        packed = header.pack()
        self.segment.buf[: len(packed)] = packed
        self.header = header
        self.origin = origin


@dataclass
class RankBuffers:
    """The buffers of one global rank held by this SMP."""

    rank: int
    buffers: list[Buffer]

    def complete(self) -> set[tuple[int, int]]:
        return {(b.header.step, b.header.epoch) for b in self.buffers if b.header.state == BufferState.COMPLETE}

    def holding(self, step: int) -> Buffer | None:
        return next((b for b in self.buffers if b.complete_step == step), None)

    def writing(self, step: int, epoch: int) -> Buffer | None:
        return next((b for b in self.buffers if b.header.state == BufferState.WRITING
                     and (b.header.step, b.header.epoch) == (step, epoch)), None)

    def invalidate(self, buf: Buffer) -> None:
        if buf.segment is not None and buf.header.state != BufferState.EMPTY:
            buf.write_header(Header(BufferState.EMPTY, rank=self.rank))

    def nbytes(self) -> int:
        return sum(b.segment.size for b in self.buffers if b.segment is not None)


class BufferStore:
    """All buffers of one SMP, named `<prefix>r<rank>.b<index>.g<generation>` in /dev/shm.

    Segments are created on threads of their own (`ready`, `reserve`, `when_ready`): creating one of several GB
    takes seconds, which the event loop must not spend (every rank of the node and the peers' heartbeats wait
    on it), and a node's ranks get theirs in parallel. A rank's other buffers are reserved at its first snapshot
    and created in the background; one needed before its creation started is created at once instead."""

    def __init__(self, prefix: str, count: int) -> None:
        self.prefix = prefix
        self.count = count
        self.ranks: dict[int, RankBuffers] = {}
        self._gen = 0
        self._creating: dict[tuple[int, int], _Creation] = {}  # by (rank, buffer index)
        self._waiting: list[tuple[list[tuple[int, Buffer, int]], Callable[[], None],
                                  Callable[[OSError], None]]] = []  # see `when_ready`
        self._creators = ThreadPoolExecutor(CREATORS, thread_name_prefix="ftmem-shm")
        self._reserver = ThreadPoolExecutor(1, thread_name_prefix="ftmem-shm-reserve")
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    @property
    def wakeup_fd(self) -> int:
        """Readable once a segment creation ended (the event loop polls it, then `drain_wakeups`)."""
        return self._wake_r

    def drain_wakeups(self) -> None:
        try:
            os.read(self._wake_r, 4096)
        except BlockingIOError:
            pass

    def _wake(self, _: Future) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except OSError:
            pass  # full (a wakeup is pending anyway) or closed (stopping)

    def _create(self, rank: int, index: int, nbytes: int, reserved: bool = False) -> None:
        self._gen += 1
        size = _segment_size(nbytes)
        pool = self._reserver if reserved else self._creators
        segment = pool.submit(Segment.create, f"{self.prefix}r{rank}.b{index}.g{self._gen}", size)
        segment.add_done_callback(self._wake)
        self._creating[(rank, index)] = _Creation(size, segment, reserved)

    def ready(self, rank: int, buf: Buffer, nbytes: int) -> bool:
        """Whether `buf` holds `nbytes` now. If not, its segment is being (re)created: ask again once
        `wakeup_fd` fires. Raises a creation's error (an OSError: ShmFullError when there is no room) when it
        failed for this size."""
        key = (rank, buf.index)
        creation = self._creating.get(key)
        if creation is not None:
            if creation.reserved and creation.segment.cancel():  # not started: needed now, so created at once
                del self._creating[key]
            elif not creation.segment.done():
                return False
            else:
                del self._creating[key]
                if creation.segment.exception() is None:
                    self._install(rank, buf, creation.segment.result())
                elif creation.size <= _segment_size(nbytes):
                    raise creation.segment.exception()
        if buf.segment is not None and buf.segment.size >= nbytes:
            return True
        self._create(rank, buf.index, nbytes)
        return False

    def reserve(self, rank: int, nbytes: int) -> None:
        """Start creating every buffer of `rank` that has no segment yet, so its next snapshots find theirs."""
        for buf in self.of(rank).buffers:
            if buf.segment is None and (rank, buf.index) not in self._creating:
                self._create(rank, buf.index, nbytes, reserved=True)

    def when_ready(self, wanted: list[tuple[int, Buffer, int]], then: Callable[[], None],
                   failed: Callable[[OSError], None]) -> None:
        """(Re)create the segments of these (rank, buffer, nbytes) that are missing or too small, all at once, and
        call `then` when every one is ready, or `failed` with a creation's error: at once if nothing needs
        creating, else from `run_ready` (the event loop calls it after each wakeup). A rebuilt node or a moved
        rank may need gigabytes of new segments, and the event loop must not wait for them."""
        self._waiting.append((wanted, then, failed))
        self.run_ready()

    def run_ready(self) -> None:
        """Call back what `when_ready` waits for and is now ready (or failed)."""
        waiting, self._waiting = self._waiting, []
        for wanted, then, failed in waiting:
            try:
                done = [self.ready(rank, buf, nbytes) for rank, buf, nbytes in wanted]  # starts each creation
            except OSError as exc:  # any failed creation (no room, a name taken, ...) ends the wait, never the SMP
                failed(exc)
                continue
            if all(done):
                then()
            else:
                self._waiting.append((wanted, then, failed))

    def _install(self, rank: int, buf: Buffer, segment: Segment) -> None:
        if buf.segment is not None:
            buf.segment.close()
            buf.segment.unlink()
        buf.segment = segment
        buf.header = Header(BufferState.EMPTY, rank=rank)

    def _discard(self, rank: int, index: int) -> None:
        """Remove what a creation for a buffer that is going away made (waits for it to end)."""
        creating = self._creating.pop((rank, index)).segment
        if creating.cancel() or creating.exception() is not None:
            return
        segment = creating.result()
        segment.close()
        segment.unlink()

    def of(self, rank: int) -> RankBuffers:
        if rank not in self.ranks:
            self.ranks[rank] = RankBuffers(rank, [Buffer(i) for i in range(self.count)])
        return self.ranks[rank]

    def adopt(self) -> int:
        """Take over the segments a previous SMP of this node left, keeping only verified complete snapshots.

        Returns the number of complete snapshots adopted."""
        for name in list_segments(self.prefix):
            m = _NAME.search(name)
            if not m:
                continue
            rank, index, gen = (int(x) for x in m.groups())
            self._gen = max(self._gen, gen)
            if index >= self.count:
                unlink(name)
                continue
            buf = self.of(rank).buffers[index]
            segment = Segment.open(name, populate=False)
            header = self._verified_header(rank, segment)
            if buf.segment is not None:
                # two generations: the SMP died between creating a larger segment and installing it in place of
                # the older one, so the newer is blank, and the older may hold a snapshot (one the job needs)
                (older, older_header), newer = sorted([(buf.segment, buf.header), (segment, header)],
                                                      key=lambda p: int(_NAME.search(p[0].name).group(3)))
                keep, drop = ((older, older_header), newer) if older_header.state != BufferState.EMPTY else \
                    (newer, (older, older_header))
                (segment, header), (dropped, _) = keep, drop
                dropped.close()
                dropped.unlink()
            buf.segment, buf.header = segment, header
        return sum(b.header.state == BufferState.COMPLETE for rb in self.ranks.values() for b in rb.buffers)

    @staticmethod
    def _verified_header(rank: int, segment: Segment) -> Header:
        try:
            header = Header.unpack(segment.buf[:HEADER_SIZE])
        except LayoutError as exc:
            log.warning("segment %s: %s; treating it as empty", segment.name, exc)
            return Header(BufferState.EMPTY, rank=rank)
        if header.state == BufferState.WRITING:
            return header  # a copy in flight when the SMP died: its rank may still commit it
        if header.state != BufferState.COMPLETE:
            return Header(BufferState.EMPTY, rank=rank)
        if HEADER_SIZE + header.payload_len > segment.size:
            log.error("segment %s: payload longer than the segment; dropping it", segment.name)
            return Header(BufferState.EMPTY, rank=rank)
        bad = header.bad_chunks_in(segment.buf)
        if bad:
            log.error("segment %s (rank %d step %d) fails its checksums in chunks %s; dropping it",
                      segment.name, rank, header.step, bad[:8])
            return Header(BufferState.EMPTY, rank=rank)
        return header

    def release(self, rank: int) -> int:
        """Unlink every buffer of `rank` and forget it; returns the bytes freed."""
        rb = self.ranks.pop(rank)
        self._waiting = [w for w in self._waiting if all(r != rank for r, _, _ in w[0])]
        for index in [i for r, i in self._creating if r == rank]:
            self._discard(rank, index)
        freed = rb.nbytes()
        for buf in rb.buffers:
            if buf.segment is not None:
                buf.segment.close()
                buf.segment.unlink()
                buf.segment = None
        return freed

    def nbytes(self) -> int:
        return sum(rb.nbytes() for rb in self.ranks.values())

    def has_complete(self) -> bool:
        return any(rb.complete() for rb in self.ranks.values())

    def snapshot_world(self) -> int:
        """The world size that took the newest complete snapshot held here (0: none): a restore into another
        world size cannot use these snapshots."""
        done = [b.header for rb in self.ranks.values() for b in rb.buffers if b.header.state == BufferState.COMPLETE]
        return max(done, key=lambda h: (h.epoch, h.step)).world if done else 0

    def close(self, unlink_all: bool) -> None:
        for rank, index in list(self._creating):
            self._discard(rank, index)
        self._creators.shutdown()
        self._reserver.shutdown()
        os.close(self._wake_r)
        os.close(self._wake_w)
        for rb in self.ranks.values():
            for buf in rb.buffers:
                if buf.segment is not None:
                    buf.segment.close()
                    if unlink_all:
                        buf.segment.unlink()
                    buf.segment = None
