"""Rank-side restore: agree with every other rank on one step, then load this rank's part of it.

Agreement needs no coordinator: each rank lists the (step, epoch) snapshots its SMP can produce for it, the
lists are all-gathered, and every rank picks the newest snapshot present on all lists. A snapshot complete on
every rank is by definition committed. Each restore starts a new epoch, so completions left over from the
abandoned timeline (steps after the restored one) can never be mixed with new ones.

Each phase ends in a collective that also carries failures, so one rank's error stops every rank with a clear
message instead of leaving the others blocked in a collective. The collectives run on a gloo group of their own,
bounded by ftmem's timeout (not the default group's: gloo's is 30 minutes, and NCCL's would need a GPU), so a
rank that never reaches restore() (stopped, hung) fails the others with an error instead of a long hang.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Callable, Mapping, TypeVar

import torch
import torch.distributed as dist

from ftmem.log import get_logger
from ftmem.smp.layout import HEADER_SIZE, BufferState, Descriptor, Header, LayoutError, TensorEntry
from ftmem.smp.protocol import ControlClient
from ftmem.smp.shm import Segment
from ftmem.snapshot.capture import Stateful, apply_snapshot

log = get_logger("restore")
T = TypeVar("T")
MAX_CANDIDATES = 16


class CorruptSnapshotError(RuntimeError):
    """Bytes of a snapshot no longer match their checksums."""


class RestoreError(RuntimeError):
    """Some rank could not restore; raised on every rank."""


@dataclass(frozen=True)
class RestoreResult:
    step: int | None
    epoch: int
    source: str
    nbytes: int
    seconds: float

    @property
    def next_step(self) -> int:
        return 0 if self.step is None else self.step + 1


class _Ranks:
    """The restore's collectives over every rank: a gloo group whose operations fail after `timeout` (twice
    ftmem's: a rank may wait that long for its SMP, e.g. for a rebuild, before it joins)."""

    def __init__(self, rank: int, world: int, timeout: float) -> None:
        self.rank, self.world, self.timeout = rank, world, 2 * timeout
        self.group = None
        if world > 1:
            if not dist.is_initialized():
                raise RestoreError("ftmem: restore() with WORLD_SIZE > 1 needs torch.distributed initialized "
                                   "(call dist.init_process_group first)")
            self.group = self._bounded(lambda: dist.new_group(backend="gloo", timeout=timedelta(seconds=self.timeout)))

    def all_gather(self, row: torch.Tensor) -> list[torch.Tensor]:
        if self.group is None:
            return [row]
        rows = [torch.empty_like(row) for _ in range(self.world)]
        self._bounded(lambda: dist.all_gather(rows, row, group=self.group))
        return rows

    def _bounded(self, collective: Callable[[], T]) -> T:
        try:
            return collective()
        except RuntimeError as exc:  # gloo's timeout, or a peer that died meanwhile
            raise RestoreError(f"ftmem: rank {self.rank}: not every rank took part in restore() within "
                               f"{self.timeout:.0f}s (a rank stopped, hung or died before restoring?): "
                               f"{str(exc).splitlines()[0]}") from exc


