"""Pure unit tests: the layout plan, the commit and buffer-reuse rules, the buffer header and descriptor,
msgpack state encoding, request validation and shared-memory segments. No processes, no sockets."""

from __future__ import annotations

import errno
import os
import random
import re
import socket
import struct
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from enum import IntEnum
from types import SimpleNamespace

import msgpack
import numpy as np
import pytest
import torch

from ftmem.smp import shm
from ftmem.smp.commit import CommitTracker, reusable
from ftmem.smp.layout import (
    ALIGN,
    HEADER_SIZE,
    MAX_CHUNKS,
    MIN_CHUNK,
    BufferState,
    Descriptor,
    Header,
    LayoutError,
    TensorEntry,
    chunk_crcs,
    chunk_size_for,
    pack_entries,
)
from ftmem.smp.nodedata import NodeData, Part
from ftmem.smp.protocol import CONTROL_SCHEMA, MAX_CONTROL_BYTES, ProtocolError, decode, encode
from ftmem.snapshot import serialize
from ftmem.snapshot.capture import Captured
from ftmem.snapshot.plan import LayoutPlan

# ------------------------------------------------------------------------------------------------ LayoutPlan


def _captured(specs) -> list[Captured]:
    return [Captured(name, torch.zeros(shape, dtype=dtype), False) for name, shape, dtype in specs]


PLAN_SPECS = [("model.a", (3,), torch.float32), ("model.b", (7, 5), torch.float16), ("model.c", (), torch.int64),
              ("model.empty", (0, 4), torch.float32), ("model.d", (13,), torch.uint8),
              ("optim.a.exp_avg", (3,), torch.float32), ("model.e", (2, 3, 5), torch.bfloat16),
              ("model.f", (1,), torch.bool)]


def test_layout_plan_offsets_are_aligned_and_disjoint():
    captured = _captured(PLAN_SPECS)
    plan = LayoutPlan(captured)
    assert [e.name for e in plan.entries] == [c.name for c in captured]
    ranges = []
    for e, c in zip(plan.entries, captured):
        assert e.offset % ALIGN == 0 and ALIGN == 64, e
        assert e.nbytes == c.tensor.numel() * c.tensor.element_size()
        assert e.dtype == str(c.tensor.dtype).removeprefix("torch.")
        assert e.shape == tuple(c.tensor.shape) == e.global_shape
        assert e.global_offset == (0,) * c.tensor.dim()
        assert e.offset + e.nbytes <= plan.data_bytes
        ranges.append((e.offset, e.offset + e.nbytes))
    nonempty = sorted(r for r in ranges if r[1] > r[0])
    for (_, end), (start, _) in zip(nonempty, nonempty[1:]):
        assert end <= start, f"overlapping ranges in {ranges}"
    assert plan.data_bytes % ALIGN == 0  # the descriptor that follows starts aligned too


def test_layout_plan_matches_only_the_same_names_dtypes_and_shapes():
    plan = LayoutPlan(_captured(PLAN_SPECS))
    assert plan.matches(_captured(PLAN_SPECS))  # new tensors, same signature
    changed_shape = [(n, (4,) if n == "model.a" else s, d) for n, s, d in PLAN_SPECS]
    changed_dtype = [(n, s, torch.float64 if n == "model.d" else d) for n, s, d in PLAN_SPECS]
    renamed = [("model.z" if n == "model.c" else n, s, d) for n, s, d in PLAN_SPECS]
    assert not plan.matches(_captured(changed_shape))
    assert not plan.matches(_captured(changed_dtype))
    assert not plan.matches(_captured(renamed))
    assert not plan.matches(_captured(PLAN_SPECS[:-1]))
    assert not plan.matches(_captured(PLAN_SPECS + [("model.g", (1,), torch.float32)]))


# ------------------------------------------------------------------------------ CommitTracker and reusable


def _tracker(world, complete):
    t = CommitTracker(world=world)
    for rank, snaps in complete.items():
        t.set_complete(rank, snaps)
    return t


@pytest.mark.parametrize("world, complete, committed_before, moved, committed_after", [
    (None, {0: {(1, 0)}}, None, False, None),                                     # world unknown
    (2, {0: {(0, 1)}}, None, False, None),                                        # rank 1 has nothing
    (2, {0: {(0, 1)}, 1: {(0, 1)}}, None, True, 0),
    (2, {0: {(0, 1), (1, 1)}, 1: {(0, 1)}}, None, True, 0),                       # rank 0 ahead
    (2, {0: {(0, 1), (1, 1)}, 1: {(0, 1), (1, 1)}}, 0, True, 1),
    (2, {0: {(0, 1), (1, 1)}, 1: {(0, 1), (1, 1)}}, 1, False, 1),                 # nothing new
    (2, {0: {(5, 1)}, 1: {(5, 2)}}, None, False, None),                           # epochs never mix
    (2, {0: {(4, 1), (5, 2)}, 1: {(4, 1), (5, 1)}}, None, True, 4),               # (5, x) differs
    (3, {0: {(2, 0)}, 1: {(2, 0)}, 2: {(1, 0)}}, None, False, None),
    (1, {0: {(7, 3), (8, 3)}}, 7, True, 8),
])
def test_commit_tracker_evaluate(world, complete, committed_before, moved, committed_after):
    t = _tracker(world, complete)
    t.committed = committed_before
    assert t.evaluate() is moved
    assert t.committed == committed_after
    assert t.evaluate() is False  # idempotent


def test_commit_tracker_epoch_follows_the_newest_snapshot_seen():
    t = _tracker(2, {0: {(3, 4)}, 1: {(3, 2)}})
    assert t.epoch == 4
    t.set_complete(1, set())
    assert t.epoch == 4  # never goes back
    assert t.complete(1) == set() and t.complete(9) == set()


def test_commit_tracker_restart_at_moves_back_and_opens_an_epoch():
    t = _tracker(2, {0: {(8, 1), (9, 1)}, 1: {(8, 1), (9, 1)}})
    assert t.evaluate() and t.committed == 9
    t.restart_at(5, 3)
    assert (t.committed, t.epoch) == (5, 3)
    t.restart_at(None, 2)  # start from scratch; the epoch never goes back
    assert (t.committed, t.epoch) == (None, 3)
    # the new timeline's snapshots commit normally; the old epoch's 8 and 9 are gone (begin invalidated them)
    t.restart_at(5, 4)
    t.set_complete(0, {(5, 1), (6, 4)})
    t.set_complete(1, {(5, 1)})
    assert not t.evaluate() and t.committed == 5
    t.set_complete(1, {(5, 1), (6, 4)})
    assert t.evaluate() and t.committed == 6


def test_commit_tracker_missing_names_the_ranks_a_commit_waits_for():
    t = _tracker(3, {1: {(2, 0)}, 2: {(2, 1)}})
    assert t.missing(2, 0) == [0, 2]
    assert t.missing(2, 1) == [0, 1]
    assert t.missing(3, 0) == [0, 1, 2]
    assert CommitTracker().missing(1, 0) == []


