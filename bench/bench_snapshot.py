"""Cost of ftmem's every-step snapshots to a training loop, against torch.distributed.checkpoint.async_save.

One plain ``python`` process (a gloo process group of size 1 on a FileStore; no torchrun), two training
states, everything measured side by side in the same run so that ratios stay meaningful on a noisy machine:

* ``example``: the GPT of ``examples/train_gpt.py`` (its ``Trainer``: DDP model, AdamW, scheduler, sampler,
  default arguments), stepped and snapshotted exactly as that script does.
* ``big``: a ~``--big-gb`` state: an MLP of square Linear layers with AdamW (parameters + two moments), trained
  with a real forward/backward whose batch is calibrated to take about ``--compute-ms``.

For each state it measures

1. **blocking per snapshot** of ftmem: wall time of ``snap.snapshot(step)`` plus the time the optimizer step
   pre-hook waits for that snapshot's copy in the next step (the hook's ``CopyEngine.wait_released`` is wrapped
   with a timer; no other ftmem code runs on the training thread). Steady state only: the first snapshots
   (layout plan, SMP segment allocation) are reported separately as warm-up.
2. **blocking per save** of DCP ``async_save`` (``get_state_dict`` of model + optimizer, default stager,
   ``FileSystemWriter`` into a temp dir on local disk, a separate gloo group as torchtitan does): wall time of
   ``get_state_dict`` + ``async_save`` plus the time spent waiting on the previous save's future before the
   next save, with one save per step in the same training loop. First save excluded as warm-up.
3. **copy bandwidth**: ``snap.snapshot(step); snap.wait()`` with no training in between; the copy phase
   (``CopyEngine._copy_tensors``: ``torch._foreach_copy_`` of every tensor into the SMP's shared memory), the
   checksum phase (``chunk_crcs``) and the prepare/commit round trips to the SMP are timed separately by
   wrapping them. The reference is the same per-tensor ``copy_`` of the same source tensors to the same
   offsets of an already-touched private buffer (and, as a diagnostic, of an already-touched shared anonymous
   mapping, i.e. shmem pages like /dev/shm), interleaved with the ftmem rounds. crc32c is also timed alone over
   the reference buffer with ftmem's chunk size.
4. **every-step overhead**: median step time of the same loop with a snapshot after every step vs without
   (blocks of steps alternating between the two modes; the first step of each block is a transition step
   excluded from the step statistics; before a block without snapshots the engine is drained untimed).

Run (about 3 minutes on 2 cores; ``--quick`` takes under a minute with a 0.25 GB state)::

    .venv/bin/python bench/bench_snapshot.py
    .venv/bin/python bench/bench_snapshot.py --quick

Every run uses its own FTMEM_JOB_ID per Snapshotter and a temporary FTMEM_RUNTIME_DIR; the self-started SMP
exits when the Snapshotter closes, and the bench checks that it did and that no /dev/shm segment is left.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import mmap
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

ROOT = Path(__file__).resolve().parent.parent
perf = time.perf_counter


# ----------------------------------------------------------------------------------------------------- helpers


def ms(x: float) -> str:
    return f"{x * 1e3:.3f}" if x < 0.01 else f"{x * 1e3:.1f}"


def gbs(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mean(xs: list[float]) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def load_example():
    spec = importlib.util.spec_from_file_location("ftmem_example_train_gpt", ROOT / "examples" / "train_gpt.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# --------------------------------------------------------------------------------------------------- workloads


@dataclass
class Workload:
    name: str
    model: nn.Module
    optimizer: torch.optim.Optimizer
    extra: dict
    step_fn: Callable[[], torch.Tensor]  # forward / backward / optimizer.step(); returns the loss
    after_fn: Callable[[torch.Tensor], object]  # what the loop does after snapshot() (overlaps the copy)
    note: str


def example_workload() -> Workload:
    mod = load_example()
    args = mod.parse_args(["--steps", "1000000"])  # long schedule: the lr stays sane however long we run
    trainer = mod.Trainer(args, dist.get_rank(), dist.get_world_size())
    n = sum(p.numel() for p in trainer.model.parameters())
    return Workload("example", trainer.model, trainer.optimizer,
                    {"scheduler": trainer.scheduler, "sampler": trainer.sampler},
                    trainer.step, trainer.mean_loss,
                    f"examples/train_gpt.py Trainer (default args: {args.layers} layers, dim {args.dim}, "
                    f"{n / 1e3:.0f}k params, AdamW, DDP world 1); loop body as in its main()")


def big_workload(gb: float, compute_ms: float) -> Workload:
    width = 4096 if gb >= 0.5 else 2048
    per_layer = 12 * (width * width + width)  # fp32 param + exp_avg + exp_avg_sq
    layers = max(1, round(gb * 1e9 / per_layer))
    mods: list[nn.Module] = []
    for i in range(layers):
        mods.append(nn.Linear(width, width))
        if i < layers - 1:
            mods.append(nn.ReLU())
    model = nn.Sequential(*mods)
    try:  # fused AdamW: ~6x faster than foreach on CPU, so the step is dominated by forward/backward
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
        kind = "fused"
    except (RuntimeError, TypeError, ValueError):
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, foreach=True)
        kind = "foreach"

    def fwd_bwd(x: torch.Tensor) -> torch.Tensor:
        loss = model(x).square().mean()
        loss.backward()
        return loss.detach()

    # Calibrate the batch so that forward + backward takes about compute_ms (a real one, not a sleep).
    probe = torch.randn(16, width)
    fwd_bwd(probe)
    per16 = math.inf
    for _ in range(3):  # best of 3: the compute speed of a quiet machine
        t = perf()
        fwd_bwd(probe)
        per16 = min(per16, perf() - t)
    model.zero_grad(set_to_none=True)
    batch = max(1, min(8192, round(16 * compute_ms / 1e3 / per16)))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, width, generator=gen)

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = fwd_bwd(x)
        optimizer.step()
        return loss

    n = sum(p.numel() for p in model.parameters())
    return Workload("big", model, optimizer, {}, step, lambda loss: None,
                    f"{layers} x Linear({width},{width}) MLP, {n / 1e6:.1f}M params, AdamW ({kind}); real "
                    f"forward/backward at batch {batch} (calibrated to ~{compute_ms:.0f} ms; "
                    f"{per16 / 16 * batch * 1e3:.0f} ms estimated)")


# ------------------------------------------------------------------------------------------ ftmem instrumentation


class Probe:
    """Times what the training thread spends inside ftmem, and the phases of the background copy."""

    current: "Probe | None" = None

    def __init__(self, snap) -> None:
        import ftmem.snapshot.copy as copymod

        self.snap = snap
        self.in_snapshot = False
        self.hook_wait = 0.0  # optimizer step pre-hook
        self.submit_wait = 0.0  # inside snapshot(): waiting for the previous snapshot's release
        self.copy: list[float] = []
        self.crc: list[float] = []
        self.rpc: dict[str, list[float]] = defaultdict(list)
        engine, client = snap._engine, snap._client
        orig_wait, orig_copy, orig_call = engine.wait_released, engine._copy_tensors, client.call

        def wait_released() -> None:
            t = perf()
            try:
                orig_wait()
            finally:
                if self.in_snapshot:
                    self.submit_wait += perf() - t
                else:
                    self.hook_wait += perf() - t

        def copy_tensors(job, payload) -> None:
            t = perf()
            orig_copy(job, payload)
            self.copy.append(perf() - t)

        def call(op, timeout=None, **fields):
            t = perf()
            try:
                return orig_call(op, timeout=timeout, **fields)
            finally:
                self.rpc[op].append(perf() - t)

        engine.wait_released = wait_released  # the pre-hook looks the method up on every call
        engine._copy_tensors = copy_tensors
        client.call = call
        self._copymod = copymod
        self._orig_crcs = copymod.chunk_crcs

        def chunk_crcs(payload, chunk):
            t = perf()
            out = self._orig_crcs(payload, chunk)
            self.crc.append(perf() - t)
            return out

        copymod.chunk_crcs = chunk_crcs
        Probe.current = self

    def snapshot(self, step: int) -> float:
        t = perf()
        self.in_snapshot = True
        try:
            self.snap.snapshot(step)
        finally:
            self.in_snapshot = False
        return perf() - t

    def detach(self) -> None:
        self._copymod.chunk_crcs = self._orig_crcs
        Probe.current = None


# ----------------------------------------------------------------------------------------------- SMP lifecycle


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # the self-started SMP is our child: reap it
        return done == 0
    except ChildProcessError:
        pass
    try:
        import psutil

        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except Exception:
        return False


class SmpGuard:
    """The SMP a Snapshotter started for one job id: its pid, and proof that it exited and left nothing."""

    def __init__(self, job: str) -> None:
        from ftmem.env import NodeEnv

        self.env = NodeEnv(job, 0)
        self.pid: int | None = None

    def record(self) -> None:
        with open(self.env.info_path) as f:
            self.pid = int(json.load(f)["pid"])

    def segments(self) -> list[str]:
        from ftmem.smp.shm import list_segments

        return list_segments(self.env.segment_prefix)

    def finish(self, timeout: float = 60.0) -> str:
        """Wait for the SMP to exit after every rank closed; force it (only our pid) if it does not."""
        deadline = perf() + timeout
        while self.pid is not None and _alive(self.pid) and perf() < deadline:
            time.sleep(0.05)
        forced = ""
        if self.pid is not None and _alive(self.pid):
            forced = " (did not exit after close(): sent shutdown)"
            with contextlib.suppress(Exception):
                from ftmem.smp.protocol import ControlClient

                c = ControlClient(self.env.control_address, timeout=5)
                c.call("shutdown", cleanup=True)
                c.close()
            end = perf() + 10
            while _alive(self.pid) and perf() < end:
                time.sleep(0.05)
            if _alive(self.pid):
                os.kill(self.pid, signal.SIGKILL)
                forced = " (did not exit: killed)"
        left = self.segments()
        if left:
            from ftmem.smp.shm import unlink

            for name in left:
                unlink(name)
            forced += f" (left {len(left)} segment(s) in /dev/shm: removed)"
        return ("SMP exited, no segments left" if not forced else "PROBLEM:" + forced)


# ------------------------------------------------------------------------------------------------ measurements


@dataclass
class Result:
    name: str
    note: str
    state_bytes: int = 0
    n_tensors: int = 0
    warm_blocking: list[float] = field(default_factory=list)
    warm_steps: list[float] = field(default_factory=list)
    pre_steps: list[float] = field(default_factory=list)  # plain steps before the Snapshotter exists
    blocks: list[tuple[bool, list[float]]] = field(default_factory=list)  # (snapshots on, step wall times)
    cpu_blocks: list[tuple[bool, list[float], float]] = field(default_factory=list)  # (on, train-thread CPU
    #                                                  time per step, process CPU time of all threads per step)
    snap_calls: list[float] = field(default_factory=list)  # snapshot() wall per snapshot (steady)
    submit_wait: float = 0.0
    hook_wait: float = 0.0
    n_snaps: int = 0
    step_on: list[float] = field(default_factory=list)
    step_off: list[float] = field(default_factory=list)
    bw: dict = field(default_factory=dict)
    dcp_call: list[float] = field(default_factory=list)
    dcp_wait: list[float] = field(default_factory=list)
    dcp_step: list[float] = field(default_factory=list)
    dcp_bytes: int = 0
    smp: str = ""


def process_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Stepper:
    def __init__(self) -> None:
        self.step = 0

    def next(self) -> int:
        s = self.step
        self.step += 1
        return s


def run_ftmem(work: Workload, res: Result, job: str, rounds: int, block: int, warm: int, bw_rounds: int) -> None:
    from ftmem import Snapshotter

    for _ in range(2):  # plain steps first: optimizer state exists and allocator/caches are warm
        t0 = perf()
        work.after_fn(work.step_fn())
        res.pre_steps.append(perf() - t0)
    os.environ["FTMEM_JOB_ID"] = job
    guard = SmpGuard(job)
    snap = Snapshotter(work.model, work.optimizer, extra=work.extra)
    probe = None
    try:
        guard.record()
        if snap.restore() != 0:
            raise RuntimeError("fresh job id restored a snapshot")
        probe = Probe(snap)
        steps = Stepper()

        # Warm-up: the first snapshots build the layout plan and make the SMP allocate (and this process map)
        # both buffers. Each warm-up step's wall time is kept too: one-time costs can slow training without
        # showing up as blocking.
        for i in range(warm + 1):
            h0, t0 = probe.hook_wait, perf()
            loss = work.step_fn()
            if res.warm_blocking:
                res.warm_blocking[-1] += probe.hook_wait - h0  # the hook waits for the previous snapshot
            if i < warm:
                res.warm_blocking.append(probe.snapshot(steps.next()))
            else:
                steps.next()
            work.after_fn(loss)
            res.warm_steps.append(perf() - t0)
        snap.wait()
        res.state_bytes = snap._plan.data_bytes
        res.n_tensors = len(snap._plan.entries)

        # Interleaved blocks with / without a snapshot after every step.
        hook_base, submit_base = probe.hook_wait, probe.submit_wait
        for r in range(rounds):
            for on in ((True, False) if r % 2 == 0 else (False, True)):
                times: list[float] = []
                tcpu: list[float] = []
                res.blocks.append((on, times))
                for i in range(block + 1):
                    if i == 1:
                        p0 = process_cpu()
                    t0, c0 = perf(), time.thread_time()
                    loss = work.step_fn()
                    if on:
                        res.snap_calls.append(probe.snapshot(steps.next()))
                    else:
                        steps.next()
                    work.after_fn(loss)
                    dt, dc = perf() - t0, time.thread_time() - c0
                    if i == 0:  # transition step: its hook may wait for the other block's last snapshot
                        if not on:
                            snap.wait()  # untimed: the OFF block starts with an idle engine
                        continue
                    (res.step_on if on else res.step_off).append(dt)
                    times.append(dt)
                    tcpu.append(dc)
                res.cpu_blocks.append((on, tcpu, (process_cpu() - p0) / block))
        loss = work.step_fn()  # its pre-hook waits for the last snapshot if the last block had snapshots
        steps.next()
        work.after_fn(loss)
        res.hook_wait = probe.hook_wait - hook_base
        res.submit_wait = probe.submit_wait - submit_base
        res.n_snaps = len(res.snap_calls)
        snap.wait()

        # Copy bandwidth: ftmem snapshot + wait vs the same copy_ into touched private / shmem buffers.
        res.bw = measure_bandwidth(work, snap, probe, steps, bw_rounds)
    finally:
        if probe is not None:
            probe.detach()
        snap.close()
        res.smp = guard.finish()


def measure_bandwidth(work: Workload, snap, probe: Probe, steps: Stepper, rounds: int) -> dict:
    from ftmem.smp.layout import chunk_size_for
    from ftmem.snapshot.capture import capture_state

    plan = snap._plan
    total = plan.data_bytes
    sources = [c.tensor.detach() for c in capture_state(0, work.model, work.optimizer, {})[0]]
    anon = torch.empty(total, dtype=torch.uint8)
    anon.fill_(1)  # touch every page
    shm_map = mmap.mmap(-1, total, flags=mmap.MAP_SHARED)  # shared anonymous = shmem pages, like /dev/shm
    shm = torch.frombuffer(shm_map, dtype=torch.uint8)
    shm.fill_(1)

    def pairs(buf: torch.Tensor):
        return [(buf[e.offset: e.offset + e.nbytes].view(s.dtype).view(s.shape), s)
                for e, s in zip(plan.entries, sources) if e.nbytes]

    anon_pairs, shm_pairs = pairs(anon), pairs(shm)

    def ref(ps) -> float:
        t = perf()
        for d, s in ps:
            d.copy_(s)
        return perf() - t

    out: dict[str, list[float]] = defaultdict(list)
    nc, nr = len(probe.copy), len(probe.crc)
    nrpc = {k: len(v) for k, v in probe.rpc.items()}
    for _ in range(rounds):
        out["memcpy_anon"].append(ref(anon_pairs))
        t = perf()
        probe.snapshot(steps.next())
        snap.wait()
        out["ftmem_total"].append(perf() - t)
        out["memcpy_shm"].append(ref(shm_pairs))
    out["ftmem_copy"] = probe.copy[nc:]
    out["ftmem_crc"] = probe.crc[nr:]
    out["prepare"] = probe.rpc["prepare"][nrpc.get("prepare", 0):]
    out["commit"] = probe.rpc["commit"][nrpc.get("commit", 0):]

    chunk = chunk_size_for(total)
    view = memoryview(anon.numpy())
    for _ in range(rounds):
        t = perf()
        probe._orig_crcs(view, chunk)
        out["crc_alone"].append(perf() - t)
    del view, anon_pairs, shm_pairs, shm
    shm_map.close()
    return {"bytes": total, "chunk": chunk, **{k: med(v) for k, v in out.items()},
            "copy_all": out["ftmem_copy"], "anon_all": out["memcpy_anon"]}


def run_dcp(work: Workload, res: Result, ckpt_root: str, saves: int, pg) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    prev_future, prev_dir = None, None
    for i in range(saves + 1):  # save 0 is warm-up
        t0 = perf()
        loss = work.step_fn()
        wait = 0.0
        if prev_future is not None:
            t = perf()
            prev_future.result()
            wait = perf() - t
            if prev_dir is not None and i >= 2:
                shutil.rmtree(os.path.join(ckpt_root, f"step{i - 2}"), ignore_errors=True)
        t = perf()
        msd, osd = get_state_dict(work.model, work.optimizer)
        ckpt = os.path.join(ckpt_root, f"step{i}")
        prev_future = dcp.async_save({"model": msd, "optim": osd}, checkpoint_id=ckpt, process_group=pg)
        call = perf() - t
        prev_dir = ckpt
        work.after_fn(loss)
        if i >= 1:
            res.dcp_call.append(call)
            res.dcp_wait.append(wait)
            res.dcp_step.append(perf() - t0)
    prev_future.result()
    res.dcp_bytes = sum(f.stat().st_size for f in Path(prev_dir).rglob("*") if f.is_file())
    shutil.rmtree(ckpt_root, ignore_errors=True)
    os.makedirs(ckpt_root, exist_ok=True)


# ------------------------------------------------------------------------------------------------------ report


def paired_overhead(blocks: list) -> float:
    """Median over rounds of (median step with snapshots / median step without) - 1; each round's two blocks
    ran back to back, so slow drifts of a shared machine's load cancel."""
    ratios = []
    for a, b in zip(blocks[0::2], blocks[1::2]):
        on, off = (a[1], b[1]) if a[0] else (b[1], a[1])
        ratios.append(med(on) / med(off))
    return med(ratios) - 1


