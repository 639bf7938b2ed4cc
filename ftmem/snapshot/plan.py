"""The layout plan: a fixed offset in the payload for every snapshotted tensor.

Computed on the first snapshot and reused while names, dtypes and shapes stay the same, so steady-state
snapshots do no allocation and no bookkeeping beyond the copy itself.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ftmem.smp.layout import TensorEntry, align, pack_entries
from ftmem.snapshot.capture import Captured


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


class LayoutPlan:
    """Offsets of tensors in the payload; the descriptor follows the last tensor."""

    def __init__(self, tensors: Sequence[Captured]) -> None:
        entries, offset = [], 0
        for c in tensors:
            t = c.tensor
            nbytes = t.numel() * t.element_size()
            entries.append(TensorEntry(c.name, dtype_name(t.dtype), tuple(t.shape), offset, nbytes,
                                       tuple(t.shape), (0,) * t.dim()))
            offset = align(offset + nbytes)
        self.entries: tuple[TensorEntry, ...] = tuple(entries)
        self.packed_entries = pack_entries(self.entries)  # for every snapshot's descriptor
        self.data_bytes = offset
        self._signature = self.signature(tensors)

    @staticmethod
    def signature(tensors: Sequence[Captured]) -> tuple:
        return tuple((c.name, c.tensor.dtype, c.tensor.shape) for c in tensors)

    def matches(self, tensors: Sequence[Captured]) -> bool:
        return self._signature == self.signature(tensors)
