"""The SMP's control protocol against a real daemon (`python -m ftmem.smp`): whatever a client sends, a bad
request gets a clear error reply and changes nothing, and the daemon keeps serving; prepare/commit follow the
double-buffer rules of ftmem/smp/commit.py; shutdown and re-adoption handle the job's segments."""

from __future__ import annotations

import struct
import threading

import msgpack
import pytest
import zmq

from conftest import Cluster, rank_identity
from ftmem.smp.layout import HEADER_SIZE, MIN_CHUNK, Header, chunk_crcs
from ftmem.smp.protocol import MAX_CONTROL_BYTES, ControlClient, SmpError, SmpUnavailable, encode
from ftmem.smp.shm import Segment, available_bytes

# ------------------------------------------------------------------------------------------------- helpers


class Raw:
    """A bare zmq DEALER on the SMP's control socket: sends any frames, reads replies with a timeout."""

    def __init__(self, address: str) -> None:
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(address)

    def send(self, *frames: bytes) -> None:
        self.sock.send_multipart(list(frames))

    def recv(self, timeout: float = 5.0) -> dict | None:
        if not self.sock.poll(int(timeout * 1000)):
            return None
        return msgpack.unpackb(self.sock.recv(), raw=False)

    def request(self, data: bytes, timeout: float = 5.0) -> dict:
        self.send(data)
        reply = self.recv(timeout)
        assert reply is not None, f"no reply within {timeout}s to {data[:80]!r}"
        return reply

    def close(self) -> None:
        self.sock.close(0)


def assert_still_serving(cluster: Cluster, smp, raw: Raw | None = None) -> None:
    """`ping` and `status` answer on a fresh client (and on `raw` when given); the daemon is alive."""
    assert smp.poll() is None, f"the SMP exited with {smp.returncode}\n{cluster.logs()}"
    client = ControlClient(cluster.control_address(), timeout=10.0)
    try:
        assert client.call("ping")["pid"] == smp.pid
        st = client.call("status")
        assert st["ok"] is True and st["job"] == cluster.job and st["pid"] == smp.pid
    finally:
        client.close()
    if raw is not None:
        reply = raw.request(encode({"op": "ping", "id": 123456}))
        assert reply == {"id": 123456, "ok": True, "pid": smp.pid}


def write_snapshot(client: ControlClient, rank: int, step: int, epoch: int, payload: bytes, world: int = 8) -> int:
    """What a rank does for one snapshot: prepare, write the payload, commit with real checksums; returns the
    buffer index used."""
    reply = client.call("prepare", **rank_identity(rank, world), rank=rank, step=step, epoch=epoch,
                        nbytes=HEADER_SIZE + len(payload))
    commit(client, rank, step, epoch, reply["segment"], payload)
    return reply["buffer"]


def commit(client: ControlClient, rank: int, step: int, epoch: int, segment: str, payload: bytes) -> None:
    seg = Segment.open(segment, populate=False)
    try:
        seg.buf[HEADER_SIZE: HEADER_SIZE + len(payload)] = payload
    finally:
        seg.close()
    crcs = chunk_crcs(memoryview(payload), MIN_CHUNK)
    client.call("commit", rank=rank, step=step, epoch=epoch, payload_len=len(payload), desc_off=0,
                desc_len=min(16, len(payload)), chunk_size=MIN_CHUNK, crcs=struct.pack(f"<{len(crcs)}I", *crcs))


def payload_for(rank: int, step: int, n: int = 5000) -> bytes:
    return bytes((rank * 31 + step * 7 + i) % 251 for i in range(n))


def start_job(client: ControlClient, world: int, epoch: int = 1) -> None:
    """Register `world` ranks and open `epoch` from scratch, as a restore with nothing to restore does."""
    for rank in range(world):
        client.call("register", rank=rank, world=world, local_rank=rank, pid=1000 + rank)
    for rank in range(world):
        client.call("begin", rank=rank, step=-1, epoch=epoch)