def test_commit_tracker_knows_when_a_committed_step_is_no_longer_held_by_every_rank():
    t = _tracker(2, {0: {(7, 1)}, 1: {(7, 1)}})
    t.set_complete(1, {(7, 1)}, source=3)  # rank 1's copy at node 3 (a peer's report), not this SMP's
    t.set_complete(1, set())
    assert t.evaluate() and t.committed == 7 and t.held_by_all(7)
    t.set_source(3, {})  # node 3 died (a replacement reports nothing yet): rank 1's step 7 is gone
    assert t.committed == 7 and not t.held_by_all(7), "committed stays; the leader must not protect it"
    assert not CommitTracker().held_by_all(0)


@pytest.mark.parametrize("steps, committed, newest, expected", [
    ([None, None], None, None, [0, 1]),
    ([0, None], 0, 0, [1]),
    ([0, None], None, 0, [1]),            # first snapshot not committed yet: keep it
    ([0, 1], 0, 1, []),                   # newest waits for the slowest rank: nothing may be overwritten
    ([0, 1], 1, 1, [0]),
    ([2, 1], 1, 2, []),
    ([2, 1], 2, 2, [1]),
    ([8, None], 8, 8, [1]),               # just restored step 8
    ([0, 1, 2], 0, 2, [1]),
    ([3, None, 1], 3, 3, [1, 2]),         # empty first, then the oldest step
    ([5, 7, 6], None, 7, [0, 2]),
    ([9, 4], 4, 9, []),
])
def test_reusable(steps, committed, newest, expected):
    assert reusable(steps, committed, newest) == expected


@pytest.mark.parametrize("seed", range(6))
def test_double_buffer_always_keeps_a_consistent_step(seed):
    """Drive the daemon's rules (prepare picks reusable()[0], commit completes, crashes lose in-flight writes)
    in random interleavings of ranks: once a step committed, every rank always still holds it complete."""
    rng = random.Random(seed)
    print("seed", seed)
    world, nbuf = rng.choice([(2, 2), (3, 2), (2, 3), (4, 2)])
    tracker = CommitTracker(world=world)
    held = {r: [None] * nbuf for r in range(world)}     # complete step per buffer (epoch fixed: no restore)
    writing = {r: None for r in range(world)}            # (buffer, step) in flight
    next_step = {r: 0 for r in range(world)}
    for _ in range(400):
        r = rng.randrange(world)
        if writing[r] is None:
            newest = max((s for s in held[r] if s is not None), default=None)
            free = reusable(held[r], tracker.committed, newest)
            if not free:
                continue  # prepare waits
            b = free[0]
            held[r][b] = None  # header WRITING: no longer complete
            writing[r] = (b, next_step[r])
        elif rng.random() < 0.1:
            writing[r] = None  # the rank crashed mid-copy: its write never completes; it retries the step
        else:
            b, s = writing[r]
            held[r][b] = s
            writing[r] = None
            next_step[r] = s + 1
        tracker.set_complete(r, {(s, 0) for s in held[r] if s is not None})
        tracker.evaluate()
        if tracker.committed is not None:
            for rank in range(world):
                assert tracker.committed in held[rank], (seed, held, tracker.committed)
    assert tracker.committed is not None and tracker.committed > 5


# ------------------------------------------------------------------------------------- Header / Descriptor


def _payload(n: int, seed: int = 0) -> bytearray:
    return bytearray(random.Random(seed).randbytes(n))


def test_header_round_trip():
    payload = _payload(3 * MIN_CHUNK + 12345)
    crcs = chunk_crcs(memoryview(payload), MIN_CHUNK)
    h = Header(BufferState.COMPLETE, rank=3, world=8, step=41, epoch=2, payload_len=len(payload),
               desc_off=len(payload) - 100, desc_len=100, chunk_size=MIN_CHUNK, crcs=crcs)
    packed = h.pack()
    assert len(packed) <= HEADER_SIZE
    back = Header.unpack(packed + bytes(HEADER_SIZE - len(packed)))
    assert back == h and back.state is BufferState.COMPLETE
    assert back.bad_chunks(memoryview(payload)) == []
    empty = Header(BufferState.EMPTY, rank=1)
    assert Header.unpack(empty.pack().ljust(HEADER_SIZE, b"\0")) == empty


def test_header_with_all_checksums_fits():
    h = Header(BufferState.COMPLETE, crcs=list(range(MAX_CHUNKS)))
    assert Header.unpack(h.pack().ljust(HEADER_SIZE, b"\0")).crcs == list(range(MAX_CHUNKS))
    with pytest.raises(LayoutError):
        Header(BufferState.COMPLETE, crcs=[0] * (MAX_CHUNKS + 1)).pack()


def test_torn_header_is_a_layout_error():
    h = Header(BufferState.COMPLETE, rank=1, world=2, step=9, epoch=1, payload_len=10, desc_off=0, desc_len=10,
               crcs=[zlib.crc32(b"x" * 10)])
    packed = bytearray(h.pack().ljust(HEADER_SIZE, b"\0"))
    body_end = len(h.pack())
    for pos in range(8, body_end):  # every byte after the magic: state, step, checksums, the header's own crc
        torn = bytearray(packed)
        torn[pos] ^= 0x01
        with pytest.raises(LayoutError):
            Header.unpack(bytes(torn))
    bad_magic = bytearray(packed)
    bad_magic[0] ^= 0xFF
    with pytest.raises(LayoutError, match="magic"):
        Header.unpack(bytes(bad_magic))
    with pytest.raises(LayoutError):
        Header.unpack(bytes(HEADER_SIZE))  # never written
    huge_n = bytearray(packed)
    struct.pack_into("<I", huge_n, 20, MAX_CHUNKS + 1)  # n_chunks field
    with pytest.raises(LayoutError):
        Header.unpack(bytes(huge_n))


def test_bad_chunks_finds_a_flipped_payload_byte():
    payload = _payload(2 * MIN_CHUNK + 777, seed=1)
    h = Header(BufferState.COMPLETE, payload_len=len(payload), chunk_size=MIN_CHUNK,
               crcs=chunk_crcs(memoryview(payload), MIN_CHUNK))
    for pos, chunk in [(0, 0), (MIN_CHUNK - 1, 0), (MIN_CHUNK, 1), (2 * MIN_CHUNK + 776, 2)]:
        flipped = bytearray(payload)
        flipped[pos] ^= 0x80
        assert h.bad_chunks(memoryview(flipped)) == [chunk]
    # bytes past payload_len are not covered
    longer = payload + b"junk"
    assert h.bad_chunks(memoryview(longer)) == []
    # a truncated payload fails everywhere rather than passing
    assert h.bad_chunks(memoryview(payload[:MIN_CHUNK])) != []


def test_chunk_size_for_covers_the_payload_within_the_header():
    for n in (0, 1, MIN_CHUNK, MAX_CHUNKS * MIN_CHUNK, MAX_CHUNKS * MIN_CHUNK + 1, 10**12):
        size = chunk_size_for(n)
        assert size >= MIN_CHUNK and size & (size - 1) == 0
        assert size * MAX_CHUNKS >= n


