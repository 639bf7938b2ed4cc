"""Failures that must end in a clear error, not a hang, a hidden cause or a dead SMP: a stuck request's
explanation reaches the rank, a damaged descriptor is reported as corruption, a self-started SMP that dies at
start fails its rank at once, a huge world size is refused, `ftmem clean` and `ftmem status` see through a
SIGKILLed SMP's leftovers, and a segment that cannot be created ends the wait for it, never the SMP."""

from __future__ import annotations

import errno
import fcntl
import os
import re
import signal
import struct
import time

import pytest
import torch

from conftest import Cluster, rank_identity
from ftmem.env import NodeEnv
from ftmem.recovery.restore import CorruptSnapshotError, RestoreError, load_segment, restore_rank
from ftmem.smp import shm
from ftmem.smp.layout import HEADER_SIZE, MIN_CHUNK, Descriptor, TensorEntry, chunk_crcs
from ftmem.smp.protocol import ControlClient, SmpError, SmpUnavailable
from ftmem.snapshot import connect as connect_mod

# ------------------------------------------------------------------------------------------------- helpers


def start_job(client: ControlClient, world: int, epoch: int = 1) -> None:
    """Register `world` ranks and open `epoch` from scratch, as a restore with nothing to restore does."""
    for rank in range(world):
        client.call("register", rank=rank, world=world, local_rank=rank, pid=1000 + rank)
    for rank in range(world):
        client.call("begin", rank=rank, step=-1, epoch=epoch)


def write_snapshot(client: ControlClient, rank: int, step: int, epoch: int, payload: bytes,
                   desc_off: int = 0, desc_len: int = 16) -> str:
    """Prepare, write `payload`, commit with its real checksums; returns the segment's name."""
    segment = client.call("prepare", **rank_identity(rank), rank=rank, step=step, epoch=epoch,
                          nbytes=HEADER_SIZE + len(payload))["segment"]
    seg = shm.Segment.open(segment, populate=False)
    try:
        seg.buf[HEADER_SIZE: HEADER_SIZE + len(payload)] = payload
    finally:
        seg.close()
    crcs = chunk_crcs(memoryview(payload), MIN_CHUNK)
    client.call("commit", rank=rank, step=step, epoch=epoch, payload_len=len(payload), desc_off=desc_off,
                desc_len=desc_len, chunk_size=MIN_CHUNK, crcs=struct.pack(f"<{len(crcs)}I", *crcs))
    return segment


def steps_of(client: ControlClient, rank: int) -> list[list[int]]:
    return client.call("available", rank=rank)["steps"]


# ----------------------------------------------------------------------------- a stuck request's explanation


def test_a_stuck_prepare_explains_itself_to_a_client_with_the_smps_own_timeout(cluster):
    """A rank's client and its SMP share FTMEM_TIMEOUT. The SMP answers a stuck `prepare` with the reason at
    its timeout, counted from receipt; the client must still be listening then, or the rank sees only "did not
    answer" instead of which rank holds the job back."""
    cluster.start_smp("--timeout", "2")
    c = cluster.client(timeout=2.0)
    start_job(c, world=2)
    for rank, step in ((0, 0), (1, 0), (0, 1)):
        write_snapshot(c, rank, step, 1, bytes(5000))
    start = time.monotonic()
    with pytest.raises(SmpError, match=r"waiting for step 1 to commit .* not completed it: \[1\]"):
        c.call("prepare", **rank_identity(0), rank=0, step=2, epoch=1, nbytes=HEADER_SIZE + 5000)
    assert time.monotonic() - start < 10


# ------------------------------------------------------------------------------------ a damaged descriptor


def _snapshot_payload(step: int) -> tuple[bytes, int, int]:
    """A real snapshot's payload (one tensor, then its descriptor): (payload, desc_off, desc_len)."""
    data = torch.arange(16, dtype=torch.float32).numpy().tobytes()
    entry = TensorEntry("model.w", "float32", (16,), 0, len(data), (16,), (0,))
    desc = Descriptor(step, 1, 0, 1, (entry,), b"").pack()
    return data + desc, len(data), len(desc)