def steps_of(client: ControlClient, rank: int) -> list[list[int]]:
    return client.call("available", rank=rank)["steps"]


# ------------------------------------------------------------------------------ malformed and hostile input


@pytest.fixture(scope="module")
def shared(module_cluster):
    """One SMP for the tests that must leave its state unchanged."""
    smp = module_cluster.start_smp("--timeout", "30")
    raw = Raw(module_cluster.control_address())
    yield module_cluster, smp, raw
    raw.close()


BAD_MESSAGES = [
    ("malformed msgpack", b"\xc1\x00\xff", -1, "undecodable"),
    ("truncated msgpack", encode({"op": "ping", "id": 5})[:-1], -1, "undecodable"),
    ("non-map", encode([1, 2, 3]), -1, "must be a map, got list"),
    ("string", encode("ping"), -1, "must be a map, got str"),
    ("unknown op", encode({"op": "frobnicate", "id": 11}), 11, "unknown op 'frobnicate'"),
    ("no op", encode({"id": 12}), 12, "unknown op None"),
    ("no id", encode({"op": "ping"}), -1, "'id' must be an int"),
    ("missing field", encode({"op": "register", "id": 13, "rank": 0, "world": 1, "local_rank": 0}), 13,
     "register: missing field 'pid'"),
    ("wrong type", encode({"op": "prepare", "id": 14, "rank": "0", "step": 0, "epoch": 0, "nbytes": 1}), 14,
     "prepare: field 'rank' must be int, got str"),
    ("bool for int", encode({"op": "prepare", "id": 15, "rank": 0, "step": 0, "epoch": 0, "nbytes": True}), 15,
     "prepare: field 'nbytes' must be int, got bool"),
    ("float for int", encode({"op": "available", "id": 16, "rank": 0.0}), 16,
     "available: field 'rank' must be int, got float"),
    ("int for bool", encode({"op": "shutdown", "id": 17, "cleanup": 1}), 17,
     "shutdown: field 'cleanup' must be bool, got int"),
    ("str for bytes", encode({"op": "commit", "id": 18, "rank": 0, "step": 0, "epoch": 0, "payload_len": 1,
                              "desc_off": 0, "desc_len": 1, "chunk_size": 1, "crcs": "abcd"}), 18,
     "commit: field 'crcs' must be bytes, got str"),
    ("extra field", encode({"op": "status", "id": 19, "verbose": True}), 19, r"status: unexpected fields ['verbose']"),
    ("over the limit", encode({"op": "ping", "id": 20, "pad": b"x" * (MAX_CONTROL_BYTES + 100)}), 20,
     f"exceeds the limit of {MAX_CONTROL_BYTES}"),
]


@pytest.mark.parametrize("data, req_id, error", [m[1:] for m in BAD_MESSAGES], ids=[m[0] for m in BAD_MESSAGES])
def test_bad_request_gets_a_clear_error_reply(shared, data, req_id, error):
    cluster, smp, raw = shared
    reply = raw.request(data)
    assert reply["ok"] is False and reply["id"] == req_id, reply
    assert error in reply["error"], reply
    assert_still_serving(cluster, smp, raw)


def test_bad_requests_change_nothing(shared):
    cluster, smp, raw = shared
    client = ControlClient(cluster.control_address(), timeout=10.0)
    try:
        before = client.call("status")
        for _, data, _, _ in BAD_MESSAGES:
            raw.request(data)
        after = client.call("status")
    finally:
        client.close()
    assert {k: v for k, v in after.items() if k != "id"} == {k: v for k, v in before.items() if k != "id"}
    assert cluster.segments() == []
    assert smp.poll() is None  # the bad `shutdown` did not stop it


