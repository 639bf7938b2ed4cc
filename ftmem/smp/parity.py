"""Parity memory of one SMP: the protected step's parity (served to peers) and the round being computed.

A promoted slot is never written again (the next round takes the other one), so a record naming it, written
atomically at each promotion, lets a restarted SMP take the protected parity over instead of leaving its group
unprotected until the next round. Until then, the other slot still holds the step protected before, which a
group rebuilds at when a leader died announcing the newer one to only some nodes (see Cluster).
"""

from __future__ import annotations

import os
import re
import threading

import msgpack

from ftmem.smp.shm import Segment, list_segments, shm_dir, unlink

_GEN = re.compile(r"\.g(\d+)$")


class ParityStore:
    """Two shared-memory slots, allocated once and grown only when a round needs more."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._record = os.path.join(shm_dir(), f"{prefix}protected.meta")
        self._slots: list[Segment | None] = [None, None]
        self._steps: list[int | None] = [None, None]
        self._gen = 0
        self._lock = threading.Lock()
        self.adopted: tuple[int, bytes] | None = self._adopt()

    def _adopt(self) -> tuple[int, bytes] | None:
        """Take over the protected slot a previous incarnation of this SMP left: (step, group meta) of its
        record, or None. Every other parity segment (a round in progress when it died) is removed."""
        found = None
        try:
            with open(self._record, "rb") as f:
                name, step, meta = msgpack.unpackb(f.read(), raw=False)
            gen = _GEN.search(name) if name.startswith(f"{self._prefix}parity") else None
            if gen and type(step) is int and os.path.exists(os.path.join(shm_dir(), name)):
                self._slots[0], self._steps[0], found = Segment.open(name, populate=False), step, (step, bytes(meta))
                self._gen = int(gen.group(1))
        except (OSError, ValueError, TypeError, msgpack.UnpackException):
            found = None
        keep = self._slots[0].name if found else None
        for stale in list_segments(f"{self._prefix}parity"):
            if stale != keep:
                unlink(stale)
        if not found:
            self._forget_record()
        return found

    def drop_adopted(self) -> None:
        """The adopted parity does not match this node's data (its snapshots changed): free it."""
        with self._lock:
            if self._slots[0] is not None and self.adopted is not None:
                self._slots[0].close()
                self._slots[0].unlink()
                self._slots[0], self._steps[0] = None, None
            self.adopted = None
            self._forget_record()

    def _forget_record(self) -> None:
        try:
            os.unlink(self._record)
        except FileNotFoundError:
            pass

    def work(self, step: int, nbytes: int) -> Segment:
        """The slot not holding the protected step, sized for `nbytes`, claimed for `step`."""
        with self._lock:
            i = 1 if self._steps[0] is not None and self._steps[0] == self.protected_step else 0
            seg = self._slots[i]
            if seg is None or seg.size < max(nbytes, 1):
                self._gen += 1
                new = Segment.create(f"{self._prefix}parity{i}.g{self._gen}", max(nbytes, 4096))
                if seg is not None:
                    seg.close()
                    seg.unlink()
                self._slots[i] = seg = new
            self._steps[i] = -1 - step  # in progress: never served
            return seg

    @property
    def protected_step(self) -> int | None:
        valid = [s for s in self._steps if s is not None and s >= 0]
        return max(valid) if valid else None

    def promote(self, step: int, meta: bytes) -> None:
        """`step`'s round succeeded on the whole group: its slot becomes the protected one, recorded with `meta`
        (what it was computed over) for a restarted SMP. The other slot keeps the step protected before, readable
        until the next round claims it."""
        with self._lock:
            for i, s in enumerate(self._steps):
                if s == -1 - step:
                    self._steps[i] = step
                    tmp = f"{self._record}.tmp"
                    with open(tmp, "wb") as f:
                        f.write(msgpack.packb([self._slots[i].name, step, meta], use_bin_type=True))
                    os.replace(tmp, self._record)

    def read(self, step: int, offset: int, length: int) -> bytes:
        with self._lock:
            for seg, s in zip(self._slots, self._steps):
                if s == step and seg is not None:
                    return bytes(seg.buf[offset: offset + length])
        raise KeyError(f"no parity of step {step}")

    def write(self, seg: Segment, offset: int, data: bytes) -> None:
        seg.buf[offset: offset + len(data)] = data

    def nbytes(self) -> int:
        return sum(s.size for s in self._slots if s is not None)

    def close(self, unlink_all: bool) -> None:
        for seg in self._slots:
            if seg is not None:
                seg.close()
                if unlink_all:
                    seg.unlink()
        if unlink_all:
            self._forget_record()
        self._slots = [None, None]
