"""Train a small GPT with DistributedDataParallel (gloo, CPU) and the ftmem snapshot hook.

A real decoder-only transformer (token + position embeddings, pre-LN blocks with causal self-attention and an
MLP, dropout, a linear head) learns a character-level language model of a synthetic corpus that the script
generates itself from a fixed seed, so nothing is downloaded. Training is fully deterministic: the same
arguments and world size give the same losses and the same final hash on every run, which is what the
golden-run tests compare against a run with failures injected.

Run it:

    python examples/train_gpt.py --no-ftmem                           # one process, no hook: the baseline
    python examples/train_gpt.py                                      # one process with the hook
    torchrun --nproc-per-node 2 examples/train_gpt.py                 # two ranks; the hook starts a local SMP
    ftmem-run --nproc-per-node 2 examples/train_gpt.py                # two ranks, restarted on failure

Output: rank 0 prints ``step {step} loss {loss:.6f}`` after every step (the loss averaged over all ranks), a
single ``resumed-at-step {start}`` line before the first step when it resumed from a snapshot, and
``final-hash {sha256}`` at the end (see ``state_hash``); ``--hash-file PATH`` also writes that hash to PATH.
Nothing else is printed per step.

The hook is used exactly as a user would use it::

    snap = Snapshotter(model, optimizer, extra={"scheduler": sched, "sampler": sampler}, every=args.every)
    start = snap.restore()      # 0 on a fresh job, S + 1 after restoring snapshot S
    for step in range(start, total_steps):
        ...                     # forward / backward / optimizer.step() / scheduler.step()
        snap.snapshot(step)     # returns at once; the copy overlaps the next forward / backward
    snap.close()

Everything a step depends on is therefore in the model, the optimizer, the two ``extra`` objects and the
python / numpy / torch RNG states (dropout uses torch's; the input-noise augmentation deliberately draws from
python's and numpy's global RNGs too, as real input pipelines do, so all three are part of the state). Batches
come from the sampler's state alone, never from ``step``, so a sampler that is restored wrongly changes the hash.

Determinism holds for a fixed world size and thread count (``torch.set_num_threads(1)`` unless OMP_NUM_THREADS
is set). Gradients are averaged by a DDP comm hook that sums them in rank order (``rank_ordered_allreduce``),
so a job restored mid-run reduces exactly like a job that never stopped, for any world size.
"""

import argparse
import hashlib
import json
import math
import os
import random
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

CORPUS_SEED = 1234  # the corpus is the same for every --seed; --seed changes init, shuffling and noise


# --------------------------------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60, help="total optimizer steps of the job")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=1, help="snapshot every N steps")
    p.add_argument("--batch", type=int, default=8, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=32, help="context length in characters")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dropout", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="max gradient norm")
    p.add_argument("--input-noise", type=float, default=0.05,
                   help="max fraction of input characters replaced by random ones (augmentation)")
    p.add_argument("--tie-weights", action="store_true", help="share the token embedding with the head")
    p.add_argument("--corpus-chars", type=int, default=12_000,
                   help="corpus length; the default makes an epoch end within 60 steps for 1 and 2 ranks")
    p.add_argument("--no-ftmem", action="store_true", help="train without the snapshot hook (the baseline)")
    p.add_argument("--step-sleep", type=float, default=0.0, metavar="SECONDS",
                   help="sleep after each step, so a test can kill the job mid-run")
    p.add_argument("--hash-file", default=None, metavar="PATH", help="rank 0 writes the final hash here")
    args = p.parse_args(argv)
    if args.dim % args.heads:
        p.error("--dim must be divisible by --heads")
    if args.steps < 1 or args.every < 1:
        p.error("--steps and --every must be >= 1")
    return args


# -------------------------------------------------------------------------------------------------- the corpus


