"""ftmem: every-step in-memory snapshots of PyTorch training state, erasure-coded across nodes."""

from ftmem.snapshot.hook import Snapshotter

__all__ = ["Snapshotter"]
