"""Erasure layout and codec: every loss the code promises to survive is rebuilt bit-exactly, and every loss it
cannot survive is refused rather than answered with wrong bytes."""

from __future__ import annotations

import itertools
import random
import re

import numpy as np
import pytest
import zfec

from ftmem.erasure import (
    ErasureConfigError,
    NotEnoughBlocks,
    StripeLayout,
    check_config,
    choose_chunk_size,
    default_group_size,
    encode_parity,
    group_members,
    pad,
    rebuild_stripe,
    recover,
)

CONFIGS = [(n, f) for n in range(2, 7) for f in range(1, n)]


def size_vectors(n: int, chunk: int) -> list[tuple[int, ...]]:
    """Equal, ragged, zero, unaligned and one-giant member sizes."""
    rng = random.Random(n * 1000 + chunk)
    return [
        tuple([3 * chunk] * n),
        tuple(rng.randrange(0, 4 * chunk) for _ in range(n)),
        tuple([0] * (n - 1) + [chunk + 1]),
        tuple(chunk * i + i for i in range(n)),
        tuple([1] * (n - 1) + [7 * chunk + 3]),
    ]


def build_group(layout: StripeLayout, seed: int) -> tuple[list[bytes], list[bytearray]]:
    """Random data per member and every member's parity buffer, computed stripe by stripe as an SMP would."""
    rng = np.random.default_rng(seed)
    data = [rng.integers(0, 256, size, dtype=np.uint8).tobytes() for size in layout.sizes]
    parity = [bytearray(layout.parity_bytes(m)) for m in range(layout.n)]
    cs = layout.chunk_size
    for t in range(layout.num_stripes):
        chunks = []
        for m in layout.data_members(t):
            off, length = layout.data_chunk(t, m)
            chunks.append(pad(data[m][off : off + length], cs))
        for i, block in enumerate(encode_parity(layout.k, layout.n, chunks, range(layout.f))):
            owner = layout.parity_members(t)[i]
            slot = layout.parity_slot(t, owner)
            parity[owner][slot * cs : (slot + 1) * cs] = block
    return data, parity


def held(layout: StripeLayout, data: list[bytes], parity: list[bytearray], t: int, m: int) -> bytes:
    """What member m would send for stripe t: its unpadded data chunk or its parity block."""
    cs = layout.chunk_size
    if layout.is_parity(t, m):
        slot = layout.parity_slot(t, m)
        return bytes(parity[m][slot * cs : (slot + 1) * cs])
    off, length = layout.data_chunk(t, m)
    return data[m][off : off + length]


def rebuild_members(
    layout: StripeLayout, data: list[bytes], parity: list[bytearray], lost: tuple[int, ...]
) -> dict[int, tuple[bytes, bytes]]:
    """Rebuild lost members' data and parity from survivors, never sending padding (empty chunks are skipped)."""
    cs = layout.chunk_size
    new_data = {m: bytearray(layout.sizes[m]) for m in lost}
    new_parity = {m: bytearray(layout.parity_bytes(m)) for m in lost}
    for t in range(layout.num_stripes):
        available = {}
        for m in range(layout.n):
            if m in lost:
                continue
            block = held(layout, data, parity, t, m)
            if block:
                available[m] = block
        rebuilt = rebuild_stripe(layout, t, available, want=lost)
        assert set(rebuilt) == set(lost)
        for m, block in rebuilt.items():
            assert len(block) == cs
            if layout.is_parity(t, m):
                slot = layout.parity_slot(t, m)
                new_parity[m][slot * cs : (slot + 1) * cs] = block
            else:
                off, length = layout.data_chunk(t, m)
                new_data[m][off : off + length] = memoryview(block)[:length]
                assert not any(memoryview(block)[length:]), "padding must rebuild as zeros"
    return {m: (bytes(new_data[m]), bytes(new_parity[m])) for m in lost}


@pytest.mark.parametrize("n,f", CONFIGS)
def test_any_f_lost_members_rebuild_bit_exactly(n: int, f: int) -> None:
    chunk = 64
    for v, sizes in enumerate(size_vectors(n, chunk)):
        layout = StripeLayout(n, f, chunk, sizes)
        data, parity = build_group(layout, seed=n * 100 + f * 10 + v)
        for lost_count in range(1, f + 1):
            for lost in itertools.combinations(range(n), lost_count):
                rebuilt = rebuild_members(layout, data, parity, lost)
                for m in lost:
                    assert rebuilt[m][0] == data[m], (sizes, lost, m, "data")
                    assert rebuilt[m][1] == bytes(parity[m]), (sizes, lost, m, "parity")


