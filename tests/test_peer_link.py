"""PeerLink, the requesting end of the peer protocol, against a hand-driven peer (a zmq ROUTER on loopback):
how it treats replies that fail authentication. Peers serve snapshot data straight from shared memory, so a
reply whose bytes changed after they were signed must fail its request at once, not be waited out."""

from __future__ import annotations

import time

import pytest
import zmq

from ftmem.smp.peer import PeerCodec, PeerLink, peer_socket

SECRET = b"s" * 32
TIMEOUT = 60.0  # what a request would wait for a reply that never comes; every case here must end far sooner


@pytest.fixture
def peer():
    """(link to the fake peer, the peer's ROUTER socket, the peer's codec)."""
    router = peer_socket(zmq.ROUTER, ipv6=False)
    port = router.bind_to_random_port("tcp://127.0.0.1")
    link = PeerLink(PeerCodec(SECRET, "job", 1), f"tcp://127.0.0.1:{port}")
    try:
        yield link, router, PeerCodec(SECRET, "job", 0)
    finally:
        link.close()
        router.close(0)


def _received(router: zmq.Socket) -> tuple[bytes, int]:
    """(identity, request id) of the next request reaching the peer."""
    assert router.poll(10_000), "the request did not reach the peer"
    identity, *frames = router.recv_multipart()
    msg, _ = PeerCodec(SECRET, "job", 0).unpack(frames)
    return identity, msg["id"]


def _reply(codec: PeerCodec, req_id: int, *blobs: bytes) -> list[bytes]:
    return codec.pack("reply", req_id, list(blobs), ok=True, error="", body=b"")


def _rewritten(frames: list[bytes]) -> list[bytes]:
    """`frames` with their first blob changed after signing: its buffer rewritten while zmq was sending it."""
    return [*frames[:2], b"B" + frames[2][1:], *frames[3:]]


@pytest.mark.parametrize("answer, error", [
    (lambda codec, req_id: _rewritten(_reply(codec, req_id, b"A" * 8)), "reply to 'data' failed authentication"),
    (lambda codec, req_id: _reply(PeerCodec(SECRET, "otherjob", 0), req_id, b"A" * 8), "for job 'otherjob'"),
    (lambda codec, req_id: [b"\0" * 28, b"\xc1 not msgpack"], "reply to 'data' failed authentication"),
], ids=["data changed after signing", "for another job", "no readable id"])
def test_a_reply_that_fails_authentication_fails_its_request_at_once(peer, answer, error):
    link, router, codec = peer
    request = link.submit("data", step=3, ranges=[[0, 8]])
    identity, req_id = _received(router)
    router.send_multipart([identity, *answer(codec, req_id)])
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=error):
        link.result(request, TIMEOUT)
    assert time.monotonic() - start < 10

    request = link.submit("data", step=3, ranges=[[0, 8]])  # the link connects afresh and serves again
    identity, req_id = _received(router)
    router.send_multipart([identity, *_reply(codec, req_id, b"A" * 8)])
    assert [bytes(b) for b in link.result(request, TIMEOUT)[1]] == [b"A" * 8]


def test_an_unauthentic_reply_to_an_abandoned_request_is_ignored(peer):
    """A request given up on (its round failed) may still be answered, from a buffer its node has rewritten
    since: that reply is dropped like any stale one, and the request waited for gets its own reply."""
    link, router, codec = peer
    link.submit("data", step=3, ranges=[[0, 8]])  # abandoned: never collected
    stale_identity, stale_id = _received(router)
    request = link.submit("data", step=4, ranges=[[0, 8]])
    identity, req_id = _received(router)
    router.send_multipart([stale_identity, *_rewritten(_reply(codec, stale_id, b"A" * 8))])
    router.send_multipart([identity, *_reply(codec, req_id, b"D" * 8)])
    assert [bytes(b) for b in link.result(request, TIMEOUT)[1]] == [b"D" * 8]
