"""A rank's snapshot buffers on the SMP side: shared-memory segments plus the header state of each."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ftmem.log import get_logger
from ftmem.smp.layout import HEADER_SIZE, BufferState, Header, LayoutError
from ftmem.smp.shm import Segment, list_segments, unlink

log = get_logger("smp")
_NAME = re.compile(r"r(\d+)\.b(\d+)\.g(\d+)$")
_SLACK = 1 << 20


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
    """All buffers of one SMP, named `<prefix>r<rank>.b<index>.g<generation>` in /dev/shm."""

    def __init__(self, prefix: str, count: int) -> None:
        self.prefix = prefix
        self.count = count
        self.ranks: dict[int, RankBuffers] = {}
        self._gen = 0

    def of(self, rank: int) -> RankBuffers:
        if rank not in self.ranks:
            self.ranks[rank] = RankBuffers(rank, [Buffer(i) for i in range(self.count)])
        return self.ranks[rank]

    def ensure_size(self, rank: int, buf: Buffer, nbytes: int) -> None:
        """(Re)create the buffer's segment when it is missing or too small."""
        if buf.segment is not None and buf.segment.size >= nbytes:
            return
        size = (nbytes + nbytes // 16 + _SLACK + 4095) // 4096 * 4096
        self._gen += 1
        segment = Segment.create(f"{self.prefix}r{rank}.b{buf.index}.g{self._gen}", size)
        if buf.segment is not None:
            buf.segment.close()
            buf.segment.unlink()
        buf.segment = segment
        buf.header = Header(BufferState.EMPTY, rank=rank)

    def adopt(self) -> int:
        """Take over the segments a previous SMP of this node left, keeping only verified complete snapshots.

        Returns the number of complete snapshots adopted."""
        adopted = 0
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
            if buf.segment is not None:  # a crash between create and unlink left two generations
                older, buf.segment = sorted([buf.segment, Segment.open(name, populate=False)],
                                            key=lambda s: int(_NAME.search(s.name).group(3)))
                older.close()
                older.unlink()
            else:
                buf.segment = Segment.open(name, populate=False)
            buf.header = self._verified_header(rank, buf.segment)
            adopted += buf.header.state == BufferState.COMPLETE
        return adopted

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
        with memoryview(segment.buf) as mv:
            bad = header.bad_chunks(mv[HEADER_SIZE: HEADER_SIZE + header.payload_len])
        if bad:
            log.error("segment %s (rank %d step %d) fails its checksums in chunks %s; dropping it",
                      segment.name, rank, header.step, bad[:8])
            return Header(BufferState.EMPTY, rank=rank)
        return header

    def release(self, rank: int) -> int:
        """Unlink every buffer of `rank` and forget it; returns the bytes freed."""
        rb = self.ranks.pop(rank)
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

    def close(self, unlink_all: bool) -> None:
        for rb in self.ranks.values():
            for buf in rb.buffers:
                if buf.segment is not None:
                    buf.segment.close()
                    if unlink_all:
                        buf.segment.unlink()
                    buf.segment = None
