"""The copy engine: moves a snapshot's tensor bytes into SMP-owned shared memory off the training path.

One background thread per rank runs each snapshot through prepare (the SMP picks a free buffer) -> copy ->
checksum -> local commit. On CPU the thread copies with `Tensor.copy_` (memcpy, GIL released). On CUDA it
issues device-to-host copies on a side stream into host memory registered with `cudaHostRegister`, so the
training stream only waits on a CUDA event, never the host. The optimizer step pre-hook calls
`wait_released()`: the only point where training can block.
"""

from __future__ import annotations

import os
import queue
import struct
import threading
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from ftmem.faults import fault_point
from ftmem.log import get_logger
from ftmem.smp.layout import HEADER_SIZE, chunk_crcs, chunk_size_for
from ftmem.smp.protocol import ControlClient
from ftmem.smp.shm import Segment
from ftmem.snapshot.plan import LayoutPlan

log = get_logger("copy")


@dataclass
class SnapshotJob:
    step: int
    epoch: int
    plan: LayoutPlan
    sources: list[torch.Tensor]
    descriptor: bytes
    ready: torch.cuda.Event | None = None  # CUDA: recorded on the training stream once sources are final
    released: threading.Event = field(default_factory=threading.Event)
    done: threading.Event = field(default_factory=threading.Event)
    copied: torch.cuda.Event | None = None  # CUDA: recorded on the side stream after the last copy

    @property
    def desc_off(self) -> int:
        return self.plan.data_bytes

    @property
    def payload_len(self) -> int:
        return self.plan.data_bytes + len(self.descriptor)


class _Mapping:
    """One SMP buffer mapped here, as a byte tensor over its payload (registered with CUDA when used)."""

    def __init__(self, name: str, cuda: bool) -> None:
        self.segment = Segment.open(name, populate=True)
        self.payload = torch.frombuffer(self.segment.buf, dtype=torch.uint8,
                                        count=self.segment.size - HEADER_SIZE, offset=HEADER_SIZE)
        self._views: tuple[LayoutPlan, list[torch.Tensor]] | None = None
        self._registered = False
        if cuda:
            _check(torch.cuda.cudart().cudaHostRegister(self.payload.data_ptr(), self.payload.numel(), 0))
            self._registered = True

    def views(self, plan: LayoutPlan) -> list[torch.Tensor]:
        """The destination of every non-empty tensor of `plan`, typed and shaped; made once per plan."""
        if self._views is None or self._views[0] is not plan:
            views = [self.payload[e.offset: e.offset + e.nbytes].view(getattr(torch, e.dtype)).view(e.shape)
                     for e in plan.entries if e.nbytes]
            self._views = (plan, views)
        return self._views[1]

    def close(self) -> None:
        self._views = None
        if self._registered:
            _check(torch.cuda.cudart().cudaHostUnregister(self.payload.data_ptr()))
        del self.payload
        self.segment.close()


def _check(rc) -> None:
    code = getattr(rc, "value", rc)
    if code != 0:
        raise RuntimeError(f"ftmem: CUDA host registration failed with cudaError {code}")