def make_corpus(n_chars: int, seed: int = CORPUS_SEED) -> str:
    """Deterministic English-like text from a small random grammar (no downloads, no files)."""
    rng = random.Random(seed)
    det = ["the", "a", "every", "one", "that", "my", "our", "some"]
    adj = ["old", "small", "quiet", "red", "clever", "tired", "bright", "young", "strange", "happy", "green"]
    noun = ["cat", "dog", "king", "river", "child", "bird", "farmer", "house", "star", "ship", "garden",
            "teacher", "window", "mountain", "letter"]
    verb = ["sees", "finds", "follows", "loves", "watches", "builds", "carries", "hears", "remembers", "paints"]
    iverb = ["sleeps", "sings", "waits", "runs", "laughs", "falls", "shines", "listens"]
    prep = ["near", "under", "behind", "above", "beside", "across"]
    adv = ["slowly", "again", "today", "quietly", "at night", "in the rain", "every morning"]

    def noun_phrase() -> str:
        words = [rng.choice(det)]
        if rng.random() < 0.5:
            words.append(rng.choice(adj))
        words.append(rng.choice(noun))
        if rng.random() < 0.2:
            words += [rng.choice(prep), rng.choice(det), rng.choice(noun)]
        return " ".join(words)

    def sentence() -> str:
        if rng.random() < 0.6:
            s = f"{noun_phrase()} {rng.choice(verb)} {noun_phrase()}"
        else:
            s = f"{noun_phrase()} {rng.choice(iverb)}"
        if rng.random() < 0.3:
            s += " " + rng.choice(adv)
        if rng.random() < 0.15:
            s += ", and " + sentence()[:-1]
        return s[0].upper() + s[1:] + "."

    parts: list[str] = []
    length = 0
    while length < n_chars:
        para = " ".join(sentence() for _ in range(rng.randint(2, 5))) + "\n"
        parts.append(para)
        length += len(para)
    return "".join(parts)[:n_chars]