@pytest.mark.parametrize("n,f", CONFIGS)
def test_beyond_f_losses_refuse_or_are_exact(n: int, f: int) -> None:
    """A stripe is rebuildable iff at most f of its lost blocks carry data or parity; lost chunks past the end
    of a member's data are known zeros. Otherwise NotEnoughBlocks, never wrong bytes."""
    layout = StripeLayout(n, f, 64, size_vectors(n, 64)[1])
    data, parity = build_group(layout, seed=7)
    refused = 0
    for lost_count in range(f + 1, n + 1):
        for lost in itertools.combinations(range(n), lost_count):
            for t in range(layout.num_stripes):
                unknown = [m for m in lost if layout.is_parity(t, m) or layout.data_chunk(t, m)[1] > 0]
                available = {m: held(layout, data, parity, t, m) for m in range(n) if m not in lost}
                if len(unknown) > f:
                    with pytest.raises(NotEnoughBlocks, match=f"{layout.k} blocks are needed"):
                        rebuild_stripe(layout, t, available)
                    refused += 1
                else:
                    rebuilt = rebuild_stripe(layout, t, available)
                    for m in lost:
                        assert bytes(rebuilt[m]) == pad(held(layout, data, parity, t, m), layout.chunk_size)
    assert refused > 0


@pytest.mark.parametrize("n", range(1, 7))
def test_recover_from_every_subset(n: int) -> None:
    rng = np.random.default_rng(n)
    for k in range(1, n + 1):
        data = [rng.integers(0, 256, 97, dtype=np.uint8).tobytes() for _ in range(k)]
        everything = data + encode_parity(k, n, data, range(n - k))
        assert everything == [bytes(b) for b in zfec.Encoder(k, n).encode(data)]
        for size in range(n + 1):
            for keep in itertools.combinations(range(n), size):
                blocks = {b: everything[b] for b in keep}
                if size < k:
                    message = f"{sorted(keep)} of {n} available, {k} are needed"
                    with pytest.raises(NotEnoughBlocks, match=re.escape(message)):
                        recover(k, n, blocks)
                else:
                    assert [bytes(b) for b in recover(k, n, blocks)] == everything


def test_codec_takes_any_buffer_without_copying_given_blocks() -> None:
    k, n = 3, 5
    arena = bytearray(np.random.default_rng(0).integers(0, 256, 3 * 256, dtype=np.uint8).tobytes())
    views = [memoryview(arena)[i * 256 : (i + 1) * 256] for i in range(k)]
    expected = encode_parity(k, n, [bytes(v) for v in views], [0, 1])
    assert encode_parity(k, n, views, [0, 1]) == expected
    assert encode_parity(k, n, [np.frombuffer(v, dtype=np.float32) for v in views], [1]) == expected[1:]
    strided = np.frombuffer(bytes(arena) * 2, dtype=np.uint8).reshape(-1, 2)[:, 0]  # non-contiguous
    assert encode_parity(k, n, [strided[:256], strided[256:512], strided[512:]], [0])[0] == encode_parity(
        k, n, [strided[:256].tobytes(), strided[256:512].tobytes(), strided[512:].tobytes()], [0]
    )[0]
    out = recover(k, n, {0: views[0], 2: views[2], 3: expected[0]})
    assert out[0] is views[0] and out[3] is expected[0]
    assert bytes(out[1]) == bytes(views[1]) and out[4] == expected[1]


def test_codec_rejects_what_zfec_would_misread() -> None:
    with pytest.raises(ValueError, match="equal length"):
        recover(2, 3, {0: b"ab", 2: b"abc"})
    with pytest.raises(ValueError, match="out of range"):
        recover(2, 3, {0: b"ab", 7: b"ab"})
    with pytest.raises(ValueError, match="out of range"):
        encode_parity(2, 3, [b"ab", b"ab"], [1])
    with pytest.raises(ValueError, match="need 2 data blocks"):
        encode_parity(2, 3, [b"ab"], [0])
    assert encode_parity(3, 3, [b"a", b"b", b"c"], []) == []
    assert recover(3, 3, {0: b"a", 1: b"b", 2: b"c"}) == [b"a", b"b", b"c"]
    assert encode_parity(1, 3, [b"xyz"], [0, 1]) == [b"xyz", b"xyz"]  # k == 1 is replication


def test_pad() -> None:
    full = bytearray(b"abcd")
    assert pad(full, 4) is full
    assert bytes(pad(b"ab", 4)) == b"ab\0\0"
    assert bytes(pad(memoryview(b"abcdef")[2:3], 3)) == b"c\0\0"
    assert bytes(pad(b"", 2)) == b"\0\0"
    with pytest.raises(ValueError):
        pad(b"abcde", 4)


