"""SMP-to-SMP messages over zmq TCP: msgpack headers plus raw data frames, authenticated with a per-job secret.

Wire format, one zmq multipart message: ``[mac, header, *blobs]``. `mac` is a random 12-byte nonce followed by
the 16-byte tag of ChaCha20-Poly1305 (RFC 8439) with an empty plaintext and, as associated data, the header and
every blob, each preceded by its length as 8 little-endian bytes; the key is HKDF-SHA256 of the secret. That is
the standard AEAD used as a MAC: a one-time Poly1305 key per message, drawn from ChaCha20 under the job key and
the nonce. Poly1305 hashes the data frames of an erasure-coding round at about 2.3x keyed BLAKE3's and 3.5x
HMAC-SHA256's speed per core (bench/bench_mac.py), and every byte of a round is MAC'd twice (sender and
receiver). The header is a msgpack map with `op`, `id`, `job` and `from` checked against PEER_SCHEMA. A frame
with a wrong or missing MAC, for another job, oversized or malformed is dropped by the serving SMP with a log
line (a flood of unauthentic ones: see Cluster's use of `Throttled`), before any field of it is used; a reply
that fails authentication fails the request it answers (`PeerLink.result`). No pickle.
"""

from __future__ import annotations

import hmac
import itertools
import os
import socket
import threading
import time
from typing import Any, Callable, Sequence

import zmq
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.hashes import SHA256
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from cryptography.hazmat.primitives.poly1305 import Poly1305

from ftmem.smp.protocol import ProtocolError, decode, encode, loose_id

MAX_PEER_BYTES = 256 << 20
MAX_HEADER_BYTES = 4 << 20
MAC_CONTEXT = b"ftmem 2026-11 peer message MAC"
NONCE_BYTES, TAG_BYTES = 12, 16
GONE_CHECK_S = 0.5  # how often a waiting request asks whether its peer is still alive
CONNECT_PROBE_S = 2.0  # a host that neither accepts nor refuses a connection within this is taken for gone
_N = int  # readability of the schema below

PEER_SCHEMA: dict[str, dict[str, type]] = {
    # node state, sent on every change and as a heartbeat: [[rank, step, epoch], ...]
    "report": {"incarnation": str, "epoch": int, "committed": int, "protected": int, "previous": int,
               "rebuilding": bool, "complete": list},
    # erasure-coding rounds, driven by the group leader (like reports, they name the sender's incarnation: one
    # that was replaced, e.g. after a partition healed, is ignored)
    # (`round`: the leader's id of the round; `base`: the step every node keeps, -1: none)
    "ec_start": {"incarnation": str, "round": _N, "step": _N, "base": int},
    "ec_done": {"incarnation": str, "round": _N, "step": _N, "ok": bool, "detail": str},
    "ec_result": {"incarnation": str, "round": _N, "step": _N, "ok": bool},
    # reads served from shared memory (replies carry data as blobs)
    "manifest": {"step": _N},
    "data": {"step": _N, "ranges": list},         # [[offset, length], ...] of the node's data for step
    "parity": {"step": _N, "slots": list},        # slots of the node's parity buffer of protected step
    "ec_status": {},
    "payload": {"rank": _N, "step": _N, "offset": _N, "length": _N},
    "reply": {"ok": bool, "error": str, "body": bytes},
}


_SCHEMA = {op: {**fields, "job": str, "from": int} for op, fields in PEER_SCHEMA.items()}


def secret_id(secret: bytes) -> str:
    """A public name of a peer secret (HKDF, one-way): nodes compare it through the rendezvous store to tell a
    misconfigured secret at start, instead of rejecting each other's every message."""
    return HKDF(SHA256(), 8, salt=None, info=MAC_CONTEXT + b" secret id").derive(secret).hex()


class PeerAuthError(ValueError):
    """A peer message that failed authentication (or came from another job): dropped unanswered."""


