"""Byte layout of one snapshot buffer: the contract between a rank (writes the payload) and its SMP (writes
the header).

A buffer is one shared-memory segment::

    [ header: HEADER_SIZE bytes ][ payload: tensor bytes at planned offsets ... descriptor (msgpack) ]

The header records which step the payload holds, whether it is complete, and a CRC-32C per fixed-size chunk of
the payload. The descriptor at the end of the payload names every tensor range, so a segment is
self-describing: a restarted SMP, a peer or a disk writer can interpret it with nothing else.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass, field
from enum import IntEnum

import crc32c
import msgpack

HEADER_SIZE = 4096
ALIGN = 64
MAGIC = b"FTMEMSG1"
_FIXED = struct.Struct("<8sHHIIIqqQQQQ")  # magic, version, state, rank, world, n_chunks, step, epoch,
#                                           payload_len, desc_off, desc_len, chunk_size
_CRC = struct.Struct("<I")
_VERSION = 2  # 2: chunk checksums are CRC-32C
MAX_CHUNKS = (HEADER_SIZE - _FIXED.size - _CRC.size) // _CRC.size
MIN_CHUNK = 1 << 20


class LayoutError(ValueError):
    """A header or descriptor that cannot be trusted."""


class BufferState(IntEnum):
    EMPTY = 0
    WRITING = 1
    COMPLETE = 2


def align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def chunk_size_for(payload_len: int) -> int:
    """Smallest power-of-two multiple of 1 MiB that covers the payload with at most MAX_CHUNKS checksums."""
    size = MIN_CHUNK
    while size * MAX_CHUNKS < payload_len:
        size *= 2
    return size


def chunk_crcs(payload: memoryview, chunk_size: int) -> list[int]:
    """CRC-32C of each chunk: hardware-accelerated (~3x zlib's CRC-32 here) and computed with the GIL released,
    so it runs beside training."""
    return [crc32c.crc32c(payload[off : off + chunk_size]) for off in range(0, len(payload), chunk_size)]


@dataclass
class Header:
    state: BufferState
    rank: int = 0
    world: int = 0
    step: int = -1
    epoch: int = 0
    payload_len: int = 0
    desc_off: int = 0
    desc_len: int = 0
    chunk_size: int = MIN_CHUNK
    crcs: list[int] = field(default_factory=list)

    def pack(self) -> bytes:
        if len(self.crcs) > MAX_CHUNKS:
            raise LayoutError(f"{len(self.crcs)} checksums do not fit the header (max {MAX_CHUNKS})")
        body = _FIXED.pack(
            MAGIC, _VERSION, int(self.state), self.rank, self.world, len(self.crcs), self.step, self.epoch,
            self.payload_len, self.desc_off, self.desc_len, self.chunk_size,
        ) + struct.pack(f"<{len(self.crcs)}I", *self.crcs)
        return body + _CRC.pack(zlib.crc32(body))

    @classmethod
    def unpack(cls, buf: bytes | memoryview) -> "Header":
        """Parse a header; an unwritten, torn or foreign header is a LayoutError, never a wrong answer."""
        buf = bytes(buf[:HEADER_SIZE])
        magic, version, state, rank, world, n, step, epoch, plen, doff, dlen, csize = _FIXED.unpack_from(buf)
        if magic != MAGIC or version != _VERSION:
            raise LayoutError("not an ftmem snapshot buffer (bad magic or version)")
        if n > MAX_CHUNKS:
            raise LayoutError(f"header claims {n} checksums (max {MAX_CHUNKS})")
        end = _FIXED.size + 4 * n
        (stored,) = _CRC.unpack_from(buf, end)
        if zlib.crc32(buf[:end]) != stored:
            raise LayoutError("header checksum mismatch (torn or corrupted header)")
        crcs = list(struct.unpack_from(f"<{n}I", buf, _FIXED.size))
        return cls(BufferState(state), rank, world, step, epoch, plen, doff, dlen, csize, crcs)

    def bad_chunks(self, payload: memoryview) -> list[int]:
        """Indices of payload chunks whose bytes no longer match their checksum."""
        actual = chunk_crcs(payload[: self.payload_len], self.chunk_size)
        if len(actual) != len(self.crcs):
            return list(range(max(len(actual), len(self.crcs))))
        return [i for i, (a, b) in enumerate(zip(actual, self.crcs)) if a != b]

    def bad_chunks_in(self, buffer) -> list[int]:
        """`bad_chunks` of the payload stored after the header in `buffer` (a whole segment's bytes)."""
        with memoryview(buffer) as mv:
            return self.bad_chunks(mv[HEADER_SIZE: HEADER_SIZE + self.payload_len])


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor (or this rank's slice of it) lives in the payload.

    `global_shape`/`global_offset` describe the slice this rank owns of a larger logical tensor (a data-parallel
    shard or a DTensor's local shard); for an unsharded tensor they are its shape and zeros.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    global_shape: tuple[int, ...]
    global_offset: tuple[int, ...]

    def to_wire(self) -> tuple:
        return (self.name, self.dtype, self.shape, self.offset, self.nbytes, self.global_shape, self.global_offset)

    @classmethod
    def from_wire(cls, row: list) -> "TensorEntry":
        name, dtype, shape, offset, nbytes, gshape, goff = row
        return cls(name, dtype, tuple(shape), offset, nbytes, tuple(gshape), tuple(goff))


def pack_entries(entries: tuple[TensorEntry, ...]) -> bytes:
    return msgpack.packb([e.to_wire() for e in entries], use_bin_type=True)


@dataclass(frozen=True)
class Descriptor:
    """What a payload holds: its tensor ranges and the rank's encoded non-tensor state (`meta`)."""

    step: int
    epoch: int
    rank: int
    world: int
    entries: tuple[TensorEntry, ...]
    meta: bytes

    def pack(self, packed_entries: bytes | None = None) -> bytes:
        """msgpack map of the descriptor. `packed_entries` is `pack_entries(self.entries)` when the caller has it:
        a plan packs its entries once, since they are the same at every snapshot."""
        p = msgpack.Packer(use_bin_type=True)
        fields = {"v": 1, "step": self.step, "epoch": self.epoch, "rank": self.rank, "world": self.world}
        return b"".join([p.pack_map_header(len(fields) + 2), *(p.pack(k) + p.pack(v) for k, v in fields.items()),
                         p.pack("entries"), packed_entries or pack_entries(self.entries),
                         p.pack("meta"), p.pack(self.meta)])

    @classmethod
    def unpack(cls, data: bytes | memoryview) -> "Descriptor":
        try:
            doc = msgpack.unpackb(data, raw=False)
            return cls(doc["step"], doc["epoch"], doc["rank"], doc["world"],
                       tuple(TensorEntry.from_wire(r) for r in doc["entries"]), doc["meta"])
        except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
            raise LayoutError(f"unreadable snapshot descriptor: {exc}") from exc

    def entries_in(self, start: int, stop: int) -> list[str]:
        """Names of the tensors overlapping payload bytes [start, stop) (to name what a bad chunk hit)."""
        hit = [e.name for e in self.entries if e.nbytes and e.offset < stop and e.offset + e.nbytes > start]
        return hit or ["<snapshot descriptor>"]
