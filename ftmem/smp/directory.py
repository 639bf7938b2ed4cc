"""Finding the job's other SMPs through the rendezvous store that torchrun already runs.

Each SMP publishes its peer endpoint under `ftmem/<job>/smp/<node>` and appends its node id to
`ftmem/<job>/published`; the others poll that one short key and read the entries (in one request) only when it
grew. Polling every entry instead would cost the store, which the rendezvous depends on, two requests per node
per poll on every node: a million a second for 500 nodes. A replacement node publishes a new incarnation, which
its peers pick up on the next poll. The same store carries the job's peer secret when the user gave none
(generated once by whichever SMP comes first): that is exactly as trusted as the rendezvous itself; set
FTMEM_SECRET (or --ftmem-secret-file) where the store network is not trusted.
"""

from __future__ import annotations

import secrets
import threading
from datetime import timedelta
from typing import TYPE_CHECKING

import msgpack

from ftmem.log import get_logger
from ftmem.smp.peer import endpoint_host_port

if TYPE_CHECKING:
    from torch.distributed import TCPStore

log = get_logger("smp")


class StoreUnreachable(ConnectionError):
    """The rendezvous store did not answer within the timeout (not up yet, or unreachable)."""


class Directory:
    """Background thread publishing this SMP and collecting peers: node -> (endpoint, incarnation)."""

    def __init__(self, store_endpoint: str, job: str, node: int, nnodes: int, timeout: float) -> None:
        host, self._port = endpoint_host_port(store_endpoint)
        self._host = host or "127.0.0.1"
        self._prefix = f"ftmem/{job}/"
        self._published = self._prefix + "published"  # node ids, 4 bytes each, appended at every publication
        self.node, self.nnodes, self.timeout = node, nnodes, timeout
        self.peers: dict[int, tuple[str, str]] = {}
        self._lock = threading.Lock()
        self._store: TCPStore | None = None
        self._stop = threading.Event()

    def connect(self) -> None:
        from torch.distributed import DistNetworkError, TCPStore  # only multi-node SMPs pay for importing torch

        try:
            self._store = TCPStore(self._host, self._port, is_master=False, timeout=timedelta(seconds=self.timeout),
                                   wait_for_workers=False)
        except DistNetworkError as exc:
            raise StoreUnreachable(str(exc).splitlines()[0]) from None  # (the rest is a C++ stack)
        self._store.append(self._published, b"")  # exists from now on: a get of it never waits

    def secret(self) -> bytes:
        """The job's shared secret, created by the first SMP that asks."""
        assert self._store is not None
        key = self._prefix + "secret"
        value = self._store.compare_set(key, "", secrets.token_hex(32))
        return bytes(value)

    def agree(self, settings: str) -> None:
        """Every node of a job must lay out the same EC groups and share its peer secret: the first SMP records
        its settings in the store, and an SMP whose settings differ raises instead of joining (its parity would
        not fit its group's; its messages would all be rejected)."""
        assert self._store is not None
        found = self._store.compare_set(self._prefix + "settings", "", settings).decode()
        if found != settings:
            raise ValueError(f"this node runs with {settings}, the job's other nodes with {found}: start every node "
                             f"with the same --nnodes, --ftmem-ec-group and --ftmem-ec-parity, and the same peer "
                             f"secret (FTMEM_SECRET or --ftmem-secret-file; `secret` is its public id)")

    def holder(self) -> tuple[str, str] | None:
        """(endpoint, incarnation) published for this node by an earlier SMP, if any."""
        assert self._store is not None
        key = f"{self._prefix}smp/{self.node}"
        return tuple(msgpack.unpackb(self._store.get(key))) if self._store.check([key]) else None

    def publish(self, endpoint: str, incarnation: str) -> None:
        assert self._store is not None
        self._store.set(f"{self._prefix}smp/{self.node}", msgpack.packb([endpoint, incarnation]))
        self._store.append(self._published, self.node.to_bytes(4, "little"))  # after the entry: it is there to read

    def start(self) -> None:
        threading.Thread(target=self._poll, name="ftmem-directory", daemon=True).start()

    def snapshot(self) -> dict[int, tuple[str, str]]:
        with self._lock:
            return dict(self.peers)

    def _poll(self) -> None:
        seen = -1
        while not self._stop.is_set():
            try:
                seen = self.refresh(seen)
            except Exception as exc:  # the store host is gone: keep what we know, retry
                log.warning("peer directory: %s", exc)
                self._stop.wait(2.0)
                continue
            self._stop.wait(0.5)

    def refresh(self, seen: int) -> int:
        """One poll: read the published node ids and, when they grew past `seen` bytes, every peer's entry; returns
        the new `seen`."""
        assert self._store is not None
        ids = self._store.get(self._published)
        if len(ids) != seen:
            nodes = sorted({int.from_bytes(ids[i: i + 4], "little") for i in range(0, len(ids) - 3, 4)}
                           & set(range(self.nnodes)) - {self.node})
            values = self._store.multi_get([f"{self._prefix}smp/{n}" for n in nodes]) if nodes else []
            found = {n: tuple(msgpack.unpackb(v)) for n, v in zip(nodes, values)}
            with self._lock:
                self.peers = found
        return len(ids)

    def stop(self) -> None:
        self._stop.set()