def test_multi_frame_message_gets_an_error_reply(shared):
    cluster, smp, raw = shared
    raw.send(encode({"op": "ping", "id": 30}), encode({"op": "ping", "id": 31}))  # the router sees 3 frames
    reply = raw.recv(timeout=3.0)
    # the SMP must keep serving whatever happens...
    assert_still_serving(cluster, smp)
    # ...and a reply is possible (the sender's identity is known), so the sender must not be left waiting
    assert reply is not None, "a 3-frame message was dropped without an error reply"
    assert reply["ok"] is False and "frame" in reply["error"], reply


def test_message_beyond_the_socket_limit_leaves_the_smp_serving(shared):
    cluster, smp, _ = shared
    big = Raw(cluster.control_address())
    try:
        big.send(encode({"op": "ping", "id": 40, "pad": b"x" * (2 * MAX_CONTROL_BYTES)}))
        reply = big.recv(timeout=2.0)  # zmq's MAXMSGSIZE may drop the connection instead of delivering it
        if reply is not None:
            assert reply["ok"] is False and "exceeds the limit" in reply["error"], reply
    finally:
        big.close()
    assert_still_serving(cluster, smp)


def test_many_clients_and_pipelined_requests(shared):
    cluster, smp, _ = shared
    clients = [Raw(cluster.control_address()) for _ in range(5)]
    try:
        for i, c in enumerate(clients):
            for j in range(20):
                c.send(encode({"op": "ping", "id": i * 100 + j}))
        for i, c in enumerate(clients):
            ids = [c.recv()["id"] for _ in range(20)]
            assert ids == [i * 100 + j for j in range(20)]  # each client gets exactly its own replies
    finally:
        for c in clients:
            c.close()


# --------------------------------------------------------------------------- values the schema cannot check

OUT_OF_RANGE = {
    "rank outside the world": [("register", dict(rank=2, world=2, local_rank=0, pid=1))],
    "negative rank": [("prepare", dict(rank=-1, step=0, epoch=1, nbytes=HEADER_SIZE + 100))],
    "negative nbytes": [("prepare", dict(**rank_identity(0), rank=0, step=0, epoch=1, nbytes=-(1 << 30)))],
    "step beyond int64": [("prepare", dict(**rank_identity(0), rank=0, step=1 << 63, epoch=1,
                                           nbytes=HEADER_SIZE + 100))],
    "negative payload_len": [("prepare", dict(**rank_identity(0), rank=0, step=0, epoch=1, nbytes=HEADER_SIZE + 100)),
                             ("commit", dict(rank=0, step=0, epoch=1, payload_len=-4, desc_off=-8, desc_len=0,
                                             chunk_size=MIN_CHUNK, crcs=b"\0\0\0\0"))],
}


@pytest.mark.parametrize("calls", list(OUT_OF_RANGE.values()), ids=list(OUT_OF_RANGE))
def test_out_of_range_values_get_an_error_reply(cluster, calls):
    """Well-typed but impossible values: an error reply, never a dead SMP (which would take every rank's
    snapshots of the node offline and, under ftmem-run, crash again on each retry)."""
    smp = cluster.start_smp("--timeout", "30")
    client = cluster.client(timeout=3.0)
    start_job(client, world=1)
    *setup, (op, fields) = calls
    for setup_op, setup_fields in setup:
        client.call(setup_op, **setup_fields)
    try:
        with pytest.raises(SmpError):
            client.call(op, **fields)
    except SmpUnavailable:
        pass  # reported by the check below with the SMP's log
    assert smp.poll() is None, f"the SMP died on {op} {fields}:\n{cluster.output(smp)[-3000:]}"
    assert_still_serving(cluster, smp)