class PeerCodec:
    """Signs and verifies peer messages of one job."""

    def __init__(self, secret: bytes, job: str, node: int) -> None:
        if len(secret) < 16:
            raise ValueError("ftmem: the peer secret must be at least 16 bytes")
        self._key = HKDF(SHA256(), 32, salt=None, info=MAC_CONTEXT).derive(secret)
        self.job = job
        self.node = node

    def _tag(self, nonce: bytes, parts: Sequence[bytes | memoryview]) -> bytes:
        """ChaCha20-Poly1305's tag for empty plaintext and associated data ``len(p) || p`` over `parts`, fed to
        Poly1305 piece by piece (no concatenated copy of the blobs)."""
        one_time_key = Cipher(algorithms.ChaCha20(self._key, bytes(4) + nonce), None).encryptor().update(bytes(32))
        mac, total = Poly1305(one_time_key), 0
        for p in parts:
            size = memoryview(p).nbytes
            mac.update(size.to_bytes(8, "little"))
            mac.update(p)
            total += 8 + size
        mac.update(bytes(-total % 16) + total.to_bytes(8, "little") + bytes(8))
        return mac.finalize()

    def pack(self, op: str, req_id: int, blobs: Sequence[bytes | memoryview] = (), **fields: Any) -> list:
        header = encode({"op": op, "id": req_id, "job": self.job, "from": self.node, **fields})
        nonce = os.urandom(NONCE_BYTES)
        return [nonce + self._tag(nonce, [header, *blobs]), header, *blobs]

    def unpack(self, frames: Sequence[bytes]) -> tuple[dict[str, Any], list[bytes]]:
        """Verify and decode ``[mac, header, *blobs]``: PeerAuthError for a message that is not authentic,
        ProtocolError for an authentic one that breaks the schema (its sender may be answered)."""
        if len(frames) < 2:
            raise PeerAuthError("truncated peer message (no header)")
        if sum(len(f) for f in frames) > MAX_PEER_BYTES:
            raise PeerAuthError(f"peer message larger than {MAX_PEER_BYTES} bytes")
        mac, header, blobs = bytes(frames[0]), bytes(frames[1]), list(frames[2:])
        if len(mac) != NONCE_BYTES + TAG_BYTES or not hmac.compare_digest(
                mac[NONCE_BYTES:], self._tag(mac[:NONCE_BYTES], [header, *blobs])):
            raise PeerAuthError("bad or missing MAC (wrong secret, or a corrupted or truncated frame)")
        msg = decode(header, _SCHEMA, MAX_HEADER_BYTES)
        if msg["job"] != self.job:
            raise PeerAuthError(f"message for job {msg['job']!r}, not {self.job!r}")
        return msg, blobs