def test_a_damaged_descriptor_is_reported_as_corruption_and_dropped(cluster):
    """A descriptor that no longer decodes is corruption like any other: CorruptSnapshotError naming rank and
    step (not the BufferError of a view left open), so the rank tells its SMP, which drops the snapshot and the
    next restart restores an older one instead of failing on the same step forever."""
    cluster.start_smp("--timeout", "30")
    c = cluster.client()
    start_job(c, world=1)
    payload, desc_off, desc_len = _snapshot_payload(0)
    seg0 = write_snapshot(c, 0, 0, 1, payload, desc_off, desc_len)
    tensors, _, _ = load_segment(seg0, 0, 0)
    assert torch.equal(tensors["model.w"], torch.arange(16, dtype=torch.float32))
    # step 1: the rank wrote a descriptor that does not decode (its checksums match)
    garbage = payload[:desc_off] + b"\xc1" * desc_len
    seg1 = write_snapshot(c, 0, 1, 1, garbage, desc_off, desc_len)
    with pytest.raises(CorruptSnapshotError, match=r"snapshot of step 1 for rank 0 is corrupt: unreadable snapshot "
                                                   r"descriptor"):
        load_segment(seg1, 0, 1)
    # step 0: its descriptor damaged in memory after the commit (its checksums no longer match)
    seg = shm.Segment.open(seg0, populate=False)
    try:
        seg.buf[HEADER_SIZE + desc_off] = 0xC1
    finally:
        seg.close()
    with pytest.raises(CorruptSnapshotError, match=r"snapshot of step 0 for rank 0 is corrupt: checksum mismatch in "
                                                   r"1 chunk\(s\); unreadable snapshot descriptor"):
        load_segment(seg0, 0, 0)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(RestoreError, match=r"CorruptSnapshotError: .*step 1 for rank 0 is corrupt"):
        restore_rank(c, 0, 1, 0, model, torch.optim.SGD(model.parameters(), lr=0.1), {})
    assert steps_of(c, 0) == [[0, 1]]  # the SMP was told: step 1 is gone, a restart tries step 0


@pytest.mark.parametrize("entry, says", [
    (("float32", (17,), 0, 64), r"tensor 'model.w' of shape \(17,\) and torch.float32 cannot fill 64 bytes"),
    (("load", (16,), 0, 64), r"tensor 'model.w' has no dtype 'load'"),
    (("float32", (16,), 4096, 64), r"tensor 'model.w' at offset 4096 \(64 bytes\) lies outside the \d+-byte payload"),
    (("float32", (-16,), 0, 64), r"tensor 'model.w' of shape \(-16,\)"),
])
def test_a_consistent_looking_but_wrong_descriptor_is_corruption(cluster, entry, says):
    """A descriptor that decodes and passes its checksums but does not fit its payload (a writer's bug): a clear
    CorruptSnapshotError naming the tensor, never a view that fails halfway and leaves the segment unclosable."""
    cluster.start_smp("--timeout", "30")
    c = cluster.client()
    start_job(c, world=1)
    data = bytes(64)
    dtype, shape, offset, nbytes = entry
    desc = Descriptor(0, 1, 0, 1, (TensorEntry("model.w", dtype, shape, offset, nbytes, shape, (0,)),), b"").pack()
    seg = write_snapshot(c, 0, 0, 1, data + desc, len(data), len(desc))
    with pytest.raises(CorruptSnapshotError, match=r"snapshot of step 0 for rank 0 is corrupt: " + says):
        load_segment(seg, 0, 0)


# ------------------------------------------------------------------------------ a self-started SMP's start


@pytest.fixture
def unmanaged(cluster, monkeypatch):
    """This process as a rank under plain `python`: no ftmem-run, the cluster's runtime directory."""
    monkeypatch.setenv("FTMEM_RUNTIME_DIR", str(cluster.runtime))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    for name in ("FTMEM_MANAGED", "FTMEM_SMP_ADDR", "FTMEM_SHM_DIR"):
        monkeypatch.delenv(name, raising=False)
    return NodeEnv(cluster.job, 0)


def test_a_self_started_smp_that_dies_at_start_fails_the_rank_at_once(cluster, unmanaged, monkeypatch):
    monkeypatch.setenv("FTMEM_SHM_DIR", str(cluster.tmp / "missing"))  # the SMP fails adopting its memory
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"exited with code 1 before answering; see (\S+\.smp\.log)") as info:
        connect_mod.connect(unmanaged, timeout=30.0)
    assert time.monotonic() - start < 20, "the rank waited out the start timeout"
    logfile = str(info.value).rsplit("see ", 1)[1]
    assert logfile == str(cluster.runtime / f"{cluster.job}.n0.smp.log")
    assert "FileNotFoundError" in cluster.smp_log(), cluster.smp_log()


