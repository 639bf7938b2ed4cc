"""Control messages between ranks and their SMP: msgpack maps over zmq, checked against a schema.

Every request is a map with `op`, `id` and the fields its schema lists; every reply is `{"id", "ok": True, ...}`
or `{"id", "ok": False, "error": "..."}`. A malformed, oversized or unknown message gets an error reply and
never reaches the daemon's state. No pickle: msgpack carries only plain data.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from typing import Any, Mapping

import msgpack
import zmq

MAX_CONTROL_BYTES = 1 << 20
MAX_INT = 1 << 62  # well inside the int64 every header field holds
MAX_WORLD = 1 << 20  # ranks of a job: the SMP loops over them at every commit, and a huge world would stall it
INT_BOUNDS = {"world": MAX_WORLD + 1, "rank": MAX_WORLD, "local_rank": MAX_WORLD}  # exclusive; others: MAX_INT
NONE_AS_MINUS_ONE = frozenset({"step", "committed", "protected", "previous", "base"})  # -1: no step; others >= 0
# The SMP answers a request stuck for its timeout with the reason on a later tick (daemon.TICK_MS apart): a client
# with the same timeout waits this much longer, so that the rank gets that reason instead of "did not answer".
ANSWER_GRACE_S = 2.0

# op -> {field: type}. `int` never accepts a bool.
CONTROL_SCHEMA: dict[str, dict[str, type]] = {
    "ping": {},
    "status": {},
    "register": {"rank": int, "world": int, "local_rank": int, "pid": int},
    "available": {"rank": int},
    "begin": {"rank": int, "step": int, "epoch": int},
    "corrupt": {"rank": int, "step": int, "detail": str},
    # (prepare names the rank as register does: an SMP restarted since the rank's restore learns it from here)
    "prepare": {"rank": int, "step": int, "epoch": int, "nbytes": int, "world": int, "local_rank": int, "pid": int},
    "commit": {"rank": int, "step": int, "epoch": int, "payload_len": int, "desc_off": int, "desc_len": int,
               "chunk_size": int, "crcs": bytes},
    "close": {"rank": int},
    "shutdown": {"cleanup": bool},
}


class ProtocolError(ValueError):
    """A message that does not follow the schema."""


class SmpError(RuntimeError):
    """The SMP answered a request with an error."""


class SmpUnavailable(TimeoutError):
    """The SMP did not answer within the timeout."""


def encode(msg: Mapping[str, Any]) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def decode(data: bytes, schema: Mapping[str, Mapping[str, type]], max_bytes: int) -> dict[str, Any]:
    """Parse and validate one request; raise ProtocolError saying exactly what is wrong."""
    if len(data) > max_bytes:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        msg = msgpack.unpackb(data, raw=False, max_bin_len=max_bytes, max_str_len=max_bytes,
                              max_array_len=1 << 16, max_map_len=1 << 10, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise ProtocolError(f"undecodable message: {exc}") from exc
    if not isinstance(msg, dict):
        raise ProtocolError(f"message must be a map, got {type(msg).__name__}")
    op = msg.get("op")
    if op not in schema:
        raise ProtocolError(f"unknown op {op!r}")
    if type(msg.get("id")) is not int:
        raise ProtocolError("field 'id' must be an int")
    fields = schema[op]
    for name, typ in fields.items():
        if name not in msg:
            raise ProtocolError(f"{op}: missing field {name!r}")
        if type(msg[name]) is not typ:
            raise ProtocolError(f"{op}: field {name!r} must be {typ.__name__}, got {type(msg[name]).__name__}")
        low, high = -1 if name in NONE_AS_MINUS_ONE else 0, INT_BOUNDS.get(name, MAX_INT)
        if typ is int and not low <= msg[name] < high:
            raise ProtocolError(f"{op}: field {name!r} is out of range [{low}, {high}): {msg[name]}")
    extra = set(msg) - set(fields) - {"op", "id"}
    if extra:
        raise ProtocolError(f"{op}: unexpected fields {sorted(extra)}")
    return msg


def loose_id(data: bytes) -> int:
    """The request id of a message that failed validation, when one can be found (-1 otherwise)."""
    try:
        msg = msgpack.unpackb(data, raw=False)
    except Exception:  # whatever the bytes are, the answer is "no id"
        return -1
    return msg["id"] if isinstance(msg, dict) and type(msg.get("id")) is int else -1


_COUNTER = itertools.count()


def _request_id() -> int:
    """Unique among every client of an SMP (all processes, all clients of one process): the SMP keys requests
    that wait by id, and a retried request keeps its id."""
    return (os.getpid() << 32) | (next(_COUNTER) & 0xFFFFFFFF)


class ControlClient:
    """A rank's connection to its SMP: request/reply with retries, so an SMP restart is survived.

    Requests are idempotent on the SMP side, so on silence the request is re-sent on a fresh socket (an SMP that
    was restarted binds the same ipc path). Only a reply with the request's id is accepted. `timeout` is the SMP's
    own (FTMEM_TIMEOUT): a call under it waits ANSWER_GRACE_S longer for the SMP's explanation of a stuck request;
    a call's explicit `timeout` (a probe) is kept exactly.
    """

    def __init__(self, address: str, timeout: float = 300.0, retry_interval: float = 5.0) -> None:
        self.address = address
        self.timeout = timeout
        self.retry_interval = retry_interval
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._lock = threading.Lock()

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = self._ctx.socket(zmq.DEALER)
            self._sock.setsockopt(zmq.LINGER, 0)
            self._sock.connect(self.address)
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self._sock.close(0)
            self._sock = None

    def call(self, op: str, timeout: float | None = None, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its reply; SmpError on an error reply, SmpUnavailable on silence."""
        deadline = time.monotonic() + (self.timeout + ANSWER_GRACE_S if timeout is None else timeout)
        with self._lock:
            req_id = _request_id()
            payload = encode({"op": op, "id": req_id, **fields})
            while True:
                sock = self._socket()
                sock.send(payload)
                wait_until = min(deadline, time.monotonic() + self.retry_interval)
                while (left := wait_until - time.monotonic()) > 0:
                    if not sock.poll(int(left * 1000) + 1):
                        continue
                    reply = msgpack.unpackb(sock.recv(), raw=False)
                    if isinstance(reply, dict) and reply.get("id") == req_id:
                        if not reply.get("ok"):
                            raise SmpError(f"ftmem SMP at {self.address} refused {op!r}: {reply.get('error')}")
                        return reply
                self._reset()
                if time.monotonic() >= deadline:
                    raise SmpUnavailable(f"ftmem SMP at {self.address} did not answer {op!r} within "
                                         f"{self.timeout if timeout is None else timeout:.0f}s")

    def close(self) -> None:
        with self._lock:
            self._reset()
