"""What a snapshot holds, and putting it back.

Tensors (parameters, persistent buffers, optimizer state tensors) are copied byte-for-byte into shared memory.
Everything else (RNG states, the step, optimizer hyperparameters and scalar state, `extra` objects'
`state_dict()`) is captured synchronously as plain data and encoded with msgpack.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Mapping, Protocol

import numpy as np
import torch

from ftmem.snapshot import serialize


class Stateful(Protocol):
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state_dict: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Captured:
    """One tensor to snapshot. `mutable_before_next_step` marks buffers, which a forward pass may change (BatchNorm
    statistics, DDP's buffer broadcast), so they are cloned synchronously instead of copied in the background."""

    name: str
    tensor: torch.Tensor
    mutable_before_next_step: bool


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The module under DDP/DataParallel wrappers, so names do not depend on the wrapping."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): name for name, p in model.named_parameters(remove_duplicate=True)}


def _optimizer_slots(model: torch.nn.Module, optimizer: torch.optim.Optimizer):
    """(index, name, param) for every optimizer param, index as in `optimizer.state_dict()`."""
    names = _param_names(model)
    index = 0
    for g, group in enumerate(optimizer.param_groups):
        for i, p in enumerate(group["params"]):
            yield index, names.get(id(p), f"group{g}.param{i}"), p
            index += 1


def collect_tensors(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[Captured]:
    params = {id(p) for p in model.parameters()}
    out = [Captured(f"model.{name}", t.detach(), id(t) not in params)
           for name, t in model.state_dict(keep_vars=True).items() if isinstance(t, torch.Tensor)]
    for _, name, p in _optimizer_slots(model, optimizer):
        for key, value in sorted(optimizer.state.get(p, {}).items()):
            if isinstance(value, torch.Tensor):
                out.append(Captured(f"optim.{name}.{key}", value.detach(), False))
    return out


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(),
                             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def capture_meta(step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 extra: Mapping[str, Stateful]) -> bytes:
    """Encode the non-tensor state now: it changes as soon as training goes on."""
    scalars = {f"{name}.{key}": value
               for _, name, p in _optimizer_slots(model, optimizer)
               for key, value in optimizer.state.get(p, {}).items() if not isinstance(value, torch.Tensor)}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    return serialize.pack({"step": step, "param_groups": groups, "optim_scalars": scalars, "rng": _rng_state(),
                           "extra": {key: obj.state_dict() for key, obj in extra.items()}})


def apply_snapshot(tensors: Mapping[str, torch.Tensor], meta_bytes: bytes, model: torch.nn.Module,
                   optimizer: torch.optim.Optimizer, extra: Mapping[str, Stateful]) -> int:
    """Load a snapshot into the live objects; returns the step it was taken after.

    `tensors` maps entry names to CPU tensors that this function may keep (they are not views of shared memory).
    Optimizer state goes through `load_state_dict`, which materializes it even before the first step.
    """
    meta = serialize.unpack(meta_bytes)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if isinstance(t, torch.Tensor):
                src = _require(tensors, f"model.{name}")
                t.copy_(src)
    by_name = {name: (index, p) for index, name, p in _optimizer_slots(model, optimizer)}
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        if key.startswith("optim."):
            pname, skey = key[len("optim."):].rsplit(".", 1)
            index, _ = by_name[pname]
            state.setdefault(index, {})[skey] = t  # load_state_dict moves it to its device
    for key, value in meta["optim_scalars"].items():
        pname, skey = key.rsplit(".", 1)
        state.setdefault(by_name[pname][0], {})[skey] = value
    groups, start = [], 0
    for saved, live in zip(meta["param_groups"], optimizer.param_groups, strict=True):
        groups.append({**saved, "params": list(range(start, start + len(live["params"])))})
        start += len(live["params"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    for key, obj in extra.items():
        obj.load_state_dict(meta["extra"][key])
    _set_rng_state(meta["rng"])
    return int(meta["step"])


def _require(tensors: Mapping[str, torch.Tensor], name: str) -> torch.Tensor:
    if name not in tensors:
        raise KeyError(f"ftmem: the snapshot has no tensor {name!r}; was the model changed since it was taken?")
    return tensors[name]


def _set_rng_state(rng: Mapping[str, Any]) -> None:
    random.setstate(rng["python"])
    np.random.set_state(rng["numpy"])
    torch.set_rng_state(rng["torch"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
