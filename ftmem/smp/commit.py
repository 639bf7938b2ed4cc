"""The global-commit rule and the buffer-reuse rule, as pure functions of what ranks have completed.

A snapshot is identified by (step, epoch). Step S is *committed* once every rank of the job has completed S in
the same epoch; the committed step only moves forward, except when a restore restarts the job at an older step.
A rank may overwrite a buffer unless it holds the committed step or the rank's newest complete step (which
becomes the committed one as soon as the slowest rank catches up): with two buffers this is the double buffer
of the design, and a crash at any moment leaves a consistent step in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field

Snap = tuple[int, int]  # (step, epoch)
LOCAL = -1  # source id of this SMP's own buffers; peers are sources by node id


@dataclass
class CommitTracker:
    world: int | None = None
    epoch: int = 0
    committed: int | None = None
    _sources: dict[int, dict[int, set[Snap]]] = field(default_factory=dict)  # source -> rank -> snaps

    def set_complete(self, rank: int, snaps: set[Snap], source: int = LOCAL) -> None:
        """Replace what `rank` has complete at `source` (this SMP's buffers, or a peer's report)."""
        self._sources.setdefault(source, {})[rank] = set(snaps)
        if snaps:
            self.epoch = max(self.epoch, max(e for _, e in snaps))

    def set_source(self, source: int, by_rank: dict[int, set[Snap]]) -> None:
        """Replace everything a peer reported."""
        self._sources[source] = {}
        for rank, snaps in by_rank.items():
            self.set_complete(rank, snaps, source)

    def complete(self, rank: int, sources: set[int] | None = None) -> set[Snap]:
        """What `rank` has complete anywhere (or at the given sources)."""
        out: set[Snap] = set()
        for src, by_rank in self._sources.items():
            if sources is None or src in sources:
                out |= by_rank.get(rank, set())
        return out

    def newest_elsewhere(self, rank: int) -> int | None:
        """The newest step `rank` has complete at a peer (not in this SMP's own buffers)."""
        steps = [s for src, by_rank in self._sources.items() if src != LOCAL for s, _ in by_rank.get(rank, ())]
        return max(steps, default=None)

    def holders(self, rank: int, snap: Snap) -> list[int]:
        return [src for src, by_rank in self._sources.items() if snap in by_rank.get(rank, set())]

    def restart_at(self, step: int | None, epoch: int) -> None:
        """A restore chose `step` (None: start from scratch) and opened `epoch`."""
        self.epoch = max(self.epoch, epoch)
        self.committed = step

    def evaluate(self) -> bool:
        """Advance `committed` to the newest snapshot complete on every rank; True if it moved."""
        if not self.world:
            return False
        sets = [self.complete(r) for r in range(self.world)]
        common = set.intersection(*sets) if sets else set()
        if not common:
            return False
        newest = max(s for s, _ in common)
        if self.committed is None or newest > self.committed:
            self.committed = newest
            return True
        return False

    def held_by_all(self, step: int) -> bool:
        """Whether every rank still has `step` complete somewhere (a lost node takes its ranks' copies along,
        while `committed` stays until the restore restarts the job)."""
        return bool(self.world) and all(any(s == step for s, _ in self.complete(r)) for r in range(self.world))

    def missing(self, step: int, epoch: int) -> list[int]:
        """Ranks that have not completed (step, epoch): what a stuck commit is waiting for."""
        return [r for r in range(self.world or 0) if (step, epoch) not in self.complete(r)]


def reusable(buffer_steps: list[int | None], committed: int | None, newest_complete: int | None,
             keep: frozenset[int] = frozenset()) -> list[int]:
    """Indices of buffers a rank may overwrite, best first (empty ones, then the oldest step).

    `buffer_steps[i]` is the step buffer i holds complete, or None when it holds nothing usable; `keep` are
    further steps that must survive (the protected step, a step whose parity is being committed).
    """
    pinned = ({committed, newest_complete} | keep) - {None}
    free = [i for i, s in enumerate(buffer_steps) if s is None or s not in pinned]
    return sorted(free, key=lambda i: -1 if buffer_steps[i] is None else buffer_steps[i])
