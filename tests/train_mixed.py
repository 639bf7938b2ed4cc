"""A training script whose state has what the GPT example lacks: a tied weight, BatchNorm buffers that every
forward pass changes, a frozen parameter, a parameter without gradient (so no optimizer state), SGD with momentum,
a module's `get_extra_state()`, a parameter the optimizer trains outside the model, and a sampler drawing from a
numpy Generator (whose state holds 128-bit integers). One process; prints ``final-hash`` (model state_dict,
optimizer state_dict and the loose parameter) at the end."""

import hashlib
import sys

import numpy as np
import torch
import torch.nn as nn

from ftmem import Snapshotter


class Sampler:
    def __init__(self) -> None:
        self.rng = np.random.default_rng(0)

    def batch(self) -> torch.Tensor:
        return torch.from_numpy(self.rng.integers(0, 16, 32))

    def state_dict(self) -> dict:
        return self.rng.bit_generator.state

    def load_state_dict(self, state: dict) -> None:
        self.rng.bit_generator.state = state


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.norm = nn.BatchNorm1d(8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.unused = nn.Parameter(torch.ones(3))  # never in the loss: no grad, no momentum buffer
        self.head = nn.Linear(8, 16, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.calls = 0  # state outside any tensor

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.head(self.frozen(self.norm(self.embed(x)))) * (1 + self.calls % 3)

    def get_extra_state(self) -> dict:
        return {"calls": self.calls}

    def set_extra_state(self, state: dict) -> None:
        self.calls = state["calls"]


def main() -> None:
    steps = int(sys.argv[1])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model, sampler = Net(), Sampler()
    temperature = nn.Parameter(torch.ones(()))  # trained, but not part of the model
    opt = torch.optim.SGD([*(p for p in model.parameters() if p.requires_grad), temperature], lr=0.1, momentum=0.9)
    snap = Snapshotter(model, opt, extra={"sampler": sampler})
    for step in range(snap.restore(), steps):
        x = sampler.batch()
        loss = nn.functional.cross_entropy(model(x) / temperature, (x + 1) % 16)
        opt.zero_grad()
        loss.backward()
        opt.step()
        snap.snapshot(step)
    snap.close()
    h = hashlib.sha256()
    tensors = {**model.state_dict(), "_extra_state": torch.tensor(model.calls), "temperature": temperature.detach()}
    for name, t in [*tensors.items(),
                    *((f"m{i}", s["momentum_buffer"]) for i, s in sorted(opt.state_dict()["state"].items()))]:
        h.update(name.encode() + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    print("final-hash", h.hexdigest(), flush=True)


if __name__ == "__main__":
    main()