def _entries():
    return (TensorEntry("model.w", "float32", (4, 8), 0, 128, (4, 8), (0, 0)),
            TensorEntry("model.b", "float32", (8,), 128, 32, (16,), (8,)),
            TensorEntry("model.empty", "float32", (0,), 192, 0, (0,), (0,)),
            TensorEntry("optim.w.exp_avg", "bfloat16", (4, 8), 192, 64, (4, 8), (0, 0)))


def test_descriptor_round_trip():
    d = Descriptor(12, 3, 1, 2, _entries(), b"\x00meta\xff")
    back = Descriptor.unpack(d.pack())
    assert back == d
    assert isinstance(back.entries[0].shape, tuple) and isinstance(back.meta, bytes)
    assert d.pack(pack_entries(d.entries)) == d.pack()  # a plan's pre-packed entries change nothing
    assert msgpack.unpackb(d.pack(), raw=False)["v"] == 1


@pytest.mark.parametrize("start, stop, names", [
    (0, 1, ["model.w"]),
    (127, 129, ["model.w", "model.b"]),
    (128, 160, ["model.b"]),
    (160, 192, ["<snapshot descriptor>"]),   # alignment padding: nothing of a tensor
    (192, 193, ["optim.w.exp_avg"]),         # the empty tensor at 192 covers no byte
    (256, 10**6, ["<snapshot descriptor>"]),
])
def test_descriptor_entries_in(start, stop, names):
    assert Descriptor(0, 0, 0, 1, _entries(), b"").entries_in(start, stop) == names


def test_descriptor_entries_in_never_names_an_empty_tensor():
    """A zero-byte tensor holds no byte a bad chunk could have hit, so a corruption report must not name it."""
    assert Descriptor(0, 0, 0, 1, _entries(), b"").entries_in(0, 10**6) == ["model.w", "model.b",
                                                                            "optim.w.exp_avg"]


@pytest.mark.parametrize("data", [b"", b"\xc1", msgpack.packb([1, 2]), msgpack.packb({"v": 1, "step": 1}),
                                  msgpack.packb({"step": 1, "epoch": 0, "rank": 0, "world": 1, "meta": b"",
                                                 "entries": [["x", "float32"]]})])
def test_unreadable_descriptor_is_a_layout_error(data):
    with pytest.raises(LayoutError):
        Descriptor.unpack(data)


# ------------------------------------------------------------------------------------------------ serialize


def test_rng_states_round_trip_and_reproduce_draws():
    random.seed(5)
    np.random.seed(6)
    torch.manual_seed(7)
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    expected = (random.random(), np.random.random_sample(3).tolist(), torch.rand(3).tolist())
    back = serialize.unpack(serialize.pack(state))
    assert isinstance(back["python"], tuple) and isinstance(back["python"][1], tuple)
    assert back["python"] == state["python"]
    assert isinstance(back["numpy"], tuple) and back["numpy"][0] == "MT19937"
    np.testing.assert_array_equal(back["numpy"][1], state["numpy"][1])
    assert back["numpy"][1].dtype == state["numpy"][1].dtype
    assert torch.equal(back["torch"], state["torch"]) and back["torch"].dtype == torch.uint8
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    random.setstate(back["python"])
    np.random.set_state(back["numpy"])
    torch.set_rng_state(back["torch"])
    assert (random.random(), np.random.random_sample(3).tolist(), torch.rand(3).tolist()) == expected


class Color(IntEnum):
    RED = 3


def test_plain_data_round_trip():
    obj = {"a": (1, (2.5, "x"), [3, (4,)]), 7: {"nested": {"deep": (None, True, False)}},
           "bytes": b"\x00\xff", "od": OrderedDict([("k", 1)]), "enum": Color.RED,
           "np_scalars": [np.float64(1.5), np.int32(-3), np.bool_(True)], "big": 2**63 - 1, "neg": -(2**63),
           "empty": (), "empty_list": [], "unicode": "ünïcode"}
    back = serialize.unpack(serialize.pack(obj))
    assert back["a"] == (1, (2.5, "x"), [3, (4,)]) and isinstance(back["a"][1], tuple)
    assert isinstance(back["a"][2][1], tuple) and isinstance(back["a"][2], list)
    assert back[7] == {"nested": {"deep": (None, True, False)}}
    assert back["bytes"] == b"\x00\xff" and back["od"] == {"k": 1}
    assert back["enum"] == 3 and type(back["enum"]) is int
    assert back["np_scalars"] == [1.5, -3, True]
    assert [type(x) for x in back["np_scalars"]] == [np.float64, np.int32, np.bool_]
    assert (back["big"], back["neg"], back["empty"], back["empty_list"], back["unicode"]) == \
        (2**63 - 1, -(2**63), (), [], "ünïcode")


def test_numpy_scalars_keep_their_dtype_and_so_their_arithmetic():
    """An np.float32 that came back a Python float would compute in float64 after a restore (numpy 2 keeps
    `0.9 * np.float32` in float32): the run would no longer be bit-identical."""
    state = {"ema": np.float32(0.3), "count": np.int64(7), "flag": np.bool_(True), "when": np.datetime64("2024-01-02"),
             "name": np.str_("shard")}
    back = serialize.unpack(serialize.pack(state))
    for key, value in state.items():
        assert type(back[key]) is type(value) and back[key].dtype == value.dtype and back[key] == value, key
    assert (0.9 * back["ema"] + 0.07).tobytes() == (0.9 * state["ema"] + 0.07).tobytes()


@pytest.mark.parametrize("value", [2**64, -(2**63) - 1, 2**200 + 1, -(2**127), 2**64 - 1, -(2**63)])
def test_integers_beyond_64_bits_round_trip(value):
    back = serialize.unpack(serialize.pack({"v": value, "list": [value, (value,)]}))
    assert back == {"v": value, "list": [value, (value,)]} and type(back["v"]) is int


def test_a_numpy_generator_state_round_trips_and_reproduces_draws():
    """A PCG64 state (numpy's default_rng, which data pipelines keep in their samplers) holds 128-bit integers:
    msgpack alone refuses them with an OverflowError at every snapshot."""
    rng = np.random.default_rng(3)
    rng.random(5)
    state = rng.bit_generator.state
    expected = rng.integers(0, 1000, 8)
    fresh = np.random.default_rng(99)
    fresh.bit_generator.state = serialize.unpack(serialize.pack(state))
    np.testing.assert_array_equal(fresh.integers(0, 1000, 8), expected)


def test_a_numpy_array_of_python_objects_is_refused_when_snapshotted():
    """Its bytes are pointers: it would be snapshotted, and every restore would fail decoding it."""
    with pytest.raises(TypeError, match="ftmem cannot snapshot a numpy array of Python objects"):
        serialize.pack({"ids": np.array([1, "a", None], dtype=object)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64,
                                   torch.int32, torch.int8, torch.uint8, torch.bool, torch.complex64])
