"""ftmem: every-step in-memory snapshots of PyTorch training state, erasure-coded across nodes."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ftmem.snapshot.hook import Snapshotter

__all__ = ["Snapshotter"]


def __getattr__(name: str) -> Any:
    """Import the hook (and torch) only when asked for, so the SMP and the CLI start without torch."""
    if name == "Snapshotter":
        from ftmem.snapshot.hook import Snapshotter

        return Snapshotter
    raise AttributeError(f"module 'ftmem' has no attribute {name!r}")