def test_snapshot_larger_than_shared_memory_is_refused_with_a_clear_error(cluster):
    """A rank whose snapshot cannot fit /dev/shm must learn why (ShmFullError's message), not time out."""
    smp = cluster.start_smp("--timeout", "30")
    client = cluster.client(timeout=3.0)
    start_job(client, world=1)
    nbytes = available_bytes() + (64 << 30)
    try:
        with pytest.raises(SmpError, match=r"needs \d+ bytes but .* has \d+ available"):
            client.call("prepare", **rank_identity(0), rank=0, step=0, epoch=1, nbytes=nbytes)
    except SmpUnavailable:
        pass
    assert smp.poll() is None, f"the SMP died on an oversized prepare:\n{cluster.output(smp)[-3000:]}"
    assert_still_serving(cluster, smp)
    assert cluster.segments() == []
    # the job is not wedged: a snapshot that fits is still accepted
    write_snapshot(client, 0, 0, 1, payload_for(0, 0))
    assert steps_of(client, 0) == [[0, 1]]


# ---------------------------------------------------------------------------------------- prepare / commit


def test_commit_of_a_step_never_prepared_is_refused(cluster):
    smp = cluster.start_smp("--timeout", "30")
    client = cluster.client()
    start_job(client, world=1)
    args = dict(payload_len=100, desc_off=0, desc_len=10, chunk_size=MIN_CHUNK, crcs=b"\0\0\0\0")
    with pytest.raises(SmpError, match="never prepared"):
        client.call("commit", rank=0, step=3, epoch=1, **args)
    # prepared in this epoch, committed under another: refused too
    client.call("prepare", **rank_identity(0), rank=0, step=0, epoch=1, nbytes=HEADER_SIZE + 100)
    with pytest.raises(SmpError, match="never prepared"):
        client.call("commit", rank=0, step=0, epoch=2, **args)
    with pytest.raises(SmpError, match="never prepared"):
        client.call("commit", rank=0, step=1, epoch=1, **args)
    assert steps_of(client, 0) == []
    assert client.call("status")["committed"] is None
    # a commit whose checksums do not cover the payload is refused as well
    with pytest.raises(SmpError, match="do not fit"):
        client.call("commit", rank=0, step=0, epoch=1, payload_len=2 * MIN_CHUNK, desc_off=0, desc_len=10,
                    chunk_size=MIN_CHUNK, crcs=b"\0\0\0\0")
    with pytest.raises(SmpError, match="malformed checksum table"):
        client.call("commit", rank=0, step=0, epoch=1, payload_len=100, desc_off=0, desc_len=10,
                    chunk_size=MIN_CHUNK, crcs=b"\0\0\0")
    assert steps_of(client, 0) == []
    # the real commit then succeeds, and repeating it is harmless (requests are idempotent)
    reply = client.call("prepare", **rank_identity(0), rank=0, step=0, epoch=1, nbytes=HEADER_SIZE + 100)
    commit(client, 0, 0, 1, reply["segment"], payload_for(0, 0, 100))
    commit(client, 0, 0, 1, reply["segment"], payload_for(0, 0, 100))
    assert steps_of(client, 0) == [[0, 1]]
    assert client.call("status")["committed"] == 0
    # a process of an older epoch is stale
    with pytest.raises(SmpError, match="stale"):
        client.call("prepare", **rank_identity(0), rank=0, step=1, epoch=0, nbytes=HEADER_SIZE + 100)
    assert_still_serving(cluster, smp)