@pytest.mark.parametrize("shape", [(), (0,), (3,), (2, 0, 3), (2, 3, 4)])
def test_tensor_round_trip(dtype, shape):
    g = torch.Generator().manual_seed(0)
    base = torch.randn((*shape, 2) if shape else (2,), generator=g, dtype=torch.float64) * 100
    t = base.to(dtype)[..., 0] if shape else base.to(dtype)[0]
    back = serialize.unpack(serialize.pack({"t": t, "pair": (t, t)}))
    for x in (back["t"], *back["pair"]):
        assert x.dtype == dtype and tuple(x.shape) == shape
        assert torch.equal(x, t)  # bitwise for floats without NaNs
    assert isinstance(back["pair"], tuple)


def test_non_contiguous_and_grad_tensors_round_trip():
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()[1:, ::2]
    w = torch.ones(3, requires_grad=True) * 2
    back = serialize.unpack(serialize.pack([t, w]))
    assert torch.equal(back[0], t) and torch.equal(back[1], w.detach()) and not back[1].requires_grad
    back[0].add_(1)  # decoded tensors own writable memory


@pytest.mark.parametrize("array", [np.arange(12, dtype=np.float32).reshape(3, 4), np.array([1, -2], dtype=">i4"),
                                   np.array(3.5), np.zeros((0, 2), dtype=np.int16),
                                   np.array([True, False]), np.arange(6, dtype=np.uint64)[::2],
                                   np.array([1 + 2j], dtype=np.complex128)])
def test_numpy_array_round_trip(array):
    """dtype (byte order included), shape (0-d included) and values survive."""
    back = serialize.unpack(serialize.pack({"a": array}))["a"]
    assert isinstance(back, np.ndarray) and back.dtype == array.dtype and back.shape == array.shape
    np.testing.assert_array_equal(back, array)
    assert back.flags.writeable


def test_scheduler_state_dict_round_trips_into_a_fresh_scheduler():
    def make():
        p = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.AdamW([p], lr=1e-2, betas=(0.9, 0.95))
        sched = torch.optim.lr_scheduler.SequentialLR(
            opt, [torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=3),
                  torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)], milestones=[3])
        return opt, sched
    opt, sched = make()
    for _ in range(5):
        opt.step()
        sched.step()
    opt2, sched2 = make()
    sched2.load_state_dict(serialize.unpack(serialize.pack(sched.state_dict())))
    groups = serialize.unpack(serialize.pack([{k: v for k, v in g.items() if k != "params"}
                                              for g in opt.param_groups]))
    assert groups[0]["betas"] == (0.9, 0.95) and isinstance(groups[0]["betas"], tuple)
    opt.step()
    sched.step()
    opt2.param_groups[0]["lr"] = groups[0]["lr"]
    opt2.step()
    sched2.step()
    assert sched2.get_last_lr() == sched.get_last_lr()


@pytest.mark.parametrize("bad, type_name", [(lambda: 1, "function"), ({1, 2}, "set"), (object(), "object"),
                                            ({"nested": [1, {"deep": lambda: 2}]}, "function")])
def test_unsupported_object_is_a_clear_type_error(bad, type_name):
    with pytest.raises(TypeError, match=rf"ftmem cannot snapshot a value of type {type_name}\b"):
        serialize.pack({"state": bad})


# ------------------------------------------------------------------------------------------ protocol.decode

_SAMPLE = {int: 1, str: "s", bool: True, bytes: b"b"}


def _valid(op: str) -> dict:
    return {"op": op, "id": 42, **{name: _SAMPLE[typ] for name, typ in CONTROL_SCHEMA[op].items()}}


@pytest.mark.parametrize("op", sorted(CONTROL_SCHEMA))
def test_decode_accepts_every_valid_op(op):
    assert decode(encode(_valid(op)), CONTROL_SCHEMA, MAX_CONTROL_BYTES) == _valid(op)


def _wrong_type_cases():
    for op, fields in sorted(CONTROL_SCHEMA.items()):
        for name, typ in fields.items():
            wrong = [v for t, v in _SAMPLE.items() if t is not typ]
            if typ is int:
                wrong += [True, 1.0]
            if typ is bool:
                wrong += [1, 0]
            for value in wrong:
                yield op, name, value


@pytest.mark.parametrize("op, name, value", list(_wrong_type_cases()))
def test_decode_rejects_wrong_types(op, name, value):
    msg = {**_valid(op), name: value}
    with pytest.raises(ProtocolError, match=rf"{op}: field '{name}' must be"):
        decode(encode(msg), CONTROL_SCHEMA, MAX_CONTROL_BYTES)


@pytest.mark.parametrize("data, message", [
    (b"\xc1", "undecodable"),
    (b"", "undecodable"),
    (encode({"op": "ping", "id": 1}) + b"\x00", "undecodable"),         # trailing bytes
    (msgpack.packb({1: "x", "op": "ping", "id": 1}), "undecodable"),     # non-string key
    (encode([1, 2]), "must be a map"),
    (encode("ping"), "must be a map"),
    (encode(None), "must be a map"),
    (encode({"op": "frobnicate", "id": 1}), "unknown op 'frobnicate'"),
    (encode({"id": 1}), "unknown op None"),
    (encode({"op": 1, "id": 1}), "unknown op 1"),
    (encode({"op": "ping"}), "'id' must be an int"),
    (encode({"op": "ping", "id": True}), "'id' must be an int"),
    (encode({"op": "ping", "id": "1"}), "'id' must be an int"),
    (encode({"op": "register", "id": 1, "rank": 0, "world": 1, "local_rank": 0}), "register: missing field 'pid'"),
    (encode({"op": "ping", "id": 1, "x": 1}), r"ping: unexpected fields \['x'\]"),
    (encode({**_valid("close"), "b": 1, "a": 2}), r"close: unexpected fields \['a', 'b'\]"),
    (encode({"op": "ping", "id": 1, "pad": b"x" * MAX_CONTROL_BYTES}), "exceeds the limit of 1048576"),
])
def test_decode_errors(data, message):
    with pytest.raises(ProtocolError, match=message):
        decode(data, CONTROL_SCHEMA, MAX_CONTROL_BYTES)


def test_decode_limits_inner_sizes():
    with pytest.raises(ProtocolError, match="exceeds the limit of 100"):
        decode(encode({"op": "ping", "id": 1, "pad": b"x" * 200}), CONTROL_SCHEMA, 100)
    with pytest.raises(ProtocolError, match="undecodable"):  # small in bytes, huge in elements
        decode(encode({"op": "ping", "id": 1, "pad": [0] * 70_000}), CONTROL_SCHEMA, MAX_CONTROL_BYTES)
    with pytest.raises(ProtocolError, match="undecodable"):
        decode(encode({"op": "ping", "id": 1, "pad": {str(i): 0 for i in range(2000)}}), CONTROL_SCHEMA,
               MAX_CONTROL_BYTES)


# ------------------------------------------------------------------------------------------------------ shm


@pytest.fixture
def seg_name():
    name = f"ftmem.unit{uuid.uuid4().hex[:10]}.n0.r0.b0.g1"
    yield name
    shm.unlink(name)


def test_segment_larger_than_available_is_refused_before_creating(seg_name):
    size = shm.available_bytes() + (1 << 30)
    with pytest.raises(shm.ShmFullError) as info:
        shm.Segment.create(seg_name, size)
    err = info.value
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    m = re.search(rf"needs {size} bytes but {re.escape(shm.shm_dir())} has (\d+) available", str(err))
    assert m, str(err)
    assert int(m.group(1)) < size
    assert seg_name in str(err)
    assert not os.path.exists(os.path.join(shm.shm_dir(), seg_name))
    assert shm.list_segments(seg_name) == []


