"""What a snapshot holds, and putting it back.

Tensors (parameters, persistent buffers, optimizer state tensors, and parameters the optimizer trains outside the
model) are copied byte-for-byte into shared memory. Everything else (RNG states, the step, optimizer
hyperparameters and scalar state, the model's non-tensor state such as `get_extra_state()`, `extra` objects'
`state_dict()`) is captured synchronously as plain data and encoded with msgpack.
"""

from __future__ import annotations

import random
import sys
from typing import Any, Mapping, NamedTuple, Protocol

import numpy as np
import torch
from torch.nn.modules.module import _EXTRA_STATE_KEY_SUFFIX

from ftmem.snapshot import serialize


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


class Captured(NamedTuple):
    """One tensor to snapshot (not detached: it is read only under `no_grad`). `mutable_before_next_step` marks
    buffers, which a forward pass may change (BatchNorm statistics, DDP's buffer broadcast), so they are cloned
    synchronously instead of copied in the background."""

    name: str
    tensor: torch.Tensor
    mutable_before_next_step: bool


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP/DataParallel wrappers, so names do not depend on the wrapping."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def snapshot_device(model: torch.nn.Module) -> torch.device | None:
    """The CUDA device of `model`'s parameters, None on CPU; checked before anything connects to the SMP.

    DTensor parameters (FSDP2, tensor parallel) need sharded snapshots, which are not supported yet: they are
    rejected here instead of failing in the copy thread (DTensor is looked up only if its module is loaded, as it
    is once one exists: importing it costs a second). So are parameters on several CUDA devices (the copy is
    ordered after one device's training stream) or on a device that is neither CPU nor CUDA (e.g. meta).
    """
    dtensor = getattr(sys.modules.get("torch.distributed.tensor"), "DTensor", None)
    params = list(model.named_parameters())
    if dtensor is not None:
        for name, p in params:
            if isinstance(p, dtensor):
                raise NotImplementedError(f"ftmem: parameter {name!r} is a DTensor (FSDP2 fully_shard or tensor "
                                          "parallel): sharded snapshots are not supported yet")
    devices = {p.device for _, p in params} - {torch.device("cpu")}
    if len(devices) > 1 or any(d.type != "cuda" for d in devices):
        raise ValueError(f"ftmem: parameters on {', '.join(sorted(map(str, devices)))}: CPU and one CUDA device "
                         "per rank are supported")
    return next(iter(devices), None)


def _param_names(model_state: Mapping[str, Any]) -> dict[int, str]:
    """Name of each parameter in a `state_dict(keep_vars=True)`: its first key (a tied weight has several)."""
    names: dict[int, str] = {}
    for name, t in model_state.items():
        if isinstance(t, torch.nn.Parameter):
            names.setdefault(id(t), name)
    return names


def _optimizer_slots(optimizer: torch.optim.Optimizer, names: Mapping[int, str]):
    """(index, name, param) for every optimizer param, index as in `optimizer.state_dict()`; `names` from
    `_param_names`."""
    index = 0
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            yield index, names.get(id(p), f"group{g}.param{i}"), p
            index += 1