def test_prepare_waits_until_the_previous_step_is_committed_on_all_ranks(cluster):
    """world=2, two buffers per rank: rank 0 may run one snapshot ahead of rank 1, never two."""
    smp = cluster.start_smp("--timeout", "60")
    c0, c1 = cluster.client(timeout=20.0), cluster.client(timeout=20.0)
    start_job(c0, world=2)
    b00 = write_snapshot(c0, 0, 0, 1, payload_for(0, 0))
    assert c0.call("status")["committed"] is None
    write_snapshot(c1, 1, 0, 1, payload_for(1, 0))
    assert c0.call("status")["committed"] == 0
    b01 = write_snapshot(c0, 0, 1, 1, payload_for(0, 1))
    assert b01 != b00
    assert c0.call("status")["committed"] == 0  # rank 1 has not completed step 1

    result: dict = {}

    def prepare_step_2():
        waiter = ControlClient(cluster.control_address(), timeout=20.0)
        try:
            result["reply"] = waiter.call("prepare", **rank_identity(0), rank=0, step=2, epoch=1,
                                          nbytes=HEADER_SIZE + len(payload_for(0, 2)))
        except Exception as exc:  # reported below
            result["error"] = exc
        finally:
            waiter.close()

    t = threading.Thread(target=prepare_step_2, daemon=True)
    t.start()
    t.join(1.2)
    assert t.is_alive(), f"prepare of step 2 returned while step 1 was not committed on rank 1: {result}"
    # both of rank 0's buffers are pinned (committed step 0, newest step 1), and they stay intact
    assert steps_of(c0, 0) == [[1, 1], [0, 1]]
    assert c0.call("status")["committed"] == 0  # the daemon serves others while rank 0 waits
    write_snapshot(c1, 1, 1, 1, payload_for(1, 1))
    t.join(15)
    assert not t.is_alive(), "prepare of step 2 still waits after step 1 committed on every rank"
    assert "error" not in result, result
    assert result["reply"]["buffer"] == b00  # step 0's buffer is reused; step 1 (now committed) is kept
    assert c0.call("status")["committed"] == 1
    assert steps_of(c0, 0) == [[1, 1]]
    commit(c0, 0, 2, 1, result["reply"]["segment"], payload_for(0, 2))
    assert steps_of(c0, 0) == [[2, 1], [1, 1]]
    assert c0.call("status")["committed"] == 1
    assert_still_serving(cluster, smp)


def test_a_waiting_request_resent_from_a_fresh_socket_is_answered_there(cluster):
    """ControlClient re-sends a request on a fresh socket after `retry_interval` of silence. When the original
    is still waiting in the SMP (a prepare held back by the slowest rank), the answer must go to the socket
    that asked last: the first one is closed, and nothing else would ever be answered until the next resend."""
    cluster.start_smp("--timeout", "60")
    c = cluster.client()
    start_job(c, world=2)
    write_snapshot(c, 0, 0, 1, payload_for(0, 0))
    write_snapshot(c, 1, 0, 1, payload_for(1, 0))
    write_snapshot(c, 0, 1, 1, payload_for(0, 1))
    request = encode({"op": "prepare", "id": 777, "rank": 0, "step": 2, "epoch": 1, "nbytes": HEADER_SIZE + 5000,
                      **rank_identity(0)})
    first, second = Raw(cluster.control_address()), Raw(cluster.control_address())
    try:
        first.send(request)
        assert first.recv(timeout=1.0) is None  # held back: rank 1 has not completed step 1
        first.close()                           # what ControlClient does before re-sending
        second.send(request)
        assert second.recv(timeout=0.5) is None
        write_snapshot(c, 1, 1, 1, payload_for(1, 1))
        reply = second.recv(timeout=5.0)
        assert reply is not None, "the answer went to the closed socket of the first attempt"
        assert reply["ok"] is True and reply["id"] == 777 and reply["buffer"] in (0, 1), reply
    finally:
        second.close()


def test_a_stuck_prepare_times_out_naming_the_missing_ranks(cluster):
    cluster.start_smp("--timeout", "2")
    c0, c1 = cluster.client(timeout=20.0), cluster.client(timeout=20.0)
    start_job(c0, world=3)
    for rank, c in ((0, c0), (1, c1), (2, c1)):
        write_snapshot(c, rank, 0, 1, payload_for(rank, 0))
    write_snapshot(c0, 0, 1, 1, payload_for(0, 1))
    write_snapshot(c1, 2, 1, 1, payload_for(2, 1))
    with pytest.raises(SmpError, match=r"waiting for step 1 to commit .* not completed it: \[1\]"):
        c0.call("prepare", **rank_identity(0), rank=0, step=2, epoch=1, nbytes=HEADER_SIZE + 5000)
    assert steps_of(c0, 0) == [[1, 1], [0, 1]]  # nothing was overwritten