def test_segment_is_created_0600_and_shared(seg_name):
    old = os.umask(0)  # a permissive umask must not widen the mode
    try:
        seg = shm.Segment.create(seg_name, 8192)
    finally:
        os.umask(old)
    try:
        st = os.stat(os.path.join(shm.shm_dir(), seg_name))
        assert st.st_mode & 0o777 == 0o600
        assert st.st_size == seg.size == 8192
        assert shm.list_segments(seg_name) == [seg_name]
        seg.buf[100:104] = b"abcd"
        other = shm.Segment.open(seg_name, populate=True)
        try:
            assert other.size == 8192 and bytes(other.buf[100:104]) == b"abcd"
            other.buf[0:2] = b"zz"
            assert bytes(seg.buf[0:2]) == b"zz"
        finally:
            other.close()
        with pytest.raises(FileExistsError):
            shm.Segment.create(seg_name, 4096)
    finally:
        seg.close()
        seg.unlink()
    assert not os.path.exists(os.path.join(shm.shm_dir(), seg_name))
    shm.unlink(seg_name)  # unlinking twice is harmless


def _mapped(name: str) -> bool:
    with open("/proc/self/maps") as f:
        return any(f"/{name}" in line for line in f)  # "... /dev/shm/NAME (deleted)" once unlinked


def test_data_is_served_as_a_view_and_a_closed_segment_stays_mapped_until_its_last_view_goes(seg_name):
    """Peer replies are sent straight from shared memory: `NodeData.read` of a range inside one rank's payload is
    a view of the segment, and closing the segment while zmq may still hold such a view neither fails nor pulls
    the pages from under it; they are unmapped with the last view."""
    seg = shm.Segment.create(seg_name, HEADER_SIZE + 8192)
    seg.buf[HEADER_SIZE: HEADER_SIZE + 8192] = bytes(range(256)) * 32
    data = NodeData([Part(0, SimpleNamespace(segment=seg), 8192)])
    view = data.read(256, 1024)
    assert isinstance(view, memoryview) and view == bytes(range(256)) * 4
    seg.buf[HEADER_SIZE + 256] = 7
    assert view[0] == 7, "a copy, not a view of the segment"
    assert data.read(8000, 4096) == (bytes(range(256)) * 32)[8000:], "a range past the end reads short"
    seg.close()
    seg.unlink()
    assert _mapped(seg_name) and view[1] == 1, "closing the segment unmapped a view still in use"
    with pytest.raises(ValueError, match="closed"):
        seg.buf
    seg.close()  # closing twice is harmless
    del view
    assert not _mapped(seg_name)


def test_a_read_across_two_ranks_payloads_is_joined():
    segs = [SimpleNamespace(buf=bytearray(HEADER_SIZE) + bytes([r]) * 100) for r in (1, 2)]
    data = NodeData([Part(r, SimpleNamespace(segment=s), 100) for r, s in zip((2, 1), reversed(segs))])
    assert data.size == 200 and bytes(data.read(90, 20)) == b"\x01" * 10 + b"\x02" * 10


def test_shm_dir_is_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv("FTMEM_SHM_DIR", str(tmp_path))
    seg = shm.Segment.create("ftmem.x.n0.r0.b0.g1", 4096)
    try:
        assert shm.list_segments("ftmem.x.") == ["ftmem.x.n0.r0.b0.g1"]
        assert (tmp_path / "ftmem.x.n0.r0.b0.g1").stat().st_size == 4096
    finally:
        seg.close()
        seg.unlink()
    assert shm.list_segments("ftmem.x.") == []


def _woken(store, timeout: float = 30.0) -> None:
    """Wait (bounded) until the store's wakeup fd says a segment creation ended, as the SMP's event loop does."""
    import select

    assert select.select([store.wakeup_fd], [], [], timeout)[0], "no segment creation ended within the timeout"
    store.drain_wakeups()


def _sized(store, wanted) -> None:
    """`store.when_ready(wanted)`, waited for as the SMP's event loop does: `run_ready` after each wakeup."""
    done: list = []
    store.when_ready(wanted, lambda: done.append(None), done.append)
    while not done:
        _woken(store)
        store.run_ready()
    if done[0] is not None:
        raise done[0]


def test_buffer_segments_are_created_off_the_caller_and_all_at_a_ranks_first_snapshot(tmp_path, monkeypatch):
    """`ready` never creates a segment on the calling thread (the SMP's event loop): it starts the creation,
    says not yet, and installs the segment when asked again after the wakeup fd fired; `reserve` starts every
    other buffer of the rank at once, so the next snapshots find theirs."""
    from ftmem.smp.buffers import BufferStore

    monkeypatch.setenv("FTMEM_SHM_DIR", str(tmp_path))
    store = BufferStore("ftmem.u.", 3)
    try:
        first, *others = store.of(0).buffers
        assert not store.ready(0, first, 10_000)
        assert first.segment is None
        store.reserve(0, 10_000)
        deadline = time.monotonic() + 30
        while not store.ready(0, first, 10_000):
            assert time.monotonic() < deadline, "the first buffer's segment was never installed"
            _woken(store)
        assert first.segment.size >= 10_000 and first.header.state == BufferState.EMPTY
        _sized(store, [(0, b, 10_000) for b in others])  # the reserved ones: only waited for
        assert all(b.segment is not None for b in others)
        assert len(shm.list_segments("ftmem.u.")) == 3
        first.segment.buf[:4] = b"keep"
        assert store.ready(0, first, 10_000) and bytes(first.segment.buf[:4]) == b"keep"  # big enough: kept
        old = first.segment.name
        _sized(store, [(0, first, 10 << 20)])  # a bigger snapshot: a new generation replaces it
        assert first.segment.size >= 10 << 20 and first.segment.name != old
        assert old not in shm.list_segments("ftmem.u.") and len(shm.list_segments("ftmem.u.")) == 3
    finally:
        store.close(unlink_all=True)
    assert shm.list_segments("ftmem.u.") == []


def test_a_reserved_buffer_needed_early_is_created_once(tmp_path, monkeypatch):
    """Reservations are created one at a time in the background; a buffer needed before its reservation ran
    is created at once instead (the reservation is cancelled). Either way every buffer ends up with exactly one
    segment: none leaked by a cancelled or superseded creation."""
    from ftmem.smp.buffers import BufferStore

    monkeypatch.setenv("FTMEM_SHM_DIR", str(tmp_path))
    store = BufferStore("ftmem.r.", 4)
    try:
        bufs = store.of(0).buffers
        store.reserve(0, 32 << 20)  # b0 starts; b1..b3 queue behind it
        _sized(store, [(0, bufs[3], 32 << 20)])
        assert bufs[3].segment is not None
        _sized(store, [(0, b, 32 << 20) for b in bufs])
        assert sorted(shm.list_segments("ftmem.r.")) == sorted(b.segment.name for b in bufs)
    finally:
        store.close(unlink_all=True)
    assert shm.list_segments("ftmem.r.") == []


