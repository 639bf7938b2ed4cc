"""`Snapshotter`: the few lines a training loop adds to get every-step in-memory snapshots."""

from __future__ import annotations

import os
from typing import Mapping

import torch
import torch.distributed as dist

from ftmem.env import NodeEnv
from ftmem.recovery.restore import restore_rank
from ftmem.smp.layout import Descriptor
from ftmem.snapshot.capture import Stateful, capture_state, snapshot_device, unwrap
from ftmem.snapshot.connect import connect
from ftmem.snapshot.copy import CopyEngine, SnapshotJob
from ftmem.snapshot.plan import LayoutPlan


def _default_timeout() -> float:
    return float(os.environ.get("FTMEM_TIMEOUT", "300"))


class Snapshotter:
    """Snapshots model, optimizer, RNG and `extra` state into the node's SMP after optimizer steps.

    ::

        snap = Snapshotter(model, optimizer, extra={"scheduler": sched, "sampler": sampler})
        start = snap.restore()          # 0 on a fresh job; S+1 after restoring snapshot S
        for step in range(start, total_steps):
            ...forward / backward...
            optimizer.step()
            snap.snapshot(step)         # returns at once; the copy overlaps the next forward/backward
        snap.close()

    `model` may be wrapped in DDP. `extra` values need `state_dict()`/`load_state_dict()` returning plain data; an
    optimizer among them (a second one) waits for the copy before stepping, as `optimizer` does, since either may
    change the model's parameters. `every=N` snapshots only steps divisible by N. Works under `ftmem-run`,
    `torchrun` or plain `python`.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 extra: Mapping[str, Stateful] | None = None, every: int = 1, *,
                 timeout: float | None = None) -> None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self._model = unwrap(model)
        self._optimizer = optimizer
        self._extra = dict(extra or {})
        self._every = every
        self._timeout = _default_timeout() if timeout is None else timeout
        if dist.is_available() and dist.is_initialized():
            self._rank, self._world = dist.get_rank(), dist.get_world_size()
        else:
            self._rank, self._world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self._local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self._device = snapshot_device(self._model)
        self._client = connect(NodeEnv.from_env(), self._timeout)
        self._engine = CopyEngine(self._client, self._rank, self._world, self._local_rank, self._device,
                                  self._timeout)
        self._hooks = [o.register_step_pre_hook(lambda *_: self._engine.wait_released())
                       for o in (optimizer, *self._extra.values()) if isinstance(o, torch.optim.Optimizer)]
        self._plan: LayoutPlan | None = None
        self._epoch: int | None = None
        self._closed = False

    @property
    def rank(self) -> int:
        return self._rank

    def restore(self) -> int:
        """Load the newest snapshot every rank can restore; return the step to resume at (0 if none).

        Collective: every rank of the job must call it (after `init_process_group` when there are several). Called
        again mid-run, it first commits the snapshots still being copied: they would race the load, and be refused
        once it opened a new epoch.
        """
        self._check_open()
        self._engine.drain()
        result = restore_rank(self._client, self._rank, self._world, self._local_rank, self._model,
                              self._optimizer, self._extra)
        self._epoch = result.epoch
        return result.next_step

    def snapshot(self, step: int) -> None:
        """Snapshot the state after optimizer step `step`. Returns once the copy is queued."""
        self._check_open()
        if step % self._every:
            return
        if self._epoch is None:
            raise RuntimeError("ftmem: call Snapshotter.restore() once before the first snapshot() "
                               "(it returns the step to start at)")
        captured, meta = capture_state(step, self._model, self._optimizer, self._extra)
        if self._plan is None or not self._plan.matches(captured):
            self._plan = LayoutPlan(captured)
        sources = [c.tensor.detach().clone() if c.mutable_before_next_step else c.tensor for c in captured]
        descriptor = Descriptor(step, self._epoch, self._rank, self._world, self._plan.entries,
                                meta).pack(self._plan.packed_entries)
        ready = None
        if self._device is not None:  # the parameters' stream, which need not be the current device's
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self._device))
        self._engine.submit(SnapshotJob(step, self._epoch, self._plan, sources, descriptor, ready))

    def wait(self) -> None:
        """Block until every snapshot taken so far is committed to the SMP (e.g. before a planned exit)."""
        self._engine.drain()

    def close(self) -> None:
        """Finish pending snapshots and detach; the SMP keeps the snapshots."""
        if self._closed:
            return
        self._closed = True
        for handle in self._hooks:
            handle.remove()
        try:
            self._engine.drain()
        finally:
            self._engine.close()
            self._client.call("close", rank=self._rank)
            self._client.close()

    def _check_open(self) -> None:
        if self._closed:  # its copy thread is gone: a snapshot would wait out the timeout, blaming the SMP
            raise RuntimeError("ftmem: this Snapshotter was closed; create a new one to snapshot or restore again")

    def __enter__(self) -> "Snapshotter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