# --------------------------------------------------------------------------------------------------- the model


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.attn_drop = nn.Dropout(dropout)
        self.resid_drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(c // self.heads))
        causal = torch.ones(t, t, dtype=torch.bool, device=x.device).tril()
        att = self.attn_drop(att.masked_fill(~causal, float("-inf")).softmax(dim=-1))
        y = (att @ v).transpose(1, 2).reshape(b, t, c)
        return self.resid_drop(self.proj(y))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, vocab: int, seq: int, dim: int, heads: int, layers: int, dropout: float, tie: bool):
        super().__init__()
        self.tok_emb = nn.Embedding(vocab, dim)
        self.pos_emb = nn.Embedding(seq, dim)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tie:
            self.head.weight = self.tok_emb.weight
        # GPT-2 initialisation; residual projections scaled by depth.
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * layers) if name.endswith(("proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln_f(x))


# ------------------------------------------------------------------------------------------------- the sampler


class ShardedBatchSampler:
    """Yields this rank's batch of window start offsets, deterministically from (seed, epoch, position).

    Each epoch picks a random phase (so windows differ between epochs) and a random permutation of the
    windows, both derived from (seed, epoch) alone; global batch ``position`` of the epoch is the slice
    ``perm[position * W * B : (position + 1) * W * B]`` of which rank r takes the r-th block of B. The state
    is three plain ints, so restoring it resumes exactly where the sampler left off.
    """

    def __init__(self, n_tokens: int, seq: int, batch: int, rank: int, world: int, seed: int):
        self.seq, self.batch, self.rank, self.world, self.seed = seq, batch, rank, world, seed
        self.n_windows = (n_tokens - 1) // seq - 1  # room for a phase < seq and the shifted target
        self.batches_per_epoch = self.n_windows // (batch * world)
        if self.batches_per_epoch < 1:
            raise ValueError(f"corpus of {n_tokens} tokens too small for {world} x {batch} windows of {seq}")
        self.epoch = 0
        self.position = 0
        self._cache: tuple[int, int, list[int]] | None = None  # (epoch, phase, perm): derived, not state

    def _epoch_order(self) -> tuple[int, list[int]]:
        if self._cache is None or self._cache[0] != self.epoch:
            rng = random.Random(self.seed * 1_000_003 + self.epoch)
            phase = rng.randrange(self.seq)
            perm = list(range(self.n_windows))
            rng.shuffle(perm)
            self._cache = (self.epoch, phase, perm)
        return self._cache[1], self._cache[2]

    def next_batch(self) -> list[int]:
        phase, perm = self._epoch_order()
        first = self.position * self.world * self.batch + self.rank * self.batch
        starts = [phase + i * self.seq for i in perm[first:first + self.batch]]
        self.position += 1
        if self.position == self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return starts

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        if int(state["seed"]) != self.seed:
            raise ValueError(f"sampler state is for seed {state['seed']}, this run uses seed {self.seed}")
        position = int(state["position"])
        if not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"sampler position {position} out of range for {self.batches_per_epoch} batches")
        self.epoch, self.position = int(state["epoch"]), position


# ---------------------------------------------------------------------------------------------------- training


class Trainer:
    """Everything a step needs. Kept in one object so that checks can drive the exact same step."""

    def __init__(self, args: argparse.Namespace, rank: int, world: int):
        self.args, self.rank, self.world = args, rank, world
        text = make_corpus(args.corpus_chars)
        chars = sorted(set(text))
        self.vocab = len(chars)
        lookup = {ch: i for i, ch in enumerate(chars)}
        self.data = torch.tensor([lookup[ch] for ch in text], dtype=torch.long)
        self.offsets = torch.arange(args.seq + 1)

        # Identical initial weights on every rank; then a different RNG stream per rank (dropout, noise).
        seed_everything(args.seed)
        net = GPT(self.vocab, args.seq, args.dim, args.heads, args.layers, args.dropout, args.tie_weights)
        seed_everything(args.seed * 7919 + 1 + rank)
        self.model = DDP(net)
        self.model.register_comm_hook(None, rank_ordered_allreduce)  # see its docstring

        decay = [p for p in net.parameters() if p.dim() >= 2]
        no_decay = [p for p in net.parameters() if p.dim() < 2]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
        warmup = max(1, args.steps // 10)
        self.scheduler = torch.optim.lr_scheduler.SequentialLR(
            self.optimizer,
            [torch.optim.lr_scheduler.LinearLR(self.optimizer, start_factor=0.1, total_iters=warmup),
             torch.optim.lr_scheduler.CosineAnnealingLR(
                 self.optimizer, T_max=max(1, args.steps - warmup), eta_min=args.lr * 0.1)],
            milestones=[warmup])
        self.sampler = ShardedBatchSampler(len(self.data), args.seq, args.batch, rank, world, args.seed)

    def batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.tensor(self.sampler.next_batch(), dtype=torch.long)
        chunk = self.data[starts[:, None] + self.offsets]
        x, y = chunk[:, :-1].clone(), chunk[:, 1:]
        if self.args.input_noise > 0:
            # Augmentation: corrupt a random fraction (python RNG) of input positions (numpy RNG) with
            # random characters (torch RNG). Targets stay clean.
            rate = random.uniform(0.0, self.args.input_noise)
            mask = torch.from_numpy(np.random.random_sample(tuple(x.shape)) < rate)
            x[mask] = torch.randint(self.vocab, (int(mask.sum()),))
        return x, y

    def step(self) -> torch.Tensor:
        """One optimizer step; returns this rank's loss (detached)."""
        x, y = self.batch()
        self.optimizer.zero_grad(set_to_none=True)
        logits = self.model(x)
        loss = F.cross_entropy(logits.reshape(-1, self.vocab), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.args.clip)
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach()

    def mean_loss(self, loss: torch.Tensor) -> float:
        total = loss.clone()
        dist.all_reduce(total)
        return total.item() / self.world


def rank_ordered_allreduce(group, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP comm hook: average the gradients by summing them in rank order, whatever DDP's bucket layout.

    With the default hook, gloo's ring all-reduce sums each element in an order that depends on where the
    element sits in its bucket, and DDP re-lays out its buckets after the first iteration. A job restored
    mid-run starts again with the first-iteration layout, so with 3 or more ranks it would not reduce
    bit-identically to a job that never stopped. Gathering every rank's bucket and adding them in rank order
    gives the same bits whatever the layout (for 1 or 2 ranks the sum is the same as the default's anyway).
    """
    world = dist.get_world_size(group)
    local = bucket.buffer()
    parts = [torch.empty_like(local) for _ in range(world)]
    work = dist.all_gather(parts, local, group=group, async_op=True)

    def average(_: torch.futures.Future) -> torch.Tensor:
        total = parts[0].clone()
        for part in parts[1:]:
            total += part
        return total.div_(world)

    return work.get_future().then(average)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def state_hash(model: nn.Module, optimizer: torch.optim.Optimizer) -> str:
    """sha256 over the model's (unwrapped) state_dict and the optimizer's state_dict, in a canonical order.

    Tensors contribute name, dtype, shape and raw bytes; the optimizer contributes its per-parameter state in
    parameter-index order and its param_groups (learning rates included) as sorted JSON.
    """
    h = hashlib.sha256()
    module = model.module if isinstance(model, DDP) else model

    def add(name: str, value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous().reshape(-1)
            raw = t.view(torch.uint8).numpy().tobytes()
            h.update(f"T|{name}|{t.dtype}|{tuple(value.shape)}|{len(raw)}|".encode())
            h.update(raw)
        else:
            h.update(f"V|{name}|{json.dumps(value, sort_keys=True, default=repr)}|".encode())

    for name, tensor in sorted(module.state_dict().items()):
        add(f"model.{name}", tensor)
    opt = optimizer.state_dict()
    for index in sorted(opt["state"]):
        for key, value in sorted(opt["state"][index].items()):
            add(f"optim.state.{index}.{key}", value)
    add("optim.param_groups", opt["param_groups"])
    return h.hexdigest()


def init_distributed() -> tuple[int, int]:
    """gloo process group: from torchrun's env (RANK, WORLD_SIZE, MASTER_ADDR/PORT), else a group of one."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        dist.init_process_group("gloo")
    else:  # plain `python`: the same code path with an in-process store and world size 1
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def configure_torch() -> None:
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    configure_torch()
    rank, world = init_distributed()
    trainer = Trainer(args, rank, world)

    snap = None
    start = 0
    if not args.no_ftmem:
        from ftmem import Snapshotter

        snap = Snapshotter(trainer.model, trainer.optimizer,
                           extra={"scheduler": trainer.scheduler, "sampler": trainer.sampler}, every=args.every)
        start = snap.restore()
        if start > 0 and rank == 0:
            print(f"resumed-at-step {start}", flush=True)

    for step in range(start, args.steps):
        loss = trainer.step()
        if snap is not None:
            snap.snapshot(step)
        mean = trainer.mean_loss(loss)  # overlaps the snapshot copy
        if rank == 0:
            print(f"step {step} loss {mean:.6f}", flush=True)
        if args.step_sleep > 0:
            time.sleep(args.step_sleep)

    if snap is not None:
        snap.close()
    if rank == 0:
        digest = state_hash(trainer.model, trainer.optimizer)
        print(f"final-hash {digest}", flush=True)
        if args.hash_file:
            tmp = f"{args.hash_file}.tmp.{os.getpid()}"
            with open(tmp, "w") as f:
                f.write(digest + "\n")
            os.replace(tmp, args.hash_file)
    # Tear down in an order that cannot deadlock. gloo's worker thread frees a finished collective's tensors
    # after the caller has moved on, and freeing a tensor that python has seen needs the GIL; if the process
    # group were destroyed from DDP's Reducer (whose destructor joins that thread while holding the GIL), ranks
    # would hang at exit. So: a barrier (after it the worker is idle), drop our references to DDP, then destroy
    # the group (its python binding releases the GIL while joining).
    dist.barrier()
    del snap, trainer
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