@pytest.mark.parametrize("n,f", CONFIGS)
def test_layout_properties(n: int, f: int) -> None:
    chunk = 64
    for sizes in size_vectors(n, chunk):
        layout = StripeLayout(n, f, chunk, sizes)
        k = n - f
        assert layout.k == k and layout.num_stripes == layout.rounds * n
        assert layout.rounds * k * chunk >= max(sizes) > (layout.rounds - 1) * k * chunk
        for t in range(layout.num_stripes):
            par, dat = layout.parity_members(t), layout.data_members(t)
            assert len(par) == f and len(dat) == k and not set(par) & set(dat)
            assert set(par) | set(dat) == set(range(n)) and list(dat) == sorted(dat)
            assert [layout.block_number(t, m) for m in dat] == list(range(k))
            assert [layout.parity_index(t, m) for m in par] == list(range(f))
            assert [layout.block_number(t, m) for m in par] == list(range(k, n))
            for m in par:
                with pytest.raises(ValueError):
                    layout.data_chunk(t, m)
            for m in dat:
                with pytest.raises(ValueError):
                    layout.parity_slot(t, m)
        for m in range(n):
            stripes = layout.parity_stripes(m)
            assert stripes == sorted(stripes) and len(stripes) == layout.rounds * f
            assert [layout.parity_slot(t, m) for t in stripes] == list(range(len(stripes)))
            assert layout.parity_bytes(m) == len(stripes) * chunk
            assert not set(stripes) & set(layout.data_stripes(m))
            chunks = [layout.data_chunk(t, m) for t in layout.data_stripes(m)]
            assert [off for off, _ in chunks] == [q * chunk for q in range(len(chunks))]
            assert sum(length for _, length in chunks) == sizes[m]
            assert all(length == chunk for _, length in chunks[: sizes[m] // chunk])
        counts = [len(layout.parity_stripes(m)) for m in range(n)]
        assert max(counts) - min(counts) <= 1


def test_parity_memory_is_f_over_k_of_data() -> None:
    for n, f in CONFIGS:
        k = n - f
        layout = StripeLayout(n, f, 4096, tuple([k * 4096 * 10] * n))
        assert all(layout.parity_bytes(m) * k == f * layout.sizes[m] for m in range(n))


def test_layout_edges() -> None:
    empty = StripeLayout(3, 1, 64, (0, 0, 0))
    assert empty.rounds == 0 and empty.num_stripes == 0
    assert empty.data_stripes(0) == [] and empty.parity_stripes(0) == [] and empty.parity_bytes(0) == 0
    layout = StripeLayout(3, 1, 64, [10, 200, 0])
    assert layout.sizes == (10, 200, 0)
    with pytest.raises(ValueError, match="out of range"):
        layout.parity_members(layout.num_stripes)
    with pytest.raises(ValueError, match="out of range"):
        layout.data_stripes(3)
    for bad in [(1, 1, 64, (0,)), (3, 3, 64, (0, 0, 0)), (3, 1, 0, (0, 0, 0)), (3, 1, 64, (0, 0)),
                (3, 1, 64, (0, -1, 0))]:
        with pytest.raises(ValueError):
            StripeLayout(*bad)


def test_default_group_size() -> None:
    assert [default_group_size(x) for x in (1, 2, 5, 8, 9, 10, 12, 14, 16, 24, 64, 100)] == [
        1, 2, 5, 8, 3, 5, 6, 7, 8, 8, 8, 5,
    ]
    for bad in (11, 22, 26, 0):
        with pytest.raises(ErasureConfigError):
            default_group_size(bad)
    with pytest.raises(ErasureConfigError, match="--ftmem-ec-group"):
        default_group_size(13)


def test_check_config() -> None:
    for ok in [(2, 2, 1), (6, 3, 1), (6, 6, 5), (16, 8, 2)]:
        check_config(*ok)
    with pytest.raises(ErasureConfigError, match=r"--ftmem-ec-group 4 does not divide --nnodes 6.*\[2, 3, 6\]"):
        check_config(6, 4, 1)
    with pytest.raises(ErasureConfigError, match="at least 2"):
        check_config(6, 1, 1)
    for f in (0, 3, 4):
        with pytest.raises(ErasureConfigError, match="--ftmem-ec-parity"):
            check_config(6, 3, f)
    assert issubclass(ErasureConfigError, ValueError)


def test_group_members() -> None:
    assert group_members(0, 3) == (0, 1, 2)
    assert group_members(5, 4) == (4, 5, 6, 7)
    assert all(node in group_members(node, 3) for node in range(12))


def test_choose_chunk_size() -> None:
    assert choose_chunk_size(0, 3) == 4096
    assert choose_chunk_size(100, 3) == 4096
    for max_size in (1, 5000, 10 << 20, 1 << 30, (1 << 30) + 12345):
        for k in (1, 3, 7):
            chunk = choose_chunk_size(max_size, k)
            rounds = -(-max_size // (k * chunk))
            assert chunk % 4096 == 0 and 4096 <= chunk <= 4 << 20
            assert rounds * k * chunk - max_size < rounds * k * 4096  # padding under a page per chunk
            if max_size >= k * (4 << 20):
                assert chunk > 2 << 20
