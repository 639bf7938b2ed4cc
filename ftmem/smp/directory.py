"""Finding the job's other SMPs through the rendezvous store that torchrun already runs.

Each SMP publishes its peer endpoint under `ftmem/<job>/smp/<node>` and polls for the others; a replacement
node publishes a new incarnation, which its peers pick up on the next poll. The same store carries the job's
peer secret when the user gave none (generated once by whichever SMP comes first): that is exactly as trusted
as the rendezvous itself; set FTMEM_SECRET (or --ftmem-secret-file) where the store network is not trusted.
"""

from __future__ import annotations

import secrets
import threading
from datetime import timedelta
from typing import TYPE_CHECKING

import msgpack

from ftmem.log import get_logger

if TYPE_CHECKING:
    from torch.distributed import TCPStore

log = get_logger("smp")


class StoreUnreachable(ConnectionError):
    """The rendezvous store did not answer within the timeout (not up yet, or unreachable)."""


class Directory:
    """Background thread publishing this SMP and collecting peers: node -> (endpoint, incarnation)."""

    def __init__(self, store_endpoint: str, job: str, node: int, nnodes: int, timeout: float) -> None:
        host, _, port = store_endpoint.rpartition(":")
        self._host, self._port = host.strip("[]") or "127.0.0.1", int(port)
        self._prefix = f"ftmem/{job}/"
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

    def start(self) -> None:
        threading.Thread(target=self._poll, name="ftmem-directory", daemon=True).start()

    def snapshot(self) -> dict[int, tuple[str, str]]:
        with self._lock:
            return dict(self.peers)

    def _poll(self) -> None:
        keys = {n: f"{self._prefix}smp/{n}" for n in range(self.nnodes) if n != self.node}
        while not self._stop.is_set():
            try:
                present = [n for n, k in keys.items() if self._store.check([k])]
                found = {n: tuple(msgpack.unpackb(self._store.get(keys[n]))) for n in present}
            except Exception as exc:  # the store host is gone: keep what we know, retry
                log.warning("peer directory: %s", exc)
                self._stop.wait(2.0)
                continue
            with self._lock:
                self.peers = found
            self._stop.wait(0.5)

    def stop(self) -> None:
        self._stop.set()