def _agree(local: tuple[int, list[list[int]], int] | str, ranks: _Ranks,
           lost: str = "") -> tuple[tuple[int, int] | None, int]:
    """Return the newest (step, epoch) on every rank's list and the new epoch; `local` is (epoch, snapshots,
    the world size that took them) or an error string when this rank failed before agreement; `lost` is what this
    rank's SMP knows about data it could not rebuild."""
    row = torch.full((3 + 2 * MAX_CANDIDATES,), -1, dtype=torch.int64)
    if isinstance(local, str):
        row[1] = -2
    else:
        epoch, steps, taken_by = local
        steps = steps[:MAX_CANDIDATES]
        row[0], row[1], row[2] = epoch, len(steps), taken_by
        for i, (s, e) in enumerate(steps):
            row[3 + 2 * i], row[4 + 2 * i] = s, e
    rows = ranks.all_gather(row)
    failed = [r for r, x in enumerate(rows) if int(x[1]) == -2]
    if failed:
        detail = local if isinstance(local, str) else "see the log of the failed ranks"
        raise RestoreError(f"ftmem: restore failed on rank(s) {failed}: {detail}")
    lists = [{(int(x[3 + 2 * i]), int(x[4 + 2 * i])) for i in range(int(x[1]))} for x in rows]
    other = sorted({int(x[2]) for x in rows} - {0, ranks.world})
    if other:
        newest = max((s for snaps in lists for s, _ in snaps), default=None)
        raise RestoreError(f"ftmem: the snapshots in memory{'' if newest is None else f' (up to step {newest})'} were "
                           f"taken by a world of {other[0]} ranks, and this job has {ranks.world} (did an elastic "
                           f"re-rendezvous change the node count?). ftmem restores a snapshot only into the world "
                           f"size that took it: restart with {other[0]} ranks, or remove them ('ftmem clean') to "
                           f"start over.")
    common = set.intersection(*lists)
    if not common and any(lists):
        empty = [r for r, snaps in enumerate(lists) if not snaps]
        newest = max(s for snaps in lists for s, _ in snaps)
        what = (f"{len(empty)} rank(s) hold none ({empty[:16]}{' ...' if len(empty) > 16 else ''})" if empty else
                "the ranks hold no step in common")
        why = (f"This node's SMP could not rebuild its snapshot: {lost.rstrip('.')}." if lost else
               "More failures than the erasure code tolerates, or stale memory of another run with this job id "
               "('ftmem clean').")
        raise RestoreError(f"ftmem: no snapshot is restorable on every rank: {what}, the newest any holds is step "
                           f"{newest}. {why} Refusing to restart from scratch silently.")
    best = max(common) if common else None
    return best, max(int(x[0]) for x in rows) + 1


def _agree_ok(error: str | None, ranks: _Ranks) -> None:
    row = torch.tensor([0 if error is None else 1], dtype=torch.int64)
    failed = [r for r, x in enumerate(ranks.all_gather(row)) if int(x[0])]
    if failed:
        raise RestoreError(f"ftmem: restore failed on rank(s) {failed}: {error or 'see the log of those ranks'}")


def _checked_dtype(e: TensorEntry, payload_len: int, what: str) -> torch.dtype:
    """The entry's dtype, once its range and size are consistent: a descriptor that passed its checksums can still
    be wrong (a writer's bug), and a view that fails halfway would leave the segment unclosable."""
    dtype = getattr(torch, e.dtype, None) if isinstance(e.dtype, str) else None
    if not isinstance(dtype, torch.dtype):
        raise CorruptSnapshotError(f"ftmem: {what} is corrupt: tensor {e.name!r} has no dtype {e.dtype!r}")
    if not all(type(d) is int and d >= 0 for d in e.shape) or e.nbytes != math.prod(e.shape) * dtype.itemsize:
        raise CorruptSnapshotError(f"ftmem: {what} is corrupt: tensor {e.name!r} of shape {e.shape} and {dtype} "
                                   f"cannot fill {e.nbytes} bytes")
    if not (type(e.offset) is int and 0 <= e.offset and e.offset + e.nbytes <= payload_len):
        raise CorruptSnapshotError(f"ftmem: {what} is corrupt: tensor {e.name!r} at offset {e.offset} "
                                   f"({e.nbytes} bytes) lies outside the {payload_len}-byte payload")
    return dtype