def report(results: list[Result], args: argparse.Namespace, command: str, elapsed: float) -> None:
    print()
    print(f"command: {command}")
    print(f"machine: {os.cpu_count()} cores, torch {torch.__version__}, torch threads {torch.get_num_threads()}; "
          f"wall {elapsed:.0f}s; load average at start {args.load_start[0]:.2f}, at end {os.getloadavg()[0]:.2f} "
          f"(other processes compete for the {os.cpu_count()} cores when it exceeds ~1-2)")
    for r in results:
        print(f"state {r.name}: {r.note}; ftmem snapshot {r.state_bytes / 1e6:.1f} MB in {r.n_tensors} tensors")
    print()
    print("1+2. blocking per snapshot/save, steady state (ms; mean over all snapshots, median per snapshot call)")
    hdr = (f"{'state':8} {'ftmem snapshot()':>17} {'ftmem hook wait':>16} {'ftmem total':>12} "
           f"{'DCP call':>10} {'DCP fut wait':>13} {'DCP total':>10} {'ftmem/DCP':>10} {'ftmem/DCP call':>15}")
    print(hdr)
    for r in results:
        f_snap = sum(r.snap_calls) / r.n_snaps
        f_hook = r.hook_wait / r.n_snaps
        f_tot = f_snap + f_hook
        d_call, d_wait = mean(r.dcp_call), mean(r.dcp_wait)
        d_tot = d_call + d_wait
        print(f"{r.name:8} {ms(f_snap) + ' (' + ms(med(r.snap_calls)) + ')':>17} {ms(f_hook):>16} {ms(f_tot):>12} "
              f"{ms(d_call):>10} {ms(d_wait):>13} {ms(d_tot):>10} {100 * f_tot / d_tot:>9.2f}% "
              f"{100 * f_tot / d_call:>14.2f}%")
    print("   ftmem snapshot(): wall time of snap.snapshot(step) (capture of non-tensor state, descriptor, queueing;"
          " includes any wait for the previous copy)")
    print("   ftmem hook wait: time the optimizer-step pre-hook (CopyEngine.wait_released, wrapped with a timer) "
          "blocks on the snapshot's copy")
    print("   DCP call: get_state_dict + async_save until it returns (staging copy); DCP fut wait: waiting for the "
          "previous save's future right before the next save (one save per step, same loop)")
    for r in results:
        print(f"   {r.name}: snapshots timed {r.n_snaps}, DCP saves timed {len(r.dcp_call)} "
              f"({r.dcp_bytes / 1e6:.1f} MB on disk each)")
    print()
    print("3. background copy of one snapshot (median of rounds; no training in between)")
    print(f"{'state':8} {'bytes':>10} {'ftmem copy':>17} {'memcpy private':>17} {'copy/memcpy':>12} "
          f"{'memcpy shmem':>17} {'crc32c in ftmem':>17} {'crc32c alone':>17} {'prepare':>8} {'commit':>8} "
          f"{'snapshot+wait':>14}")
    for r in results:
        b = r.bw
        n = b["bytes"]

        def cell(key):
            return f"{ms(b[key])}ms {gbs(n, b[key]):5.2f}GB/s"

        print(f"{r.name:8} {n / 1e6:8.1f}MB {cell('ftmem_copy'):>17} {cell('memcpy_anon'):>17} "
              f"{100 * b['memcpy_anon'] / b['ftmem_copy']:>11.1f}% {cell('memcpy_shm'):>17} {cell('ftmem_crc'):>17} "
              f"{cell('crc_alone'):>17} {ms(b['prepare']):>6}ms {ms(b['commit']):>6}ms "
              f"{ms(b['ftmem_total']):>12}ms")
    print("   ftmem copy: CopyEngine._copy_tensors (_foreach_copy_ of every tensor into the SMP segment), wrapped;"
          " memcpy private/shmem: the same copy_ of the same tensors to the same offsets of an already-touched "
          "private buffer / shared anonymous mapping, interleaved with the ftmem rounds")
    print("   crc32c: ftmem's chunk_crcs over the payload (chunk "
          + ", ".join(f"{r.name} {r.bw['chunk'] >> 20} MiB" for r in results)
          + "); prepare/commit: SMP round trips; snapshot+wait: snapshot() to local commit")
    print()
    print("4. step time of the training loop, snapshot every step vs none (interleaved blocks)")
    print(f"{'state':8} {'no snapshot':>18} {'ftmem every step':>18} {'overhead':>9} {'pooled med':>11} "
          f"{'pooled mean':>12} {'train-thread CPU':>17} {'process CPU/step':>17} {'DCP every step':>18} "
          f"{'steps':>9}")
    for r in results:
        cpu_on = mean([c for on, _, c in r.cpu_blocks if on])
        cpu_off = mean([c for on, _, c in r.cpu_blocks if not on])
        print(f"{r.name:8} {ms(med(r.step_off)) + ' (' + ms(mean(r.step_off)) + ')':>18} "
              f"{ms(med(r.step_on)) + ' (' + ms(mean(r.step_on)) + ')':>18} "
              f"{100 * paired_overhead(r.blocks):>8.2f}% "
              f"{100 * (med(r.step_on) / med(r.step_off) - 1):>10.2f}% "
              f"{100 * (mean(r.step_on) / mean(r.step_off) - 1):>11.2f}% "
              f"{100 * paired_overhead([(on, t) for on, t, _ in r.cpu_blocks]):>16.2f}% "
              f"{ms(cpu_off) + ' -> ' + ms(cpu_on):>17} "
              f"{ms(med(r.dcp_step)) + ' (' + ms(mean(r.dcp_step)) + ')':>18} "
              f"{len(r.step_off):>4}+{len(r.step_on):<4}")
    print("   ms, median (mean); a step is forward/backward/optimizer step + snapshot() + the loop's after-step "
          "work. overhead: wall time, median over rounds of the ratio of the medians of a round's two adjacent "
          "blocks (drifting load of a shared machine cancels); pooled: over all steps. train-thread CPU: the same "
          "ratio for the CPU time of the training thread alone (excludes waiting for the GIL, for a core or for "
          "ftmem). process CPU/step: CPU time of all threads of this process per step without -> with snapshots "
          "(the copy thread's work needs a free core to be free). DCP: the same loop with get_state_dict + "
          "async_save every step")
    for r in results:
        base = med(r.step_off)
        extra = sum(r.warm_steps) - len(r.warm_steps) * base
        print(f"   {r.name}: warm-up steps (the first {len(r.warm_steps) - 1} take snapshots; SMP allocates and this "
              f"process maps both buffers): " + ", ".join(ms(x) for x in r.warm_steps)
              + f" ms vs {ms(base)} ms steady => {ms(extra)} ms once; blocking in them: "
              + ", ".join(ms(x) for x in r.warm_blocking) + " ms")
    print()
    print("targets: ftmem/DCP blocking < 5%, copy >= 80% of memcpy, every-step overhead < 5%")
    for r in results:
        f_tot = (sum(r.snap_calls) + r.hook_wait) / r.n_snaps
        checks = [("blocking ratio", 100 * f_tot / (mean(r.dcp_call) + mean(r.dcp_wait)), "<", 5),
                  ("copy/memcpy", 100 * r.bw["memcpy_anon"] / r.bw["ftmem_copy"], ">=", 80),
                  ("overhead", 100 * paired_overhead(r.blocks), "<", 5)]
        cells = []
        for label, v, op, target in checks:
            ok = v < target if op == "<" else v >= target
            cells.append(f"{label} {v:.2f}% {'PASS' if ok else 'FAIL'}")
        print(f"   {r.name:8} " + "; ".join(cells) + f"; {r.smp}")
    print(f"command: {command}")


