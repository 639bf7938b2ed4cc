"""Reed–Solomon over zfec: parity of equal-length blocks, and recovery of lost ones.

zfec's code is systematic: blocks 0..k-1 are the data unchanged, k..n-1 the parity. Its C core releases the GIL,
so these functions can run on a worker thread beside training. Inputs may be any C-contiguous buffer (bytes,
bytearray, memoryview, numpy); they are viewed, never copied, since a snapshot can be gigabytes. zfec trusts its
caller (duplicate or out-of-range block numbers, or unequal lengths, make it hang or return garbage), so every
argument is checked here first.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Union

import zfec

from ftmem.erasure.layout import StripeLayout

BytesLike = Union[bytes, bytearray, memoryview]


class NotEnoughBlocks(Exception):
    """Fewer than k blocks of a stripe survive: its lost blocks cannot be rebuilt from memory."""


@lru_cache(maxsize=64)
def _encoder(k: int, n: int) -> zfec.Encoder:
    return zfec.Encoder(k, n)


@lru_cache(maxsize=64)
def _decoder(k: int, n: int) -> zfec.Decoder:
    return zfec.Decoder(k, n)


def _check_kn(k: int, n: int) -> None:
    if not 1 <= k <= n <= 256:
        raise ValueError(f"need 1 <= k <= n <= 256, got k={k} n={n}")


def _view(buf: BytesLike) -> memoryview:
    """Flat byte view of ``buf``; copies only a non-contiguous buffer, which zfec cannot read."""
    view = memoryview(buf)
    if not view.c_contiguous:
        return memoryview(view.tobytes())
    if view.format != "B" or view.ndim != 1:
        return view.cast("B")
    return view


def _equal_length(views: Iterable[memoryview]) -> int:
    lengths = {v.nbytes for v in views}
    if len(lengths) > 1:
        raise ValueError(f"blocks must have equal length, got lengths {sorted(lengths)}")
    return lengths.pop() if lengths else 0


def pad(buf: BytesLike, size: int) -> BytesLike:
    """``buf`` zero-padded to ``size`` bytes; ``buf`` itself when already full length (the common case)."""
    length = memoryview(buf).nbytes
    if length == size:
        return buf
    if length > size:
        raise ValueError(f"block of {length} bytes is longer than {size}")
    out = bytearray(size)
    out[:length] = _view(buf)
    return out


def encode_parity(k: int, n: int, data: Sequence[BytesLike], which: Sequence[int]) -> list[bytes]:
    """Parity blocks ``which`` (indices 0..n-k-1, i.e. zfec blocks k+i) of ``k`` equal-length data blocks."""
    _check_kn(k, n)
    if len(data) != k:
        raise ValueError(f"need {k} data blocks, got {len(data)}")
    bad = [i for i in which if not 0 <= i < n - k]
    if bad:
        raise ValueError(f"parity indices {bad} out of range [0, {n - k})")
    if not which:
        return []
    views = tuple(_view(b) for b in data)
    _equal_length(views)
    return list(_encoder(k, n).encode(views, tuple(k + i for i in which)))


def _decode_data(k: int, n: int, blocks: Mapping[int, BytesLike]) -> list[BytesLike]:
    """The k data blocks from any k of ``blocks``; data blocks given are returned as given."""
    _check_kn(k, n)
    bad = [b for b in blocks if not 0 <= b < n]
    if bad:
        raise ValueError(f"block numbers {bad} out of range [0, {n})")
    if len(blocks) < k:
        raise NotEnoughBlocks(f"blocks {sorted(blocks)} of {n} available, {k} are needed")
    views = {b: _view(buf) for b, buf in blocks.items()}
    _equal_length(views.values())
    if all(i in blocks for i in range(k)):
        return [blocks[i] for i in range(k)]
    chosen = tuple(sorted(blocks)[:k])  # data blocks first: zfec passes them through and solves for fewer
    decoded = _decoder(k, n).decode(tuple(views[b] for b in chosen), chosen)
    return [blocks[i] if i in blocks else decoded[i] for i in range(k)]


def recover(k: int, n: int, blocks: Mapping[int, BytesLike]) -> list[BytesLike]:
    """All ``n`` blocks (data, then parity) from any ``k`` of them, keyed by zfec block number.

    Blocks given are returned as given (no copy); lost ones are rebuilt bit-exactly. Raises NotEnoughBlocks
    rather than guess when fewer than ``k`` are given.
    """
    data = _decode_data(k, n, blocks)
    lost = [i for i in range(n - k) if k + i not in blocks]
    rebuilt = dict(zip(lost, encode_parity(k, n, data, lost)))
    return data + [blocks[k + i] if k + i in blocks else rebuilt[i] for i in range(n - k)]


def rebuild_stripe(
    layout: StripeLayout,
    stripe: int,
    available: Mapping[int, BytesLike],
    want: Iterable[int] | None = None,
) -> dict[int, BytesLike]:
    """The block each member in ``want`` holds in ``stripe`` (default: every member not in ``available``).

    ``available`` maps group member -> what it holds in this stripe: its data chunk (may be short or empty; it is
    zero-padded here) or its parity block. A data member whose chunk lies past the end of its data need not be
    fetched: it is known to be zeros. Returned data chunks are padded to ``chunk_size``; trim them with
    ``layout.data_chunk``. Encoding is the special case of all data members available and ``want`` = the
    parity members whose blocks are needed.
    """
    size = layout.chunk_size
    k, n = layout.k, layout.n
    blocks: dict[int, BytesLike] = {}
    zeros: bytes | None = None
    for m in layout.data_members(stripe):
        if m not in available and layout.data_chunk(stripe, m)[1] == 0:
            zeros = zeros or bytes(size)
            blocks[layout.block_number(stripe, m)] = zeros
    for m, buf in available.items():
        blocks[layout.block_number(stripe, m)] = pad(buf, size)
    targets = [m for m in range(n) if m not in available] if want is None else list(want)
    number = {m: layout.block_number(stripe, m) for m in targets}
    if all(b in blocks for b in number.values()):
        return {m: blocks[b] for m, b in number.items()}
    try:
        data = _decode_data(k, n, blocks)
    except NotEnoughBlocks as exc:
        raise NotEnoughBlocks(
            f"stripe {stripe}: members {sorted(available)} of {n} available, "
            f"{k} blocks are needed to rebuild members {targets} ({exc})"
        ) from None
    lost = sorted({b - k for b in number.values() if b >= k and b not in blocks})
    parity = dict(zip(lost, encode_parity(k, n, data, lost)))
    return {m: blocks[b] if b in blocks else data[b] if b < k else parity[b - k] for m, b in number.items()}