def load_segment(name: str, rank: int, step: int) -> tuple[dict[str, torch.Tensor], bytes, int]:
    """Verify and read one rank's snapshot from a shared-memory buffer: (tensors, meta, payload bytes)."""
    seg = Segment.open(name, populate=False)
    try:
        header = Header.unpack(seg.buf[:HEADER_SIZE])
        if header.state != BufferState.COMPLETE or header.step != step or header.rank != rank:
            raise CorruptSnapshotError(f"ftmem: buffer {name} holds step {header.step} of rank {header.rank} "
                                       f"({header.state.name}), not step {step} of rank {rank}")
        # Checksums first: a damaged descriptor may not even decode, and that too is corruption (the SMP must hear
        # of it). Every view is released on every way out, or seg.close() fails (BufferError) and hides the error.
        with memoryview(seg.buf) as mv, mv[HEADER_SIZE: HEADER_SIZE + header.payload_len] as payload:
            bad = header.bad_chunks(payload)
            with payload[header.desc_off: header.desc_off + header.desc_len] as raw:
                try:
                    desc = Descriptor.unpack(raw)
                except LayoutError as exc:
                    why = f"checksum mismatch in {len(bad)} chunk(s); {exc}" if bad else exc
                    raise CorruptSnapshotError(f"ftmem: snapshot of step {step} for rank {rank} is corrupt: "
                                               f"{why}") from exc
        if bad:
            hit = sorted({n for i in bad for n in desc.entries_in(i * header.chunk_size, (i + 1) * header.chunk_size)})
            raise CorruptSnapshotError(f"ftmem: snapshot of step {step} for rank {rank} is corrupt: checksum "
                                       f"mismatch in {len(bad)} chunk(s) covering {', '.join(hit)}")
        tensors = {}
        for e in desc.entries:
            dtype = _checked_dtype(e, header.payload_len, f"snapshot of step {step} for rank {rank}")
            if e.nbytes:
                view = torch.frombuffer(seg.buf, dtype=torch.uint8, count=e.nbytes, offset=HEADER_SIZE + e.offset)
                tensors[e.name] = view.view(dtype).view(e.shape).clone()
                del view
            else:
                tensors[e.name] = torch.empty(e.shape, dtype=dtype)
        return tensors, desc.meta, header.payload_len
    finally:
        seg.close()


def restore_rank(client: ControlClient, rank: int, world: int, local_rank: int, model: torch.nn.Module,
                 optimizer: torch.optim.Optimizer, extra: Mapping[str, Stateful]) -> RestoreResult:
    start = time.perf_counter()
    local: tuple[int, list[list[int]], int] | str
    lost = ""
    try:
        client.call("register", rank=rank, world=world, local_rank=local_rank, pid=os.getpid())
        reply = client.call("available", rank=rank)
        local, lost = (reply["epoch"], reply["steps"], reply["world"]), reply["lost"]
    except Exception as exc:  # reported to every rank by _agree
        local = f"{type(exc).__name__}: {exc}"
    ranks = _Ranks(rank, world, client.timeout)
    chosen, epoch = _agree(local, ranks, lost)
    error, source, nbytes = None, "none", 0
    try:
        step = -1 if chosen is None else chosen[0]
        while True:
            reply = client.call("begin", rank=rank, step=step, epoch=epoch)
            if chosen is None:
                break
            source = reply["source"]
            try:
                tensors, meta, nbytes = load_segment(reply["segment"], rank, step)
                break
            except CorruptSnapshotError as exc:
                log.error("%s", exc)
                if not client.call("corrupt", rank=rank, step=step, detail=str(exc))["retry"]:
                    raise
        if chosen is not None:
            apply_snapshot(tensors, meta, model, optimizer, extra)
    except Exception as exc:
        error = f"{type(exc).__name__}: {exc}"
        log.error("rank %d could not restore: %s", rank, error)
    _agree_ok(error, ranks)
    result = RestoreResult(None if chosen is None else chosen[0], epoch, source, nbytes,
                           time.perf_counter() - start)
    if chosen is None:
        log.info("rank %d: no snapshot to restore, starting at step 0", rank)
    else:
        log.info("rank %d restored step %d from %s: %d bytes in %.3fs", rank, result.step, source, nbytes,
                 result.seconds)
    return result
