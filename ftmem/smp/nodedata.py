"""A node's data for one step, as the erasure code sees it: the payloads of the ranks it holds, in rank order,
concatenated (virtually: reads and writes go straight to each rank's buffer)."""

from __future__ import annotations

from dataclasses import dataclass

from ftmem.smp.buffers import Buffer
from ftmem.smp.layout import HEADER_SIZE


@dataclass(frozen=True)
class Part:
    rank: int
    buffer: Buffer
    length: int


class NodeData:
    def __init__(self, parts: list[Part]) -> None:
        self.parts = sorted(parts, key=lambda p: p.rank)
        self.size = sum(p.length for p in self.parts)

    def _spans(self, offset: int, length: int):
        """(part, offset in its payload, count, offset in the request) covering [offset, offset+length)."""
        start = 0
        for part in self.parts:
            lo, hi = max(offset, start), min(offset + length, start + part.length)
            if lo < hi:
                yield part, lo - start, hi - lo, lo - offset
            start += part.length

    def read(self, offset: int, length: int) -> bytes | memoryview:
        """Bytes [offset, offset+length) clipped to the data (a chunk past the end reads short).

        A range inside one rank's payload (the common case) is a view of its shared memory, not a copy: a peer
        reply is signed and sent straight from it. The bytes it carries are those the MAC was computed over at
        the time of the reply (on the event loop, while the buffer held the step); should the buffer be rewritten
        while zmq still sends them, the requester sees a reply that fails authentication and drops the request
        (`PeerLink.result`), never a mix of two steps."""
        length = max(0, min(length, self.size - offset))
        spans = list(self._spans(offset, length))
        if len(spans) == 1 and spans[0][2] == length:
            part, off, count, _ = spans[0]
            return memoryview(part.buffer.segment.buf)[HEADER_SIZE + off: HEADER_SIZE + off + count]
        out = bytearray(length)
        for part, off, count, at in spans:
            base = HEADER_SIZE + off
            out[at: at + count] = part.buffer.segment.buf[base: base + count]
        return bytes(out)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        for part, off, count, at in self._spans(offset, len(data)):
            base = HEADER_SIZE + off
            part.buffer.segment.buf[base: base + count] = data[at: at + count]