def test_when_ready_returns_at_once_and_calls_back_from_the_event_loop(tmp_path, monkeypatch):
    """A rebuild or a moved rank's fetch asks for its buffers with `when_ready`, which never waits for a creation
    (one of gigabytes takes seconds, and the event loop serves the node's ranks and the peers' heartbeats): the
    loop's `run_ready` calls back once every buffer is ready, or with the creation's error (a full /dev/shm)."""
    from ftmem.smp.buffers import BufferStore

    monkeypatch.setenv("FTMEM_SHM_DIR", str(tmp_path))
    gate, create = threading.Event(), shm.Segment.create
    monkeypatch.setattr(shm.Segment, "create", classmethod(lambda cls, *a: create(*a) if gate.wait(30) else None))
    store = BufferStore("ftmem.w.", 2)
    try:
        a, b = store.of(0).buffers
        calls: list = []
        store.when_ready([(0, a, 10_000), (0, b, 10_000)], lambda: calls.append("ready"), calls.append)
        store.run_ready()
        assert calls == [] and a.segment is None and b.segment is None  # both being created, nobody waited
        gate.set()
        while not calls:
            _woken(store)
            store.run_ready()
        assert calls == ["ready"] and a.segment.size >= 10_000 and b.segment.size >= 10_000
        store.when_ready([(0, a, 10_000)], lambda: calls.append("at once"), calls.append)
        assert calls[-1] == "at once"  # nothing to create: called back before returning
        store.when_ready([(0, b, shm.available_bytes() + (1 << 30))], lambda: calls.append("wrong"), calls.append)
        while len(calls) < 3:
            _woken(store)
            store.run_ready()
        assert isinstance(calls[2], shm.ShmFullError) and len(calls) == 3, calls
    finally:
        store.close(unlink_all=True)
    assert shm.list_segments("ftmem.w.") == []


def test_a_failed_buffer_creation_is_reported_once_and_leaves_nothing(tmp_path, monkeypatch):
    """A segment that cannot fit is reported (ShmFullError, by the `ready` that asks for it after the creation
    failed), nothing is left in /dev/shm, and a smaller snapshot afterwards still gets its buffer. Releasing a
    rank or closing the store while creations run removes what they made."""
    from ftmem.smp.buffers import BufferStore

    monkeypatch.setenv("FTMEM_SHM_DIR", str(tmp_path))
    store = BufferStore("ftmem.f.", 2)
    try:
        buf = store.of(0).buffers[0]
        too_big = shm.available_bytes() + (1 << 30)
        assert not store.ready(0, buf, too_big)
        _woken(store)
        with pytest.raises(shm.ShmFullError, match="needs"):
            store.ready(0, buf, too_big)
        assert shm.list_segments("ftmem.f.") == []
        _sized(store, [(0, buf, 4096)])
        assert buf.segment is not None
        store.reserve(1, 4096)
        store.release(1)  # waits for rank 1's creations and removes their segments
        assert shm.list_segments("ftmem.f.") == [buf.segment.name]
        store.reserve(2, 4096)
    finally:
        store.close(unlink_all=True)
    assert shm.list_segments("ftmem.f.") == []


# ------------------------------------------------------------------------------------------------ peer directory

def test_the_peer_directory_costs_the_store_one_request_per_poll_once_every_node_published():
    """Every SMP of a job polls the rendezvous store (which torch's rendezvous depends on) every 0.5 s. A poll
    reads one short key; the peers' entries are read, in one request, only when a node (re)published. Before, a
    poll cost two requests per node: O(nodes^2) per poll interval across a job of hundreds of nodes."""
    from datetime import timedelta

    from torch.distributed import TCPStore

    from ftmem.smp.directory import Directory

    master = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10))
    calls: list[str] = []

    class Counted:
        def __init__(self, store) -> None:
            self._store = store

        def __getattr__(self, name: str):
            def call(*args):
                calls.append(name)
                return getattr(self._store, name)(*args)
            return call

    dirs = [Directory(f"127.0.0.1:{master.port}", "j", node, 3, 10.0) for node in range(3)]
    for d in dirs:
        d.connect()
    for d in dirs[1:]:
        d.publish(f"tcp://127.0.0.1:{5000 + d.node}", "first")
    watcher = dirs[0]
    watcher._store = Counted(watcher._store)
    seen = watcher.refresh(-1)
    assert watcher.snapshot() == {1: ("tcp://127.0.0.1:5001", "first"), 2: ("tcp://127.0.0.1:5002", "first")}
    calls.clear()
    for _ in range(5):
        seen = watcher.refresh(seen)
    assert calls == ["get"] * 5, calls  # nothing new: one request per poll, whatever the node count
    dirs[2].publish("tcp://127.0.0.1:6002", "replacement")
    seen = watcher.refresh(seen)
    assert watcher.snapshot()[2] == ("tcp://127.0.0.1:6002", "replacement")
    assert calls[5:] == ["get", "multi_get"], calls


# ------------------------------------------------------------------------------------------------ log throttle

def test_a_flood_of_warnings_is_logged_up_to_a_budget_then_counted():
    import logging

    from ftmem.log import Throttled

    lines, now = [], [0.0]

    class Capture(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.append(record.getMessage())

    logger = logging.getLogger(f"ftmem.test-throttle-{uuid.uuid4().hex}")
    logger.addHandler(Capture())
    logger.propagate = False
    t = Throttled(logger, "forgeries", burst=3, window_s=60.0, clock=lambda: now[0])
    for i in range(10):
        t.warning("forged %d", i)
    assert lines == ["forged 0", "forged 1", "forged 2"]
    now[0] = 59.0
    t.flush()
    assert len(lines) == 3  # the window is not over: nothing to say yet
    now[0] = 60.0
    t.flush()
    assert lines[3] == "7 more forgeries within 60s, not logged one by one"
    t.flush()
    t.warning("forged %d", 10)  # a new window: logged again
    assert lines[4:] == ["forged 10"]
    now[0] = 200.0
    t.flush()
    assert len(lines) == 5  # nothing was suppressed in that window


# ------------------------------------------------------------------------------------------------ peer addresses

def test_peer_addresses_of_ipv4_and_ipv6_hosts():
    """An SMP binds and publishes `tcp_address(peer_host, port)`; `endpoint_host_port` reads it back (the probe of
    a node id's holder). IPv6 literals travel in brackets; the default peer host is the local address routing to
    the rendezvous store, IPv4 for a name that has both (a store given as `[::1]:port` or `::1:port` is IPv6)."""
    from ftmem.smp.peer import default_peer_host, endpoint_host_port, tcp_address

    assert tcp_address("10.1.2.3", 5) == "tcp://10.1.2.3:5" and tcp_address("10.1.2.3") == "tcp://10.1.2.3"
    assert tcp_address("fd00::7", 5) == tcp_address("[fd00::7]", 5) == "tcp://[fd00::7]:5"
    for host in ("10.1.2.3", "fd00::7", "localhost"):
        assert endpoint_host_port(tcp_address(host, 29500)) == (host, 29500)
    assert default_peer_host("127.0.0.1:29500") == default_peer_host("localhost:29500") == "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
    except OSError:
        return  # no IPv6 loopback here
    assert default_peer_host("[::1]:29500") == default_peer_host("::1:29500") == "::1"


# ------------------------------------------------------------------------------------------------ SMP priority

_PRIORITY_CHILD = """
import json, os
from ftmem.smp.process import Priority

def effective():
    if p._autogroup:
        with open("/proc/self/autogroup") as f:
            return int(f.read().split()[-1])
    return os.getpriority(os.PRIO_PROCESS, 0)

p = Priority()
down = p.set(10)
after_down = effective()
up = False
for _ in range(50):  # the kernel allows one autogroup change per 100 ms
    up = p.set(0)
    if up:
        break
    import time; time.sleep(0.05)
print(json.dumps({"autogroup": p._autogroup, "down": down, "after_down": after_down, "up": up,
                  "after_up": effective()}))
"""


def test_smp_priority_goes_down_and_back_up_where_the_kernel_allows():
    """Run in a session of its own (as the SMP is), so that the test's own autogroup is untouched."""
    import json
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", _PRIORITY_CHILD], capture_output=True, text=True, timeout=60,
                         start_new_session=True)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["down"] and got["after_down"] == 10, got
    if got["autogroup"]:
        assert got["up"] and got["after_up"] == 0, got
    else:  # threads' nice: lowering is one way without CAP_SYS_NICE
        assert not got["up"] and got["after_up"] == 10, got