def test_a_self_started_smp_that_finds_the_node_locked_is_waited_for(cluster, unmanaged, monkeypatch):
    """Exit code SMP_LOCKED means another rank's SMP won the race: the rank waits for that one to answer (here
    none does, so it times out naming the log) instead of failing."""
    monkeypatch.setattr(connect_mod, "START_TIMEOUT_S", 3.0)
    fd = os.open(unmanaged.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(SmpUnavailable, match=r"answered within 3s of starting one; see \S+\.smp\.log"):
            connect_mod.connect(unmanaged, timeout=30.0)
    finally:
        os.close(fd)
    assert "another SMP already serves" in cluster.smp_log(), cluster.smp_log()


# ----------------------------------------------------------------------------------------- a huge world


@pytest.mark.parametrize("fields, error", [
    (dict(rank=0, world=10**12), "field 'world' is out of range"),
    (dict(rank=0, world=(1 << 20) + 1), "field 'world' is out of range"),
    (dict(rank=1 << 21, world=1 << 20), "field 'rank' is out of range"),
])
def test_a_huge_world_is_refused_and_the_smp_keeps_serving(cluster, fields, error):
    """The SMP loops over the ranks of the job's world: a register of 10**12 ranks must be refused, not stall
    it (and with it every rank of the node)."""
    smp = cluster.start_smp("--timeout", "30")
    c = cluster.client(timeout=5.0)
    with pytest.raises(SmpError, match=error):
        c.call("register", local_rank=0, pid=1, **fields)
    assert c.call("ping", timeout=5.0)["pid"] == smp.pid
    start_job(c, world=1)
    write_snapshot(c, 0, 0, 1, bytes(5000))
    assert c.call("status", timeout=5.0)["committed"] == 0


# --------------------------------------------------------------------------- a SIGKILLed SMP's leftovers


def _cli(cluster: Cluster, *args: str) -> tuple[int, str]:
    proc = cluster.python(["-m", "ftmem.cli", *args], name=f"cli-{args[0]}-{len(cluster.procs)}")
    out = cluster.wait(proc, timeout=60)
    return proc.returncode, out


def test_clean_and_status_see_through_a_killed_smp(cluster):
    smp = cluster.start_smp("--timeout", "30")
    c = cluster.client()
    start_job(c, world=1)
    write_snapshot(c, 0, 0, 1, bytes(5000))
    cluster.wait_until(lambda: len(cluster.segments()) == 2, 30, "both buffers (one reserved in the background)")
    segments = cluster.segments()
    rc, out = _cli(cluster, "clean", "--job-id", cluster.job)
    assert rc == 1 and "is running; stop the job first" in out, out
    assert cluster.segments() == segments  # nothing of a running SMP is removed
    rc, out = _cli(cluster, "status", "--job-id", cluster.job)
    assert rc == 0 and re.search(rf"^{cluster.job} +0 +{smp.pid} +0 ", out, re.M), out  # node 0 committed step 0
    os.kill(smp.pid, signal.SIGKILL)
    smp.wait(timeout=30)
    env = NodeEnv(cluster.job, 0)
    paths = [cluster.runtime / os.path.basename(p) for p in (env.info_path, env.socket_path, env.lock_path)]
    assert all(p.exists() for p in paths)  # what the killed SMP left
    rc, out = _cli(cluster, "status", "--job-id", cluster.job)
    assert rc == 1 and "no running SMP" in out, out  # not a call to the dead SMP, waiting for its timeout
    rc, out = _cli(cluster, "clean", "--job-id", cluster.job)
    assert rc == 0 and f"removed {len(segments)} segment(s)" in out, out
    assert cluster.segments() == []
    assert not any(p.exists() for p in paths)


# ------------------------------------------------------------------------------ a segment that cannot exist


def _mmap_fails(*args, **kwargs):
    raise OSError(errno.ENOMEM, os.strerror(errno.ENOMEM))


def test_a_segment_that_cannot_be_mapped_is_removed_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("FTMEM_SHM_DIR", str(tmp_path))
    monkeypatch.setattr(shm.mmap, "mmap", _mmap_fails)  # as under a tight RLIMIT_AS, after posix_fallocate
    with pytest.raises(shm.ShmFullError, match=r"could not map the 8192 bytes of 'ftmem\.m\.n0\.r0\.b0\.g1'") as info:
        shm.Segment.create("ftmem.m.n0.r0.b0.g1", 8192)
    assert info.value.errno == errno.ENOMEM
    assert os.listdir(tmp_path) == []


def test_any_failed_segment_creation_ends_the_wait_not_the_smp(tmp_path, monkeypatch):
    """`run_ready` runs in the SMP's event loop: a creation that fails for any OS reason (a name taken, no
    address space to map it) is handed to whoever waits for it, and the store still serves afterwards."""
    import select

    from ftmem.smp.buffers import BufferStore

    def wait(wanted) -> list:
        calls: list = []
        store.when_ready(wanted, lambda: calls.append("ready"), calls.append)
        deadline = time.monotonic() + 30
        while not calls:
            assert time.monotonic() < deadline, "the creation never ended"
            select.select([store.wakeup_fd], [], [], 1.0)
            store.drain_wakeups()
            store.run_ready()
        return calls

    monkeypatch.setenv("FTMEM_SHM_DIR", str(tmp_path))
    (tmp_path / "ftmem.e.r0.b0.g1").write_bytes(b"someone else's")  # the name the first creation takes
    store = BufferStore("ftmem.e.", 2)
    try:
        a, b = store.of(0).buffers
        calls = wait([(0, a, 10_000)])
        assert len(calls) == 1 and isinstance(calls[0], FileExistsError), calls
        assert (tmp_path / "ftmem.e.r0.b0.g1").read_bytes() == b"someone else's"
        with monkeypatch.context() as m:
            m.setattr(shm.mmap, "mmap", _mmap_fails)
            calls = wait([(0, b, 10_000)])
        assert len(calls) == 1 and isinstance(calls[0], shm.ShmFullError) and "could not map" in str(calls[0])
        assert sorted(os.listdir(tmp_path)) == ["ftmem.e.r0.b0.g1"]  # the unmappable one was removed
        assert wait([(0, a, 10_000), (0, b, 10_000)]) == ["ready"]
    finally:
        store.close(unlink_all=True)
    assert shm.list_segments("ftmem.e.r0.b") == ["ftmem.e.r0.b0.g1"]
