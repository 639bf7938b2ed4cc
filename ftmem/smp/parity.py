"""Parity memory of one SMP: the parity of the protected steps this node keeps, and of the round being computed.

Two shared-memory slots, allocated once and grown only when a round needs more. A slot holds either a kept
step's parity (served to peers that rebuild a member) or a round in progress (never served). Which steps are
kept is the Cluster's decision (`retain`): the protected one and, until the next round starts, the one before.
A kept slot is never written again, so a record naming the kept slots, rewritten atomically whenever they
change, lets a restarted SMP take them over instead of leaving its group unprotected until the next round.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Collection

import msgpack

from ftmem.log import get_logger
from ftmem.smp.shm import Segment, list_segments, shm_dir, unlink

log = get_logger("smp")
_GEN = re.compile(r"\.g(\d+)$")


class ParityStore:
    """Two parity slots of one SMP; `adopted` is what a previous incarnation left kept, newest first."""

    def __init__(self, prefix: str) -> None:
        self._prefix = prefix
        self._record = os.path.join(shm_dir(), f"{prefix}protected.meta")
        self._slots: list[Segment | None] = [None, None]
        self._kept: list[tuple[int, bytes] | None] = [None, None]  # (step, group meta) of a kept slot
        self._work: list[int | None] = [None, None]                # the step a slot is being computed for
        self._gen = 0
        self._lock = threading.Lock()
        self.adopted: list[tuple[int, bytes]] = self._adopt()

    def _adopt(self) -> list[tuple[int, bytes]]:
        """Take over the kept slots the record of a previous incarnation names; every other parity segment (a
        round in progress when it died) is removed."""
        try:
            with open(self._record, "rb") as f:
                entries = msgpack.unpackb(f.read(), raw=False)
            for i, (name, step, meta) in enumerate(entries[:2]):
                gen = _GEN.search(name) if name.startswith(f"{self._prefix}parity") else None
                if gen and type(step) is int and os.path.exists(os.path.join(shm_dir(), name)):
                    self._slots[i], self._kept[i] = Segment.open(name, populate=False), (step, bytes(meta))
                    self._gen = max(self._gen, int(gen.group(1)))
        except FileNotFoundError:
            pass
        except (OSError, ValueError, TypeError, msgpack.UnpackException) as exc:
            log.warning("ignoring the parity record %s: %s", self._record, exc)
            self._slots, self._kept = [None, None], [None, None]
        keep = {seg.name for seg in self._slots if seg is not None}
        for stale in list_segments(f"{self._prefix}parity"):
            if stale not in keep:
                unlink(stale)
        self._write_record()
        return sorted((k for k in self._kept if k is not None), reverse=True)

    def _write_record(self) -> None:
        """Name the kept slots for a restarted SMP; without a record (it cannot be written: /dev/shm is full) a
        restart only loses the parity, never uses a wrong one."""
        entries = [[seg.name, *kept] for seg, kept in zip(self._slots, self._kept)
                   if seg is not None and kept is not None]
        try:
            if not entries:
                os.unlink(self._record)
                return
            tmp = f"{self._record}.tmp"
            with open(tmp, "wb") as f:
                f.write(msgpack.packb(entries, use_bin_type=True))
            os.replace(tmp, self._record)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot record the kept parity (%s); a restarted SMP will not take it over", exc)
            try:
                os.unlink(self._record)
            except OSError:
                pass

    def kept_steps(self) -> list[int]:
        with self._lock:
            return sorted((k[0] for k in self._kept if k is not None), reverse=True)

    def retain(self, steps: Collection[int]) -> None:
        """Keep only the parity of `steps`; the other slot becomes free for the next round (still allocated)."""
        with self._lock:
            changed = False
            for i, kept in enumerate(self._kept):
                if kept is not None and kept[0] not in steps:
                    self._kept[i], changed = None, True
            if changed:
                self._write_record()

    def work(self, step: int, nbytes: int) -> Segment:
        """A slot that holds no kept step, sized for `nbytes`, claimed for computing `step`'s parity."""
        with self._lock:
            free = [i for i in (0, 1) if self._kept[i] is None]
            if not free:
                raise RuntimeError(f"no free parity slot for step {step}: both hold kept steps "
                                   f"{[k[0] for k in self._kept if k is not None]}")
            i = free[0]
            seg = self._slots[i]
            if seg is None or seg.size < max(nbytes, 1):
                self._gen += 1
                new = Segment.create(f"{self._prefix}parity{i}.g{self._gen}", max(nbytes, 4096))
                if seg is not None:
                    seg.close()
                    seg.unlink()
                self._slots[i] = seg = new
            self._work = [None, None]  # one round at a time: an earlier claim (a failed round) is void
            self._work[i] = step
            return seg

    def promote(self, step: int, meta: bytes) -> None:
        """`step`'s parity is complete and protected: its slot is kept, recorded with `meta` (what it was computed
        over). The other slot's kept step stays until the Cluster no longer `retain`s it, unless it is the same
        step (protected again, e.g. after a member restarted): the new parity replaces it."""
        with self._lock:
            for i, s in enumerate(self._work):
                if s == step:
                    self._work[i], self._kept[i] = None, (step, meta)
                    if self._kept[1 - i] is not None and self._kept[1 - i][0] == step:
                        self._kept[1 - i] = None
                    self._write_record()

    def read(self, step: int, offset: int, length: int) -> memoryview:
        """A view of `step`'s parity (served without a copy, like snapshot data: see `NodeData.read`)."""
        with self._lock:
            for seg, kept in zip(self._slots, self._kept):
                if kept is not None and kept[0] == step and seg is not None:
                    return memoryview(seg.buf)[offset: offset + length]
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
            self._kept = [None, None]
            self._write_record()
        self._slots = [None, None]
