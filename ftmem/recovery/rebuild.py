"""Rebuilding a lost node's snapshot from its erasure-coding group, and fetching a moved rank's snapshot.

A replacement node (same node id, empty memory) asks its group for the newest protected step, then rebuilds
every block it held (its ranks' payloads and its parity) bit-exactly from any k surviving blocks per stripe.
The payload checksums recorded at commit time are verified before the SMP lets its ranks restore.
"""

from __future__ import annotations

from typing import Callable

from ftmem.erasure import NotEnoughBlocks, rebuild_stripe
from ftmem.log import get_logger
from ftmem.smp.layout import Header
from ftmem.smp.nodedata import NodeData
from ftmem.smp.parity import ParityStore
from ftmem.smp.peer import PeerLink
from ftmem.smp.protect import BATCH_BYTES, GroupMeta, collect, pipelined, submit_ranges

log = get_logger("smp")


class RebuildError(RuntimeError):
    """The group cannot rebuild this node (more than f members lost, or peers unreachable).

    `silent`: members that answered when the rebuild began and then stopped (their SMP died or hung), as opposed
    to members that were gone from the start or refused (they hold nothing of the step). An SMP that died is
    restarted by its node's launcher with its memory intact, so a rebuild that failed only for them may succeed
    once they are back."""

    def __init__(self, message: str, silent: tuple[int, ...] = ()) -> None:
        super().__init__(message)
        self.silent = silent


def newest_protected(members: tuple[int, ...], node: int, link_to: Callable[[int], PeerLink | None],
                     timeout: float, job_kept: set[int] | None = None) -> GroupMeta | None:
    """The newest protected step, including this node, that every live group member that answers keeps (each
    keeps its protected step and, until the next round, the one before: a leader that died announcing a step
    may have told only some of them), and among those one that the other nodes of the job keep too
    (`job_kept`, from their reports: the leader tells the groups one after another, and every rank must find
    the restored step). Without such a step, the newest any of them keeps: its rebuild then names what is
    missing."""
    kept: list[dict[int, GroupMeta]] = []
    silent = []
    for m in members:
        link = link_to(m) if m != node else None
        if link is None:
            if m != node:
                silent.append(m)
            continue
        try:
            _, blobs = link.request("ec_status", timeout)
        except (TimeoutError, RuntimeError):
            silent.append(m)
            continue
        metas = {meta.step: meta for meta in map(GroupMeta.unpack, blobs) if node in meta.members}
        if metas:
            kept.append(metas)
    if not kept:
        if len(silent) == len(members) - 1:
            log.warning("no member of EC group %s answered; with nothing to rebuild from, node %d starts empty "
                        "(its ranks cannot restore a step the group protected meanwhile)", list(members), node)
        return None
    newest = max(s for metas in kept for s in metas)
    common = set.intersection(*(set(metas) for metas in kept))
    step = max(common & job_kept or common, default=newest) if job_kept is not None else max(common, default=newest)
    if step < newest:
        log.info("rebuilding at step %d, the newest that every surviving group member keeps%s", step,
                 " and the job's other nodes too" if job_kept is not None and step in job_kept else "")
    return next(metas[step] for metas in kept if step in metas)


def rebuild_node(meta: GroupMeta, node: int, data: NodeData, parity: ParityStore,
                 link_to: Callable[[int], PeerLink | None], timeout: float) -> None:
    """Fill `data` (this node's rank buffers, already sized) and a parity slot for `meta.step`."""
    layout, me = meta.layout, meta.members.index(node)
    seg = parity.work(meta.step, layout.parity_bytes(me))
    links = {i: link_to(m) for i, m in enumerate(meta.members) if m != node}
    alive = {i: link for i, link in links.items() if link is not None}
    silent: list[int] = []  # members that stopped answering mid-way (see RebuildError)
    mine = sorted(set(layout.data_stripes(me)) | set(layout.parity_stripes(me)))
    per_batch = max(1, BATCH_BYTES // layout.chunk_size)  # each member sends at most one chunk per stripe

    def request(batch: list[int]) -> dict:
        inflight = {}  # every member's requests go out before any reply is awaited, so they serve in parallel
        for i, link in alive.items():
            data_items = [(t, layout.data_chunk(t, i)) for t in batch if i in layout.data_members(t)]
            par_items = [t for t in batch if i in layout.parity_members(t)]
            inflight[i] = (data_items, submit_ranges(link, meta.step, [rng for _, rng in data_items]),
                           par_items, link.submit("parity", step=meta.step,
                                                  slots=[layout.parity_slot(t, i) for t in par_items])
                           if par_items else None)
        return inflight

    def gather(inflight: dict) -> dict[int, dict[int, bytes]]:
        blocks: dict[int, dict[int, bytes]] = {}
        for i, (data_items, data_reqs, par_items, par_req) in inflight.items():
            if i not in alive:  # failed on an earlier batch
                continue
            try:
                for (t, _), b in zip(data_items, collect(alive[i], data_reqs, timeout)):
                    blocks.setdefault(t, {})[i] = b
                if par_req is not None:
                    for t, b in zip(par_items, alive[i].result(par_req, timeout)[1]):
                        blocks.setdefault(t, {})[i] = b
            except (TimeoutError, RuntimeError) as exc:
                del alive[i]  # lost during the rebuild, or no longer holding the step: the others may suffice
                if isinstance(exc, TimeoutError):
                    silent.append(meta.members[i])
                log.warning("rebuild of step %d goes on without node %d: %s", meta.step, meta.members[i], exc)
        return blocks

    def code(batch: list[int], blocks: dict[int, dict[int, bytes]]) -> None:
        for t in batch:
            try:
                block = rebuild_stripe(layout, t, blocks.get(t, {}), want=[me])[me]
            except NotEnoughBlocks as exc:
                lost = [m for i, m in enumerate(meta.members) if i not in blocks.get(t, {}) and m != node]
                raise RebuildError(f"cannot rebuild node {node}'s snapshot of step {meta.step}: group members "
                                   f"{lost} are unavailable too, more than f={meta.f} lost ({exc})",
                                   tuple(silent)) from exc
            if me in layout.data_members(t):
                off, length = layout.data_chunk(t, me)
                data.write(off, memoryview(block)[:length])
            else:
                parity.write(seg, layout.parity_slot(t, me) * layout.chunk_size, block)

    pipelined([mine[i: i + per_batch] for i in range(0, len(mine), per_batch)], request, gather, code)


def verify(data: NodeData, headers: dict[int, Header]) -> list[str]:
    """Problems found checking rebuilt payloads against their commit-time checksums (empty when all good)."""
    problems = []
    for part in data.parts:
        bad = headers[part.rank].bad_chunks_in(part.buffer.segment.buf)
        if bad:
            problems.append(f"rank {part.rank}: chunks {bad[:8]} fail their checksums")
    return problems


def fetch_payload(link: PeerLink, rank: int, step: int, length: int, write: Callable[[int, bytes], None],
                  timeout: float) -> None:
    """Copy a rank's payload of `step` from the peer holding it, in frame-sized pieces."""
    for off in range(0, length, BATCH_BYTES):
        count = min(BATCH_BYTES, length - off)
        _, blobs = link.request("payload", timeout, rank=rank, step=step, offset=off, length=count)
        write(off, blobs[0])
