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


class _Counting(torch.nn.Module):
    """A module with state outside its tensors, kept by `get_extra_state` (as a dict, or as a tensor)."""

    def __init__(self, as_tensor: bool) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(2, 2)
        self.as_tensor, self.calls = as_tensor, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.lin(x) * self.calls

    def get_extra_state(self):
        return torch.tensor([self.calls]) if self.as_tensor else {"calls": self.calls}

    def set_extra_state(self, state) -> None:
        self.calls = int(state[0]) if self.as_tensor else state["calls"]


class _GlobalStepSGD(torch.optim.SGD):
    """An optimizer keeping state under a key that is no parameter, which its state_dict() keeps."""

    def step(self, closure=None):
        self.state["updates"] = self.state.get("updates", 0) + 1
        return super().step(closure)


def _extra_state(as_tensor: bool):
    model = torch.nn.Sequential(_Counting(as_tensor))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), [], lambda: model[0].calls


def _loose_parameter():
    model, temperature = torch.nn.Linear(2, 2), torch.nn.Parameter(torch.ones(()))
    return model, torch.optim.Adam([*model.parameters(), temperature]), [temperature], lambda: temperature.item()


def _global_optimizer_state():
    model = torch.nn.Linear(2, 2)
    opt = _GlobalStepSGD(model.parameters(), lr=0.1)
    return model, opt, [], lambda: opt.state["updates"]


@pytest.mark.parametrize("make", [lambda: _extra_state(False), lambda: _extra_state(True), _loose_parameter,
                                  _global_optimizer_state],
                         ids=["extra-state-dict", "extra-state-tensor", "loose-parameter", "global-optimizer-state"])
def test_state_beyond_the_models_tensors_and_the_optimizers_per_parameter_state_is_restored(make):
    """A module's `get_extra_state()`, a parameter the optimizer trains outside the model, and optimizer state
    under a key that is no parameter are training state too: a restore into fresh objects brings them back."""
    from ftmem.snapshot.capture import apply_snapshot, capture_state

    torch.manual_seed(0)
    model, opt, loose, probe = make()
    for _ in range(3):
        (model(torch.randn(4, 2)).square().mean() * sum(loose, torch.ones(()))).backward()
        opt.step()
        opt.zero_grad()
    captured, meta = capture_state(2, model, opt, {})
    tensors = {c.name: c.tensor.detach().clone() for c in captured}
    expected = (probe(), model.state_dict(), opt.state_dict())

    torch.manual_seed(1)
    fresh, fresh_opt, _, fresh_probe = make()
    assert apply_snapshot(tensors, meta, fresh, fresh_opt, {}) == 2
    assert fresh_probe() == expected[0]
    assert _same(fresh.state_dict(), expected[1]) and _same(fresh_opt.state_dict(), expected[2])


def _same(a, b) -> bool:
    """Equal state: tensors bitwise with their dtype, dicts in any order, tuples and lists by type."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(map(_same, a, b))
    return type(a) is type(b) and a == b


@pytest.mark.parametrize("changed", [torch.nn.Linear(3, 4).double(), torch.nn.Linear(3, 4, bias=False)],
                         ids=["dtype", "shape"])
def test_a_snapshot_is_never_cast_or_broadcast_into_a_changed_model(changed):
    """copy_ would cast a float32 snapshot into float64 parameters and broadcast a [1, 3] weight into [4, 3]
    silently: a restore into parameters of another dtype or shape names the tensor instead."""
    from ftmem.snapshot.capture import apply_snapshot, capture_state

    model = torch.nn.Linear(3, 1, bias=False)
    captured, meta = capture_state(0, model, torch.optim.SGD(model.parameters(), lr=0.1), {})
    tensors = {c.name: c.tensor.detach().clone() for c in captured}
    before = changed.weight.detach().clone()
    with pytest.raises(ValueError, match=r"snapshot holds model\.weight as float32 \[1, 3\], the live one is "
                                         rf"{str(changed.weight.dtype).removeprefix('torch.')} \[4, 3\]"):
        apply_snapshot(tensors, meta, changed, torch.optim.SGD(changed.parameters(), lr=0.1), {})
    assert torch.equal(changed.weight, before)


def _train_step(model: torch.nn.Module, *optimizers: torch.optim.Optimizer) -> None:
    model(torch.randn(4, 8)).square().mean().backward()
    for opt in optimizers:
        opt.step()
        opt.zero_grad()


def test_restore_mid_run_commits_the_snapshots_in_flight_first(job_env, monkeypatch):
    """restore() called again while a snapshot is still being copied (here: held mid-copy) restores that snapshot,
    not the one before it, and snapshots go on afterwards: the copy no longer commits into the epoch the restore
    left (the SMP refused it, failing every later step)."""
    job_env.start_smp()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    opt = torch.optim.Adam(model.parameters())
    with hook.Snapshotter(model, opt, timeout=30) as snap:
        assert snap.restore() == 0
        for step in range(3):
            _train_step(model, opt)
            snap.snapshot(step)
        snap.wait()
        monkeypatch.setenv("FTMEM_STALL_AT", "mid_copy=0.5")
        _train_step(model, opt)
        snap.snapshot(3)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        assert snap.restore() == 4
        assert all(torch.equal(model.state_dict()[k], v) for k, v in expected.items())
        monkeypatch.delenv("FTMEM_STALL_AT")
        for step in range(4, 6):
            _train_step(model, opt)
            snap.snapshot(step)
        snap.wait()


def test_an_optimizer_in_extra_waits_for_the_copy_too(job_env, monkeypatch):
    """A second optimizer passed as `extra` (a GAN's discriminator's) changes the model's parameters too: its
    step waits until the snapshot was copied, or the snapshot holds some parameters of the next step."""
    job_env.start_smp()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))  # a copy's halves: [0] and [1]
    first, second = (torch.optim.SGD(model[i].parameters(), lr=0.1) for i in range(2))
    with hook.Snapshotter(model, first, extra={"second": second}, timeout=30) as snap:
        assert snap.restore() == 0
        _train_step(model, first, second)
        monkeypatch.setenv("FTMEM_STALL_AT", "mid_copy=0.5")
        snap.snapshot(0)
        expected = {k: v.clone() for k, v in model.state_dict().items()}
        model(torch.randn(4, 8)).square().mean().backward()
        second.step()  # while the copy is held between the halves
        snap.wait()
        monkeypatch.delenv("FTMEM_STALL_AT")

    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    opts = [torch.optim.SGD(fresh[i].parameters(), lr=0.1) for i in range(2)]
    with hook.Snapshotter(fresh, opts[0], extra={"second": opts[1]}, timeout=30) as snap:
        assert snap.restore() == 1
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in expected.items())


def test_a_closed_snapshotter_says_so(job_env):
    """Its copy thread is gone: a snapshot() would be queued for nobody and the next one wait out the timeout with
    an error blaming the SMP; restore() would re-register a rank that left."""
    job_env.start_smp()
    model, opt = _one_tensor()
    snap = hook.Snapshotter(model, opt, timeout=30)
    snap.restore()
    snap.close()
    for call in (lambda: snap.snapshot(0), snap.restore):
        with pytest.raises(RuntimeError, match="ftmem: this Snapshotter was closed"):
            call()
