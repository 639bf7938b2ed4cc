"""One erasure-coding round on a group member: compute this node's parity blocks for a committed step.

Runs on the SMP's worker thread (and its coder threads), never on the training path. Data is pulled from the
other members (no node holds parity for data it holds) over the peer protocol in batches of stripes, so memory
stays bounded and every read of a snapshot buffer is served by its owner's event loop, serialized with buffer
reuse.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable, Sequence, TypeVar

import msgpack

from ftmem.faults import fault_point
from ftmem.erasure import StripeLayout, choose_chunk_size, encode_parity, pad
from ftmem.smp.parity import ParityStore
from ftmem.smp.peer import PeerLink

BATCH_BYTES = 16 << 20  # per request: bounds the serving event loop's pause and the memory in flight
CODERS = 2  # batches a round codes at once (see `pipelined`)
B, R, G = TypeVar("B"), TypeVar("R"), TypeVar("G")


@dataclass(frozen=True)
class GroupMeta:
    """What a protected step's parity was computed over; every member keeps it to rebuild any other member."""

    step: int
    n: int
    f: int
    chunk: int
    members: tuple[int, ...]
    manifests: tuple[tuple[tuple[int, int, bytes], ...], ...]  # per member: (rank, payload_len, header)

    @property
    def layout(self) -> StripeLayout:
        sizes = tuple(sum(length for _, length, _ in m) for m in self.manifests)
        return StripeLayout(self.n, self.f, self.chunk, sizes)

    def pack(self) -> bytes:
        return msgpack.packb([self.step, self.n, self.f, self.chunk, list(self.members),
                              [[list(r) for r in m] for m in self.manifests]], use_bin_type=True)

    @classmethod
    def unpack(cls, data: bytes) -> "GroupMeta":
        step, n, f, chunk, members, manifests = msgpack.unpackb(data, raw=False)
        return cls(step, n, f, chunk, tuple(members),
                   tuple(tuple((r, length, bytes(h)) for r, length, h in m) for m in manifests))


def fetch_manifest(link: PeerLink, step: int, timeout: float) -> tuple[tuple[int, int, bytes], ...]:
    _, blobs = link.request("manifest", timeout, step=step)
    return tuple((r, length, bytes(h)) for r, length, h in msgpack.unpackb(blobs[0], raw=False))


def submit_ranges(link: PeerLink, step: int, ranges: list[tuple[int, int]]) -> list[tuple[int, str]]:
    """Ask a member for [offset, length) ranges of its data for `step`, in requests under the frame limit;
    `collect` gathers the replies. Requests in flight let the member read and sign while this node encodes."""
    requests, batch, size = [], [], 0
    for off, length in [*ranges, (0, -1)]:
        if batch and (length < 0 or size + length > BATCH_BYTES):
            requests.append(link.submit("data", step=step, ranges=batch))
            batch, size = [], 0
        if length >= 0:
            batch.append([off, length])
            size += length
    return requests


def collect(link: PeerLink, requests: list[tuple[int, str]], timeout: float) -> list[bytes]:
    return [block for req in requests for block in link.result(req, timeout)[1]]


def pipelined(batches: Sequence[B], request: Callable[[B], R], gather: Callable[[R], G],
              code: Callable[[B, G], None], coders: int = CODERS) -> None:
    """For each batch: `request` its blocks from peers, `gather` the replies, `code` them (zfec, then writes).

    The stages overlap: up to `coders` batches are coded at once, each on a thread of its own (zfec releases
    the GIL), while the replies of the next batch are received and verified here and the one after it is
    already requested, so the peers serve it meanwhile. Coding is the slowest stage, and a second coder uses
    the core the other stages leave idle; the round then takes about as long as its coding, not the sum of the
    stages. Memory in flight stays `coders` + 2 batches. Batches are coded in order of submission but may
    finish out of order (each writes its own stripes)."""
    if not batches:
        return
    with ThreadPoolExecutor(coders, thread_name_prefix="ftmem-coder") as pool:
        coding: deque[Future] = deque()
        inflight = deque([request(batches[0])])
        for i, batch in enumerate(batches):
            if i + 1 < len(batches):
                inflight.append(request(batches[i + 1]))
            got = gather(inflight.popleft())
            while len(coding) >= coders:
                coding.popleft().result()
            coding.append(pool.submit(code, batch, got))
        for done in coding:
            done.result()


def encode_round(step: int, node: int, members: tuple[int, ...], f: int,
                 link_to: Callable[[int], PeerLink | None], parity: ParityStore, timeout: float,
                 aborted: Callable[[], bool]) -> GroupMeta:
    """Compute and store this node's parity for `step`; raise if any member no longer holds the step."""

    def link(m: int) -> PeerLink:
        found = link_to(m)
        if found is None:
            raise RuntimeError(f"EC group member node {m} is gone")
        return found

    manifests = tuple(fetch_manifest(link(m), step, timeout) for m in members)
    n, k = len(members), len(members) - f
    sizes = [sum(length for _, length, _ in m) for m in manifests]
    meta = GroupMeta(step, n, f, choose_chunk_size(max(sizes), k), members, manifests)
    layout, me = meta.layout, members.index(node)
    seg = parity.work(step, layout.parity_bytes(me))
    stripes = layout.parity_stripes(me)
    per_batch = max(1, BATCH_BYTES // layout.chunk_size)  # each member sends at most one chunk per stripe

    def request(batch: list[int]) -> dict[int, tuple[PeerLink, list[int], list[tuple[int, str]]]]:
        inflight = {}
        for d in range(n):
            items = [t for t in batch if d in layout.data_members(t)]
            if items:
                peer = link(members[d])
                inflight[d] = (peer, items, submit_ranges(peer, step, [layout.data_chunk(t, d) for t in items]))
        return inflight

    def gather(inflight) -> dict[tuple[int, int], bytes]:
        chunks = {}
        for d, (peer, items, requests) in inflight.items():
            chunks.update({(t, d): block for t, block in zip(items, collect(peer, requests, timeout))})
        if aborted():
            raise RuntimeError(f"round of step {step} aborted: a local buffer was reused")
        return chunks

    def code(batch: list[int], chunks: dict[tuple[int, int], bytes]) -> None:
        for t in batch:
            blocks = [pad(chunks[(t, d)], layout.chunk_size) for d in layout.data_members(t)]
            (block,) = encode_parity(k, n, blocks, [layout.parity_index(t, me)])
            parity.write(seg, layout.parity_slot(t, me) * layout.chunk_size, block)
        fault_point("smp_mid_encode", step)

    pipelined([stripes[i: i + per_batch] for i in range(0, len(stripes), per_batch)], request, gather, code)
    return meta