def capture_state(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                  extra: Mapping[str, Stateful]) -> tuple[list[Captured], bytes]:
    """The tensors to copy and the encoded non-tensor state, in one walk over model and optimizer.

    Runs on the training thread at every snapshot, so it is written for speed: the non-tensor state changes as
    soon as training goes on and must be encoded now; the tensors are only referenced (copied in the background).
    """
    model_state = model.state_dict(keep_vars=True)
    names = _param_names(model_state)
    tensors = [Captured(f"model.{name}", t, not isinstance(t, torch.nn.Parameter))
               for name, t in model_state.items() if isinstance(t, torch.Tensor)]
    model_values = {name: v for name, v in model_state.items() if not isinstance(v, torch.Tensor)}
    scalars = {}
    for _, name, p in _optimizer_slots(optimizer, names):
        if id(p) not in names:  # trained, but the model does not hold it (e.g. a loss's temperature)
            tensors.append(Captured(f"param.{name}", p, False))
        state = optimizer.state.get(p)
        if not state:
            continue
        for key in sorted(state):
            value = state[key]
            if isinstance(value, torch.Tensor):
                tensors.append(Captured(f"optim.{name}.{key}", value, False))
            else:
                scalars[f"{name}.{key}"] = value
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    # state an optimizer keeps under a key that is no parameter (its state_dict() holds it too)
    global_state = {k: v for k, v in optimizer.state.items() if not isinstance(k, torch.Tensor)}
    meta = serialize.pack({"step": step, "model_values": model_values, "param_groups": groups,
                           "optim_scalars": scalars, "optim_global": global_state, "rng": _rng_state(),
                           "extra": {key: obj.state_dict() for key, obj in extra.items()}})
    return tensors, meta


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def apply_snapshot(tensors: Mapping[str, torch.Tensor], meta_bytes: bytes, model: torch.nn.Module,
                   optimizer: torch.optim.Optimizer, extra: Mapping[str, Stateful]) -> int:
    """Load a snapshot into the live objects; returns the step it was taken after.

    `tensors` maps entry names to CPU tensors that this function may keep (they are not views of shared memory).
    The model and the optimizer load through their own `load_state_dict` (the model's runs `set_extra_state` and
    its load hooks; the optimizer's materializes state even before the first step). Tensors must keep their dtype
    and shape: `copy_` would cast or broadcast a changed model's parameters silently.
    """
    meta = serialize.unpack(meta_bytes)
    names = _load_model(model, tensors, meta["model_values"])
    if len(meta["param_groups"]) != len(optimizer.param_groups):
        raise ValueError(f"ftmem: the snapshot has {len(meta['param_groups'])} optimizer parameter group(s), the "
                         f"optimizer {len(optimizer.param_groups)}; was it changed since the snapshot was taken?")
    by_name = {name: (index, p) for index, name, p in _optimizer_slots(optimizer, names)}
    with torch.no_grad():
        for name, (_, p) in by_name.items():
            if id(p) not in names:
                p.copy_(_same_layout(f"param.{name}", _require(tensors, f"param.{name}", "parameter"), p))
    state: dict[Any, dict[str, Any]] = dict(meta["optim_global"])
    for key, t in tensors.items():
        if key.startswith("optim."):
            pname, skey = key[len("optim."):].rsplit(".", 1)
            index = _require(by_name, pname, "optimizer parameter")[0]
            state.setdefault(index, {})[skey] = t  # load_state_dict moves it to its device
    for key, value in meta["optim_scalars"].items():
        pname, skey = key.rsplit(".", 1)
        state.setdefault(_require(by_name, pname, "optimizer parameter")[0], {})[skey] = value
    groups, start = [], 0
    for saved, live in zip(meta["param_groups"], optimizer.param_groups):
        groups.append({**saved, "params": list(range(start, start + len(live["params"])))})
        start += len(live["params"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for key, obj in extra.items():
        obj.load_state_dict(_require(meta["extra"], key, "extra object"))
    _set_rng_state(meta["rng"])
    return int(meta["step"])


def _load_model(model: torch.nn.Module, tensors: Mapping[str, torch.Tensor],
                values: Mapping[str, Any]) -> dict[int, str]:
    """Load the snapshot's model entries (tensors and `values`, its non-tensor ones) after checking that every
    tensor keeps its dtype and shape; returns `_param_names` of the model."""
    live = model.state_dict(keep_vars=True)
    saved = {**values, **{k.removeprefix("model."): t for k, t in tensors.items() if k.startswith("model.")}}
    for name, t in live.items():
        value = _require(saved, name, "model entry")
        if isinstance(t, torch.Tensor) and not name.endswith(_EXTRA_STATE_KEY_SUFFIX):  # extra state may vary
            _same_layout(f"model.{name}", value, t)
    model.load_state_dict(saved)  # strict: an entry the model no longer has is an error too
    return _param_names(live)


def _same_layout(name: str, saved: Any, live: torch.Tensor) -> torch.Tensor:
    """`saved`, once it has `live`'s dtype and shape."""
    if not isinstance(saved, torch.Tensor) or (saved.dtype, saved.shape) != (live.dtype, live.shape):
        found = (f"{str(saved.dtype).removeprefix('torch.')} {list(saved.shape)}" if isinstance(saved, torch.Tensor)
                 else type(saved).__name__)
        raise ValueError(f"ftmem: the snapshot holds {name} as {found}, the live one is "
                         f"{str(live.dtype).removeprefix('torch.')} {list(live.shape)}; was the model changed since "
                         f"the snapshot was taken?")
    return saved


def _require(found: Mapping[str, Any], name: str, what: str) -> Any:
    if name not in found:
        raise KeyError(f"ftmem: the snapshot and the live objects disagree on {what} {name!r}; was the model, the "
                       f"optimizer or `extra` changed since the snapshot was taken?")
    return found[name]


def _set_rng_state(rng: Mapping[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