# ------------------------------------------------------------------------------------------ the round's pipeline


def test_pipeline_codes_two_batches_at_once_while_the_next_is_gathered_with_two_requests_ahead_at_most():
    import threading

    from ftmem.smp.protect import CODERS, pipelined

    assert CODERS == 2
    events: list[tuple[str, int]] = []
    lock = threading.Lock()
    gathered = {i: threading.Event() for i in range(6)}
    coding_started = {i: threading.Event() for i in range(6)}
    coding_now: set[int] = set()
    most_at_once = 0

    def note(what: str, i: int) -> None:
        with lock:
            events.append((what, i))

    def request(batch: int) -> int:
        note("request", batch)
        outstanding = {b for w, b in events if w == "request"} - {b for w, b in events if w == "gather"}
        assert len(outstanding) <= 2, f"more than two batches requested ahead: {sorted(outstanding)}"
        return batch

    def gather(handle: int) -> str:
        note("gather", handle)
        gathered[handle].set()
        return f"blocks of {handle}"

    def code(batch: int, got: str) -> None:
        nonlocal most_at_once
        assert got == f"blocks of {batch}"
        with lock:
            coding_now.add(batch)
            most_at_once = max(most_at_once, len(coding_now))
        coding_started[batch].set()
        if batch + 1 < 6:  # two coders: batch i+1 is gathered and starts coding while batch i is still coded
            assert gathered[batch + 1].wait(10), f"batch {batch + 1} was not gathered while {batch} was coded"
            assert coding_started[batch + 1].wait(10), f"batch {batch + 1} was not coded beside {batch}"
        with lock:
            coding_now.discard(batch)
        note("code", batch)

    pipelined(list(range(6)), request, gather, code)
    assert sorted(b for w, b in events if w == "code") == list(range(6))
    assert [b for w, b in events if w == "gather"] == list(range(6))
    assert most_at_once == 2  # overlapped, and never more than CODERS at once (memory in flight is bounded)
    for i in range(5):  # batch i+1 is requested before batch i is gathered (its peers serve meanwhile)
        assert events.index(("request", i + 1)) < events.index(("gather", i))


def test_pipeline_raises_what_coding_or_gathering_raised_and_does_nothing_for_no_batches():
    from ftmem.smp.protect import pipelined

    def fail_code(batch, got):
        if batch == 2:
            raise ValueError("zfec said no")

    with pytest.raises(ValueError, match="zfec said no"):
        pipelined([0, 1, 2, 3], lambda b: b, lambda h: h, fail_code)

    def fail_gather(handle):
        if handle == 1:
            raise TimeoutError("peer gone")
        return handle

    coded = []
    with pytest.raises(TimeoutError, match="peer gone"):
        pipelined([0, 1, 2], lambda b: b, fail_gather, lambda b, got: coded.append(b))
    assert coded == [0]  # what was gathered before the failure was still coded, nothing after it
    pipelined([], lambda b: pytest.fail("requested"), lambda h: h, lambda b, got: pytest.fail("coded"))


def test_lead_schedule_retries_a_failed_step_with_backoff_but_never_delays_a_newer_one():
    from ftmem.smp.cluster import RETRY_MAX_S, RETRY_S, LeadSchedule

    s = LeadSchedule()
    assert not s.due(None, 0.0)  # nothing committed yet
    assert s.due(5, 0.0)
    s.started(5)
    assert not s.due(5, 100.0), "a step led (and still running or succeeded) is not led again"
    assert s.finished(True, 1.0) is None and not s.due(5, 1000.0)

    s.started(6)
    assert s.finished(False, 10.0) == RETRY_S
    assert not s.due(6, 10.0 + RETRY_S / 2), "the failed step is retried only after the backoff"
    assert s.due(6, 10.0 + RETRY_S), "training stalled at step 6: the failed round must be led again"
    assert s.due(7, 10.0), "a newer committed step is led at once, backoff or not"
    delays = []
    for _ in range(8):  # keeps failing: the backoff doubles up to its bound
        s.started(6)
        delays.append(s.finished(False, 0.0))
    assert delays[:3] == [2 * RETRY_S, 4 * RETRY_S, 8 * RETRY_S] and delays[-1] == RETRY_MAX_S
    s.started(6)
    assert s.finished(True, 0.0) is None and s.failures == 0
    s.node_restarted()
    assert s.due(6, 0.0), "a node lost its parity: the newest step is protected again"
    for _ in range(4):  # rounds fail while a node is down ...
        s.started(6)
        s.finished(False, 0.0)
    s.node_restarted()  # ... and it comes back: led at once, and a failure then backs off from the start
    assert s.due(6, 0.0)
    s.started(6)
    assert s.finished(False, 0.0) == RETRY_S


# ------------------------------------------------------------------------------------------ parity re-adoption


