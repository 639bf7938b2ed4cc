"""The copy path on CPU: snapshots with a single tensor or none through a real Snapshotter and SMP, closing the
copy engine, and the parameter checks that reject what the copy path cannot take before anything connects to an
SMP."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections import OrderedDict

import pytest
import torch

from ftmem.snapshot import hook
from ftmem.snapshot.capture import Captured, snapshot_device
from ftmem.snapshot.copy import CopyEngine, SnapshotJob
from ftmem.snapshot.plan import LayoutPlan


@pytest.fixture
def job_env(cluster, monkeypatch):
    """This process as rank 0 of 1 of the `cluster` job (its unique id and private runtime dir), whose cleanup
    ends the SMP and unlinks the segments even when the test fails."""
    for key, value in cluster.env.items():
        if key.startswith("FTMEM_"):
            monkeypatch.setenv(key, value)
    for key in ("FTMEM_NODE_ID", "FTMEM_SMP_ADDR", "FTMEM_MANAGED", "FTMEM_KEEP", "FTMEM_CRASH_AT",
                "FTMEM_STALL_AT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    return cluster


def _one_tensor() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    model = torch.nn.Linear(3, 1, bias=False)  # SGD without momentum keeps no state: one tensor in all
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def _no_tensor() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    loose = torch.nn.Parameter(torch.ones(3))  # trained but not part of the model: nothing to copy
    return torch.nn.Module(), torch.optim.SGD([loose], lr=0.1)


@pytest.mark.parametrize("make", [_one_tensor, _no_tensor])
def test_a_snapshot_with_one_tensor_or_none_is_taken_and_restored(job_env, make):
    job_env.start_smp()  # outlives the first Snapshotter's close, so the second one finds its snapshots
    torch.manual_seed(0)
    model, opt = make()
    params = [p for group in opt.param_groups for p in group["params"]]
    with hook.Snapshotter(model, opt, timeout=30) as snap:
        assert snap.restore() == 0
        for step in range(3):
            opt.zero_grad()
            sum(p.square().sum() for p in params).backward()
            opt.step()
            snap.snapshot(step)
        snap.wait()
    expected = model.state_dict()

    torch.manual_seed(1)
    fresh, fresh_opt = make()
    with hook.Snapshotter(fresh, fresh_opt, timeout=30) as snap:
        assert snap.restore() == 3
    assert fresh.state_dict().keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(fresh.state_dict()[name], value), name


class _FakeMapping:
    def __init__(self, fails: bool) -> None:
        self.fails, self.closed = fails, False

    def close(self) -> None:
        self.closed = True
        if self.fails:
            raise BufferError("cannot close exported pointers exist")


class _StalledClient:
    """An SMP that answers `prepare` only once `gate` is set, and then with an error."""

    def __init__(self) -> None:
        self.gate = threading.Event()

    def call(self, op: str, **_) -> dict:
        self.gate.wait(30)
        raise RuntimeError(f"{op} refused")


def test_close_unmaps_every_buffer_but_only_once_the_copy_thread_stopped():
    client = _StalledClient()
    engine = CopyEngine(client, rank=0, world=1, local_rank=0, device=None, timeout=0.2)
    maps = [_FakeMapping(fails=True), _FakeMapping(fails=False)]
    engine._maps = {i: (f"seg{i}", m) for i, m in enumerate(maps)}
    plan = LayoutPlan([Captured("model.w", torch.ones(2), False)])
    engine.submit(SnapshotJob(0, 0, plan, [torch.ones(2)], b"", None))
    engine.close()  # the thread is still in `prepare`: it may yet copy into the buffers
    assert not any(m.closed for m in maps)
    client.gate.set()
    engine._thread.join(30)
    engine.close()  # stopped now: every buffer is unmapped, though the first one fails
    assert all(m.closed for m in maps) and not engine._maps


def _no_smp(*_):
    raise AssertionError("Snapshotter connected to an SMP before checking the parameters")


def test_parameters_on_a_device_the_copy_cannot_take_are_refused_before_connecting(monkeypatch):
    monkeypatch.setattr(hook, "connect", _no_smp)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2, device="meta"))
    assert snapshot_device(model[0]) is None  # CPU
    with pytest.raises(ValueError, match=r"ftmem: parameters on meta: CPU and one CUDA device per rank"):
        hook.Snapshotter(model, torch.optim.SGD(model[0].parameters(), lr=0.1))


DTENSOR_SCRIPT = r'''
import sys
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, distribute_tensor
from ftmem.snapshot import hook

def no_smp(*_):
    raise SystemExit("Snapshotter connected to an SMP before checking the parameters")

hook.connect = no_smp
dist.init_process_group("gloo", store=dist.FileStore(sys.argv[1], 1), rank=0, world_size=1)
try:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    mesh = init_device_mesh("cpu", (1,))
    model[1].weight = torch.nn.Parameter(distribute_tensor(model[1].weight.detach(), mesh, [Replicate()]))
    hook.Snapshotter(model, torch.optim.SGD(model.parameters(), lr=0.1))
finally:
    dist.destroy_process_group()
'''


def test_dtensor_parameters_are_refused_with_their_name_before_connecting(cluster):
    """In a process of its own: a process group in the test process could affect other tests."""
    done = subprocess.run([sys.executable, "-c", DTENSOR_SCRIPT, str(cluster.tmp / "store")], capture_output=True,
                          text=True, timeout=120, cwd=cluster.tmp, env={**cluster.env, "GLOO_SOCKET_IFNAME": "lo"})
    assert done.returncode != 0, done.stdout + done.stderr
    assert "NotImplementedError: ftmem: parameter '1.weight' is a DTensor" in done.stderr, done.stderr


def test_a_snapshot_that_does_not_fit_the_live_objects_says_what_differs():
    """Restoring into a model, optimizer or `extra` that changed since the snapshot names the mismatch instead
    of a bare KeyError or zip's ValueError."""
    from ftmem.snapshot.capture import apply_snapshot, capture_state

    class Counter:
        def __init__(self) -> None:
            self.n = 1

        def state_dict(self) -> dict:
            return {"n": self.n}

        def load_state_dict(self, state: dict) -> None:
            self.n = state["n"]

    def trained(names: tuple[str, ...]) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
        model = torch.nn.Sequential(OrderedDict((n, torch.nn.Linear(2, 2)) for n in names))
        opt = torch.optim.Adam(model.parameters())
        model(torch.ones(1, 2)).sum().backward()
        opt.step()
        return model, opt

    model, opt = trained(("a",))
    captured, meta = capture_state(0, model, opt, {"counter": Counter()})
    tensors = {c.name: c.tensor.detach().clone() for c in captured}
    assert apply_snapshot(tensors, meta, *trained(("a",)), {"counter": Counter()}) == 0

    optim_only = {k: v for k, v in tensors.items() if k.startswith("optim.")}
    other, other_opt = trained(("b",))
    with pytest.raises(KeyError, match="disagree on optimizer parameter 'a.weight'"):
        apply_snapshot({**optim_only, "model.b.weight": other.b.weight, "model.b.bias": other.b.bias}, meta,
                       other, other_opt, {})
    two, two_opt = trained(("a",))
    two_opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(1))]})
    with pytest.raises(ValueError, match="1 optimizer parameter group"):
        apply_snapshot(tensors, meta, two, two_opt, {})
    with pytest.raises(KeyError, match="disagree on extra object 'sampler'"):
        apply_snapshot(tensors, meta, *trained(("a",)), {"sampler": Counter()})
