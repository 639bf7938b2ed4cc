"""Parity memory of one SMP: the protected step's parity (served to peers) and the round being computed."""

from __future__ import annotations

import threading

from ftmem.smp.shm import Segment, list_segments, unlink


class ParityStore:
    """Two shared-memory slots, allocated once and grown only when a round needs more."""

    def __init__(self, prefix: str) -> None:
        # parity left by a previous incarnation of this SMP is not re-adopted (what it was computed over died
        # with that process; the group leader re-protects the newest step instead): free its names and memory
        for stale in list_segments(f"{prefix}parity"):
            unlink(stale)
        self._prefix = prefix
        self._slots: list[Segment | None] = [None, None]
        self._steps: list[int | None] = [None, None]
        self._gen = 0
        self._lock = threading.Lock()

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

    def promote(self, step: int) -> None:
        with self._lock:
            for i, s in enumerate(self._steps):
                if s == -1 - step:
                    self._steps[i] = step
                elif s is not None and s >= 0 and s != step:
                    self._steps[i] = None

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
        self._slots = [None, None]