def test_a_restarted_smp_takes_over_the_kept_parity_and_nothing_else():
    from ftmem.smp.parity import ParityStore

    prefix = f"ftmem-unit-{uuid.uuid4().hex[:8]}.n0."
    try:
        first = ParityStore(prefix)
        assert first.adopted == []
        for step, byte in ((4, b"o"), (5, b"p")):
            first.write(first.work(step, 8192), 0, byte * 8192)
            first.promote(step, f"meta of step {step}".encode())
        first.retain({5})  # the next round started: the step before goes
        busy = first.work(6, 8192)  # a round in progress when the SMP dies
        first.write(busy, 0, b"x" * 100)
        del first  # killed: nothing closed or unlinked

        second = ParityStore(prefix)
        assert second.adopted == [(5, b"meta of step 5")]
        assert second.kept_steps() == [5] and second.read(5, 0, 8192) == b"p" * 8192
        assert len(shm.list_segments(f"{prefix}parity")) == 1, "the unfinished round's slot must be removed"
        second.write(second.work(7, 8192), 0, b"q" * 8192)
        second.promote(7, b"meta of step 7")
        del second

        third = ParityStore(prefix)
        assert third.adopted == [(7, b"meta of step 7"), (5, b"meta of step 5")], "both kept steps are taken over"
        assert third.read(5, 0, 4) == b"pppp" and third.read(7, 0, 4) == b"qqqq"
        with pytest.raises(RuntimeError, match="no free parity slot"):
            third.work(8, 8192)
        third.retain(set())
        assert third.kept_steps() == [] and ParityStore(prefix).adopted == []

        fourth = ParityStore(prefix)
        fourth.promote(7, b"x")  # no round of step 7 in progress here: nothing recorded
        assert ParityStore(prefix).adopted == []
        with open(os.path.join(shm.shm_dir(), f"{prefix}protected.meta"), "wb") as f:
            f.write(b"\xc1 not msgpack")
        assert ParityStore(prefix).adopted == [], "a garbled record is ignored"
        ParityStore(prefix).close(unlink_all=True)
    finally:
        for name in shm.list_segments(prefix):
            shm.unlink(name)
    assert shm.list_segments(prefix) == []


def test_a_kept_parity_slot_is_never_claimed_by_a_round():
    """The protected step and the one before stay readable until the Cluster stops retaining one; a round then
    takes that slot, never a kept one."""
    from ftmem.smp.parity import ParityStore

    prefix = f"ftmem-unit-{uuid.uuid4().hex[:8]}.n0."
    store = ParityStore(prefix)
    try:
        for step, byte in ((5, b"a"), (6, b"b")):
            store.write(store.work(step, 4096), 0, byte * 4096)
            store.promote(step, b"meta")
        assert store.kept_steps() == [6, 5]
        assert store.read(5, 0, 4) == b"aaaa" and store.read(6, 0, 4) == b"bbbb"
        store.retain({5})  # a round falls back to step 5, which every node keeps: 6's slot is free
        store.work(7, 4096)
        assert store.read(5, 0, 4) == b"aaaa"
        with pytest.raises(KeyError):
            store.read(6, 0, 4)
    finally:
        store.close(unlink_all=True)
    assert shm.list_segments(prefix) == []


def test_a_rebuild_takes_the_newest_step_every_surviving_member_keeps():
    """A leader died announcing step 6 to node 1 only: node 1 keeps 6 and 5, node 2 still 5 (and 4). Node 0 is
    rebuilt at 5. A member being rebuilt itself (no answer) does not count; with nothing in common, the newest.
    The job's other groups count too: told after this one, they may keep only the step before."""
    from ftmem.recovery.rebuild import newest_protected
    from ftmem.smp.protect import GroupMeta

    def meta(step: int) -> GroupMeta:
        return GroupMeta(step, 4, 1, 4096, (0, 1, 2, 3), ((), (), (), ()))

    class Link:
        def __init__(self, steps):
            self.steps = steps

        def request(self, op, timeout):
            assert op == "ec_status"
            return {}, [meta(s).pack() for s in self.steps]

    def newest(job_kept: set[int] | None = None, **kept) -> int | None:
        links = {int(k[1:]): Link(v) for k, v in kept.items()}
        found = newest_protected((0, 1, 2, 3), 0, links.get, 1.0, job_kept)
        return None if found is None else found.step

    assert newest(n1=[6, 5], n2=[5, 4], n3=[]) == 5
    assert newest(n1=[6, 5], n2=[6, 5], n3=[6, 5]) == 6
    assert newest(n1=[6], n2=[4]) == 6
    assert newest(n3=[]) is None
    assert newest({5}, n1=[6, 5], n2=[6, 5], n3=[6, 5]) == 5, "the other groups keep only step 5"
    assert newest({6, 5}, n1=[6, 5], n2=[6, 5], n3=[6, 5]) == 6
    assert newest({3}, n1=[6, 5], n2=[6, 5], n3=[6, 5]) == 6, "nothing in common with the job: the group's newest"


# ------------------------------------------------------------------------------------------------ fault drills


def test_a_stall_point_sleeps_at_its_point_only(monkeypatch):
    """FTMEM_STALL_AT slows every pass through the named points down (by sleeping), or with `#n` only the n-th,
    and nothing else."""
    from ftmem import faults

    slept: list[float] = []
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    monkeypatch.setattr(faults, "_passes", {})
    monkeypatch.delenv("FTMEM_CRASH_AT", raising=False)
    monkeypatch.setenv("FTMEM_STALL_AT", "smp_mid_encode=1.5, mid_copy=0.25, smp_ec_result_sent#3=9")
    for step in (3, 4):
        faults.fault_point("smp_mid_encode", step)
    faults.fault_point("mid_copy", 7, rank=1)
    faults.fault_point("before_local_commit", 7, rank=1)
    assert slept == [1.5, 1.5, 0.25]
    for step in range(5):
        faults.fault_point("smp_ec_result_sent", step)
    assert slept == [1.5, 1.5, 0.25, 9]
    monkeypatch.delenv("FTMEM_STALL_AT")
    faults.fault_point("smp_mid_encode", 5)
    assert slept == [1.5, 1.5, 0.25, 9]


def test_readoption_keeps_a_snapshot_over_a_blank_newer_generation_of_its_buffer(tmp_path, monkeypatch):
    """An SMP that died between creating a larger segment for a buffer and installing it leaves two generations.
    The newer is blank; the older may hold a snapshot the job still needs (the committed step): keep that one."""
    from ftmem.smp.buffers import BufferStore

    monkeypatch.setenv("FTMEM_SHM_DIR", str(tmp_path))
    payload = bytes(range(256)) * 16
    crcs = chunk_crcs(memoryview(payload), MIN_CHUNK)
    complete = Header(BufferState.COMPLETE, rank=0, world=1, step=7, epoch=1, payload_len=len(payload),
                      desc_off=0, desc_len=16, chunk_size=MIN_CHUNK, crcs=crcs)
    for blank_is_newer in (True, False):
        prefix = f"ftmem.g{int(blank_is_newer)}."
        snap, blank = ((f"{prefix}r0.b0.g1", f"{prefix}r0.b0.g2") if blank_is_newer else
                       (f"{prefix}r0.b0.g2", f"{prefix}r0.b0.g1"))
        for name, fill in ((snap, True), (blank, False)):
            seg = shm.Segment.create(name, HEADER_SIZE + len(payload))
            if fill:
                seg.buf[HEADER_SIZE: HEADER_SIZE + len(payload)] = payload
                packed = complete.pack()
                seg.buf[:len(packed)] = packed
            seg.close()
        store = BufferStore(prefix, 2)
        try:
            assert store.adopt() == 1
            buf = store.of(0).buffers[0]
            assert buf.header.step == 7 and buf.segment.name == snap, (blank_is_newer, buf.segment.name)
            assert shm.list_segments(prefix) == [snap]
        finally:
            store.close(unlink_all=True)
        assert shm.list_segments(prefix) == []