class PeerLink:
    """Outgoing connection to one peer SMP. Not thread-safe: each thread owns its links.

    `gone` says the peer stopped heartbeating: a request waiting on it then fails within GONE_CHECK_S instead of
    waiting out its whole timeout."""

    def __init__(self, codec: PeerCodec, endpoint: str, gone: Callable[[], bool] = lambda: False) -> None:
        self.codec = codec
        self.endpoint = endpoint
        self.gone = gone
        self._ids = itertools.count(1)
        self._early: dict[int, tuple[dict[str, Any], list[bytes]]] = {}
        self._sock: zmq.Socket | None = None

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = peer_socket(zmq.DEALER, ipv6="[" in self.endpoint)  # see tcp_address
            self._sock.setsockopt(zmq.SNDHWM, 1000)
            self._sock.connect(self.endpoint)
        return self._sock

    def send(self, op: str, blobs: Sequence[bytes | memoryview] = (), **fields: Any) -> None:
        """Fire and forget (dropped if the peer is unreachable long enough to fill the queue)."""
        try:
            self._socket().send_multipart(self.codec.pack(op, 0, blobs, **fields), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            pass

    def request(self, op: str, timeout: float, **fields: Any) -> tuple[dict[str, Any], list[bytes]]:
        """Send a request and wait for its reply; TimeoutError on silence, RuntimeError on an error reply."""
        return self.result(self.submit(op, **fields), timeout)

    def submit(self, op: str, **fields: Any) -> tuple[int, str]:
        """Send a request without waiting, so several can be in flight (to one peer or many); see `result`."""
        req_id = next(self._ids)
        self._socket().send_multipart(self.codec.pack(op, req_id, **fields), copy=False)
        return req_id, op

    def result(self, request: tuple[int, str], timeout: float) -> tuple[dict[str, Any], list[bytes]]:
        """Wait for the reply to a submitted request. Results are collected in submission order: replies to later
        requests that arrive first are kept, those to earlier ones nobody collected (abandoned) are dropped.
        A reply that fails authentication fails the request at once (RuntimeError) instead of being waited
        out: only the peer answers on this connection, and it serves data without copying it (`NodeData.read`),
        so such a reply is most likely data its node rewrote while zmq was still sending it."""
        req_id, op = request
        for stale in [i for i in self._early if i < req_id]:
            del self._early[stale]
        if req_id in self._early:
            return self._checked(self._early.pop(req_id), op)
        sock = self._socket()
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if not sock.poll(int(min(left, GONE_CHECK_S) * 1000) + 1):
                if self.gone():
                    self.close()
                    raise TimeoutError(f"peer {self.endpoint} is gone (no heartbeat) while waiting for {op!r}")
                continue
            frames = [f.buffer for f in sock.recv_multipart(copy=False)]  # zmq's buffers: no copy
            try:
                msg, blobs = self.codec.unpack(frames)
            except ProtocolError:
                continue
            except PeerAuthError as exc:
                if 0 < loose_id(bytes(frames[1]) if len(frames) > 1 else b"") < req_id:
                    continue  # claims to answer an abandoned request (whose buffer may have been reused since)
                self.close()  # this link's replies cannot be told apart any more
                raise RuntimeError(f"peer {self.endpoint}'s reply to {op!r} failed authentication ({exc}): a frame "
                                   f"was corrupted, or the data changed while it was sent") from None
            if msg["op"] != "reply":
                continue
            if msg["id"] == req_id:
                return self._checked((msg, blobs), op)
            self._early[msg["id"]] = (msg, blobs)
        self.close()  # a late reply must not be taken for the next request's
        raise TimeoutError(f"peer {self.endpoint} did not answer {op!r} within {timeout:.0f}s")

    def _checked(self, reply: tuple[dict[str, Any], list[bytes]], op: str) -> tuple[dict[str, Any], list[bytes]]:
        if not reply[0]["ok"]:
            raise RuntimeError(f"peer {self.endpoint} refused {op!r}: {reply[0]['error']}")
        return reply

    def close(self) -> None:
        self._early.clear()
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None


def default_peer_host(store: str) -> str:
    """The local address that routes to the rendezvous store at `store` (host:port): loopback when the store is
    local. For a name with IPv4 and IPv6 addresses, IPv4 is preferred, and an address without a route skipped."""
    host = endpoint_host_port(store)[0] or "127.0.0.1"
    found, error = socket.getaddrinfo(host, 9, type=socket.SOCK_DGRAM), None
    for family, _, _, _, address in sorted(found, key=lambda a: a[0] != socket.AF_INET):
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                s.connect(address)  # UDP connect sends nothing
                return s.getsockname()[0]
        except OSError as exc:
            error = exc
    raise OSError(f"no local address routes to the rendezvous store's host {host!r}: {error}")


def tcp_address(host: str, port: int | None = None) -> str:
    """zmq's address of `host` (an IPv6 literal in brackets, given with or without them), and `port` if given."""
    host = host.strip("[]")
    address = f"tcp://[{host}]" if ":" in host else f"tcp://{host}"
    return address if port is None else f"{address}:{port}"


def endpoint_host_port(endpoint: str) -> tuple[str, int]:
    """(host without brackets, port) of `[tcp://]host:port`: the inverse of `tcp_address`, and the reading of the
    rendezvous store's address."""
    host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
    return host.strip("[]"), int(port)


def peer_socket(kind: int, ipv6: bool) -> zmq.Socket:
    """A socket of the peer protocol: nothing lingers at close, and no frame beyond the protocol's limit is
    taken in (zmq drops the connection instead of allocating it)."""
    sock = zmq.Context.instance().socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.IPV6, ipv6)
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_PEER_BYTES + 4096)  # per frame; `PeerCodec.unpack` bounds the message
    return sock


def serving_node(codec: PeerCodec, endpoint: str, timeout: float) -> int | None:
    """The node whose live SMP (of this job, with this secret) serves `endpoint`, or None: a refused TCP connection
    says None at once; one that is accepted must answer a signed request within `timeout`."""
    try:
        socket.create_connection(endpoint_host_port(endpoint), timeout=min(timeout, CONNECT_PROBE_S)).close()
    except OSError:
        return None
    link = PeerLink(codec, endpoint)
    try:
        return link.request("ec_status", timeout)[0]["from"]
    except (TimeoutError, RuntimeError):
        return None
    finally:
        link.close()


def new_incarnation() -> str:
    return f"{os.getpid()}-{time.time_ns()}"


class Links:
    """A thread's set of PeerLinks keyed by node, rebuilt when a node's endpoint changes."""

    def __init__(self, codec: PeerCodec) -> None:
        self.codec = codec
        self._links: dict[int, PeerLink] = {}
        self._lock = threading.Lock()

    def to(self, node: int, endpoint: str, gone: Callable[[], bool] = lambda: False) -> PeerLink:
        link = self._links.get(node)
        if link is None or link.endpoint != endpoint:
            if link is not None:
                link.close()
            link = self._links[node] = PeerLink(self.codec, endpoint, gone)
        link.gone = gone
        return link

    def close(self) -> None:
        for link in self._links.values():
            link.close()
        self._links.clear()