class CopyEngine:
    """Runs snapshot jobs in order on one worker thread; errors surface at the next call from training.

    `device` is the CUDA device of the model's parameters (None on CPU): the side stream, the host registrations
    and the worker thread's CUDA context belong to it, not to whatever device is current (0 in a new thread).
    """

    def __init__(self, client: ControlClient, rank: int, world: int, local_rank: int, device: torch.device | None,
                 timeout: float) -> None:
        self._client = client
        self._rank = rank
        self._identity = {"rank": rank, "world": world, "local_rank": local_rank, "pid": os.getpid()}
        self._device = device
        self._timeout = timeout
        self._stream = torch.cuda.Stream(device) if device is not None else None
        self._maps: dict[int, tuple[str, _Mapping]] = {}
        self._jobs: queue.Queue[SnapshotJob | None] = queue.Queue()
        self._last: SnapshotJob | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=f"ftmem-copy-r{rank}", daemon=True)
        self._thread.start()

    def submit(self, job: SnapshotJob) -> None:
        self.wait_released()
        self._last = job
        self._jobs.put(job)

    def wait_released(self) -> None:
        """Block until the newest snapshot no longer needs its sources unchanged (the optimizer may step)."""
        job = self._last
        if job is None:
            return
        self._wait(job.released, "copy the snapshot of step", job)
        if job.copied is not None:
            torch.cuda.current_stream(self._device).wait_event(job.copied)

    def drain(self) -> None:
        """Block until every submitted snapshot is committed locally."""
        if self._last is not None:
            self._wait(self._last.done, "commit the snapshot of step", self._last)

    def _wait(self, event: threading.Event, what: str, job: SnapshotJob) -> None:
        if not event.wait(self._timeout):
            self._raise_error()
            raise TimeoutError(f"ftmem: rank {self._rank} could not {what} {job.step} within {self._timeout:.0f}s "
                               f"(is the SMP alive? see its log)")
        self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"ftmem: snapshot failed on rank {self._rank}: {self._error}") from self._error

    def close(self) -> None:
        """Stop the worker and unmap the buffers; a worker that is still running may still copy into them, so
        they stay mapped then (the process is shutting down anyway)."""
        self._jobs.put(None)
        self._thread.join(self._timeout)
        if self._thread.is_alive():
            log.warning("rank %d: the copy thread did not stop within %.0fs; leaving its %d buffers mapped",
                        self._rank, self._timeout, len(self._maps))
            return
        with torch.cuda.device(self._device) if self._device is not None else nullcontext():
            for name, mapping in self._maps.values():
                try:
                    mapping.close()
                except Exception as exc:  # the others are still unmapped
                    log.warning("rank %d: could not unmap %s: %s", self._rank, name, exc)
        self._maps.clear()

    def _loop(self) -> None:
        if self._device is not None:
            try:
                torch.cuda.set_device(self._device)
            except BaseException as exc:  # surfaced to training by _raise_error
                self._error = exc
        while (job := self._jobs.get()) is not None:
            try:
                if self._error is None:
                    self._run(job)
            except BaseException as exc:  # surfaced to training by _raise_error
                self._error = exc
            finally:
                job.released.set()
                job.done.set()

    def _mapping(self, index: int, name: str) -> _Mapping:
        cached = self._maps.get(index)
        if cached is not None and cached[0] == name:
            return cached[1]
        if cached is not None:
            cached[1].close()
        mapping = _Mapping(name, self._device is not None)
        self._maps[index] = (name, mapping)
        return mapping

    def _run(self, job: SnapshotJob) -> None:
        reply = self._client.call("prepare", **self._identity, step=job.step, epoch=job.epoch,
                                  nbytes=HEADER_SIZE + job.payload_len)
        mapping = self._mapping(reply["buffer"], reply["segment"])
        self._copy_tensors(job, mapping.views(job.plan))
        payload = mapping.payload
        payload[job.desc_off: job.payload_len].copy_(torch.frombuffer(bytearray(job.descriptor), dtype=torch.uint8))
        chunk = chunk_size_for(job.payload_len)
        crcs = chunk_crcs(memoryview(payload.numpy())[: job.payload_len], chunk)
        fault_point("before_local_commit", job.step, self._rank)
        self._client.call("commit", rank=self._rank, step=job.step, epoch=job.epoch,
                          payload_len=job.payload_len, desc_off=job.desc_off, desc_len=len(job.descriptor),
                          chunk_size=chunk, crcs=struct.pack(f"<{len(crcs)}I", *crcs))
        fault_point("after_local_commit", job.step, self._rank)

    @torch.no_grad()
    def _copy_tensors(self, job: SnapshotJob, dsts: list[torch.Tensor]) -> None:
        srcs = [src for e, src in zip(job.plan.entries, job.sources) if e.nbytes]
        if self._stream is None:
            half = len(srcs) // 2  # one fused call per half: no per-tensor Python overhead, GIL released
            _foreach_copy(dsts[:half], srcs[:half])
            fault_point("mid_copy", job.step, self._rank)
            _foreach_copy(dsts[half:], srcs[half:])
            job.released.set()
            return
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(job.ready)
            _foreach_copy(dsts, srcs, non_blocking=True)
            job.copied = torch.cuda.Event(blocking=True)  # its synchronize() sleeps instead of spinning a core
            job.copied.record(self._stream)
        job.released.set()
        job.copied.synchronize()


def _foreach_copy(dsts: list[torch.Tensor], srcs: list[torch.Tensor], non_blocking: bool = False) -> None:
    """`torch._foreach_copy_`, which rejects empty lists: a snapshot may have a single tensor, or none."""
    if srcs:
        torch._foreach_copy_(dsts, srcs, non_blocking=non_blocking)