def test_restart_opens_a_new_epoch_and_drops_the_abandoned_timeline(cluster):
    """What a restore does on the SMP: `begin` at the agreed step invalidates newer snapshots of the rank, and
    the previous epoch's processes are refused as stale."""
    cluster.start_smp("--timeout", "30")
    c = cluster.client()
    start_job(c, world=2)
    for step in range(3):
        for rank in range(2):
            write_snapshot(c, rank, step, 1, payload_for(rank, step))
    write_snapshot(c, 0, 3, 1, payload_for(0, 3))   # rank 1 died before completing step 3
    assert c.call("status")["committed"] == 2
    assert steps_of(c, 0) == [[3, 1], [2, 1]] and steps_of(c, 1) == [[2, 1], [1, 1]]
    for rank in range(2):
        c.call("register", rank=rank, world=2, local_rank=rank, pid=2000 + rank)
        reply = c.call("begin", rank=rank, step=2, epoch=2)
        assert reply["source"] == "local memory" and reply["segment"]
    assert steps_of(c, 0) == [[2, 1]]  # step 3 of the abandoned timeline is gone
    assert c.call("status")["committed"] == 2 and c.call("status")["epoch"] == 2
    with pytest.raises(SmpError, match="stale"):
        c.call("prepare", **rank_identity(1), rank=1, step=3, epoch=1, nbytes=HEADER_SIZE + 5000)
    for rank in range(2):
        write_snapshot(c, rank, 3, 2, payload_for(rank, 30))
    assert c.call("status")["committed"] == 3
    assert steps_of(c, 1) == [[3, 2], [2, 1]]


def test_a_refused_begin_changes_nothing(cluster):
    """`begin` of a step the rank does not hold is refused; like every refused request it must leave the
    snapshots, the committed step and the epoch as they were."""
    cluster.start_smp("--timeout", "30")
    c = cluster.client()
    start_job(c, world=1)
    for step in range(3):
        write_snapshot(c, 0, step, 1, payload_for(0, step))
    before = c.call("status")
    assert steps_of(c, 0) == [[2, 1], [1, 1]] and before["committed"] == 2
    with pytest.raises(SmpError, match="no snapshot of step 0"):
        c.call("begin", rank=0, step=0, epoch=2)
    after = c.call("status")
    assert steps_of(c, 0) == [[2, 1], [1, 1]], "a refused begin dropped snapshots"
    assert (after["committed"], after["epoch"]) == (before["committed"], before["epoch"])


# ------------------------------------------------------------------------------- shutdown and re-adoption


def test_a_snapshot_in_flight_survives_an_smp_restart(cluster):
    """ControlClient promises that an SMP restart is survived: a rank that prepared a step with the old SMP
    and commits it with the restarted one (which re-adopted the segments) must not be refused; otherwise any
    SMP crash between a prepare and its commit fails the rank and costs a restart of every worker."""
    smp = cluster.start_smp("--timeout", "30", name="smp1")
    c = cluster.client(timeout=15.0, retry_interval=1.0)
    start_job(c, world=1)
    for step in range(2):
        write_snapshot(c, 0, step, 1, payload_for(0, step))
    reply = c.call("prepare", **rank_identity(0), rank=0, step=2, epoch=1, nbytes=HEADER_SIZE + 5000)
    smp.kill()
    smp.wait(timeout=30)
    cluster.start_smp("--timeout", "30", name="smp2")
    commit(c, 0, 2, 1, reply["segment"], payload_for(0, 2))  # the copy finished while no SMP ran
    assert steps_of(c, 0) == [[2, 1], [1, 1]]
    assert c.call("status")["committed"] == 2


