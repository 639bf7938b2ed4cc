"""A training script whose state has what the GPT example lacks: a tied weight, BatchNorm buffers that every
forward pass changes, a frozen parameter, a parameter without gradient (so no optimizer state), and SGD with
momentum. One process; prints ``final-hash`` (model state_dict + optimizer state_dict) at the end."""

import hashlib
import sys

import torch
import torch.nn as nn

from ftmem import Snapshotter


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frozen(self.norm(self.embed(x))))


def main() -> None:
    steps = int(sys.argv[1])
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = Net()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1, momentum=0.9)
    snap = Snapshotter(model, opt)
    for step in range(snap.restore(), steps):
        x = torch.randint(0, 16, (32,))
        loss = nn.functional.cross_entropy(model(x), (x + 1) % 16)
        opt.zero_grad()
        loss.backward()
        opt.step()
        snap.snapshot(step)
    snap.close()
    h = hashlib.sha256()
    for name, t in [*model.state_dict().items(), *((f"m{i}", s["momentum_buffer"])
                                                  for i, s in sorted(opt.state_dict()["state"].items()))]:
        h.update(name.encode() + t.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    print("final-hash", h.hexdigest(), flush=True)


if __name__ == "__main__":
    main()