# -------------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a < 60 s run: 0.25 GB state, fewer rounds")
    p.add_argument("--big-gb", type=float, default=None, help="size of the big state in GB (default 1.0; "
                   "0.25 with --quick)")
    p.add_argument("--compute-ms", type=float, default=None,
                   help="forward/backward time of the big state per step (default 300; 150 with --quick)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads for training (the example "
                   "script uses 1)")
    p.add_argument("--states", default="example,big", help="comma-separated subset of example,big")
    p.add_argument("--rounds", type=int, default=None, help="on/off rounds of the overhead loop (default: per state)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write every raw sample here")
    p.add_argument("--dcp-dir", default=None, help="parent dir for DCP checkpoints (default: system temp dir)")
    args = p.parse_args(argv)
    q = args.quick
    args.big_gb = args.big_gb if args.big_gb is not None else (0.25 if q else 1.0)
    args.compute_ms = args.compute_ms if args.compute_ms is not None else (150.0 if q else 300.0)
    args.plan = {  # per state: on/off rounds, steps per block, warm-up snapshots, bandwidth rounds, DCP saves
        "example": dict(rounds=8 if q else 16, block=8 if q else 10, warm=3, bw=5 if q else 9, dcp=8 if q else 15),
        "big": dict(rounds=2 if q else 6, block=3, warm=3, bw=3 if q else 5, dcp=3 if q else 4),
    }
    if args.rounds is not None:
        for plan in args.plan.values():
            plan["rounds"] = args.rounds
    args.states = [s for s in args.states.split(",") if s]
    for s in args.states:
        if s not in args.plan:
            p.error(f"unknown state {s!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.load_start = os.getloadavg()
    command = " ".join([os.path.relpath(sys.executable) if sys.executable.startswith(os.getcwd())
                        else sys.executable, *sys.argv])
    start = perf()
    torch.set_num_threads(args.threads)
    runtime = tempfile.mkdtemp(prefix="ftmem-bench-rt-")
    os.environ["FTMEM_RUNTIME_DIR"] = runtime
    ckpt_root = tempfile.mkdtemp(prefix="ftmem-bench-dcp-", dir=args.dcp_dir)
    store_file = os.path.join(runtime, "pg-store")
    dist.init_process_group("gloo", store=dist.FileStore(store_file, 1), rank=0, world_size=1)
    dcp_pg = dist.new_group(backend="gloo")  # async checkpointing gets its own group (as torchtitan does)
    base_job = f"bench-{os.getpid()}-{int(time.time())}"
    results: list[Result] = []
    try:
        for name in args.states:
            plan = args.plan[name]
            torch.manual_seed(0)
            t = perf()
            work = example_workload() if name == "example" else big_workload(args.big_gb, args.compute_ms)
            print(f"[{perf() - start:5.1f}s] {name}: built in {perf() - t:.1f}s: {work.note}", flush=True)
            res = Result(name, work.note)
            run_ftmem(work, res, f"{base_job}-{name}", plan["rounds"], plan["block"], plan["warm"], plan["bw"])
            print(f"[{perf() - start:5.1f}s] {name}: ftmem done ({res.smp})", flush=True)
            run_dcp(work, res, ckpt_root, plan["dcp"], dcp_pg)
            print(f"[{perf() - start:5.1f}s] {name}: DCP done", flush=True)
            results.append(res)
            del work
    finally:
        dist.destroy_process_group()
        shutil.rmtree(ckpt_root, ignore_errors=True)
        shutil.rmtree(runtime, ignore_errors=True)
    leftover = [n for n in os.listdir("/dev/shm") if n.startswith(f"ftmem.{base_job}")]
    if leftover:
        print(f"PROBLEM: segments left in /dev/shm: {leftover}")
    report(results, args, command, perf() - start)
    if args.json:
        from dataclasses import asdict

        with open(args.json, "w") as f:
            json.dump({"command": command, "results": [asdict(r) for r in results]}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