def test_an_smp_restarted_before_the_first_commit_learns_the_ranks_from_their_snapshots(cluster):
    """The ranks registered with an SMP that died before anything was committed; they never register again. The
    restarted SMP has no complete buffer to read the world size from, so it learns the world and the ranks from
    their `prepare`: steps commit again (before, `committed` stayed None for good, and a rank could reuse the
    buffer of a step the others still needed), and the status lists the ranks (the hang watchdog reads them)."""
    smp = cluster.start_smp("--timeout", "30", name="smp1")
    c = cluster.client(timeout=15.0, retry_interval=1.0)
    start_job(c, world=2)
    smp.kill()
    smp.wait(timeout=30)
    cluster.start_smp("--timeout", "30", name="smp2")
    for rank in range(2):
        write_snapshot(c, rank, 0, 1, payload_for(rank, 0), world=2)
    status = c.call("status")
    assert status["committed"] == 0, status
    assert sorted(status["ranks"]) == ["0", "1"] and status["ranks"]["1"]["pid"] == 1001, status["ranks"]


def test_shutdown_with_cleanup_removes_the_segments(cluster):
    smp = cluster.start_smp("--timeout", "30")
    c = cluster.client()
    start_job(c, world=2)
    for step in range(2):
        for rank in range(2):
            write_snapshot(c, rank, step, 1, payload_for(rank, step))
    assert len(cluster.segments()) == 4
    c.call("shutdown", cleanup=True)
    assert smp.wait(timeout=30) == 0
    assert cluster.segments() == []
    assert not (cluster.runtime / f"{cluster.job}.n0.json").exists()
    assert not (cluster.runtime / f"{cluster.job}.n0.sock").exists()


def test_shutdown_without_cleanup_keeps_segments_for_a_new_smp_to_readopt(cluster):
    smp = cluster.start_smp("--timeout", "30", name="smp1")
    c = cluster.client(timeout=10.0, retry_interval=1.0)
    start_job(c, world=2)
    for step in range(3):
        for rank in range(2):
            write_snapshot(c, rank, step, 1, payload_for(rank, step))
    c.call("shutdown", cleanup=False)
    assert smp.wait(timeout=30) == 0
    kept = cluster.segments()
    assert len(kept) == 4

    smp2 = cluster.start_smp("--timeout", "30", name="smp2")
    assert "re-adopted 4 verified snapshot(s)" in cluster.output(smp2)
    assert c.call("status")["committed"] == 2
    assert steps_of(c, 0) == [[2, 1], [1, 1]] and steps_of(c, 1) == [[2, 1], [1, 1]]
    assert cluster.segments() == kept

    # a snapshot damaged while no SMP watched is dropped at re-adoption, never served
    smp2.kill()
    smp2.wait(timeout=30)
    c.close()
    for name in kept:
        seg = Segment.open(name, populate=False)
        try:
            h = Header.unpack(seg.buf[:HEADER_SIZE])
            if (h.rank, h.step) == (1, 2):
                seg.buf[HEADER_SIZE + 100] ^= 0xFF
        finally:
            seg.close()
    smp3 = cluster.start_smp("--timeout", "30", name="smp3")
    out = cluster.output(smp3)
    assert "fails its checksums" in out and "rank 1 step 2" in out, out
    assert "re-adopted 3 verified snapshot(s)" in out
    assert steps_of(c, 1) == [[1, 1]]
    assert c.call("status")["committed"] == 1  # the newest step every rank still holds intact


def test_the_smp_does_not_load_the_trainer_side(tmp_path):
    """DESIGN §6: smp shares only the message schema and the shared-memory layout with snapshot. Importing
    the daemon must not pull in the hook and torch (seconds of CPU and hundreds of MiB per SMP start, on the
    critical path when ftmem-run restarts a dead SMP)."""
    import subprocess
    import sys

    code = ("import sys, ftmem.smp.daemon, ftmem.smp.__main__; "
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('ftmem.snapshot')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", f"the SMP imports {out.stdout.strip()}"
