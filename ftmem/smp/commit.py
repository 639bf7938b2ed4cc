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


@dataclass
class CommitTracker:
    world: int | None = None
    epoch: int = 0
    committed: int | None = None
    _complete: dict[int, set[Snap]] = field(default_factory=dict)

    def set_complete(self, rank: int, snaps: set[Snap]) -> None:
        """Replace what `rank` has complete (from local buffers or a peer's report)."""
        self._complete[rank] = set(snaps)
        if snaps:
            self.epoch = max(self.epoch, max(e for _, e in snaps))

    def complete(self, rank: int) -> set[Snap]:
        return self._complete.get(rank, set())

    def restart_at(self, step: int | None, epoch: int) -> None:
        """A restore chose `step` (None: start from scratch) and opened `epoch`."""
        self.epoch = max(self.epoch, epoch)
        self.committed = step

    def evaluate(self) -> bool:
        """Advance `committed` to the newest snapshot complete on every rank; True if it moved."""
        if not self.world:
            return False
        sets = [self._complete.get(r, set()) for r in range(self.world)]
        common = set.intersection(*sets) if sets else set()
        if not common:
            return False
        newest = max(s for s, _ in common)
        if self.committed is None or newest > self.committed:
            self.committed = newest
            return True
        return False

    def missing(self, step: int, epoch: int) -> list[int]:
        """Ranks that have not completed (step, epoch): what a stuck commit is waiting for."""
        return [r for r in range(self.world or 0) if (step, epoch) not in self._complete.get(r, set())]


def reusable(buffer_steps: list[int | None], committed: int | None, newest_complete: int | None) -> list[int]:
    """Indices of buffers a rank may overwrite, best first (empty ones, then the oldest step).

    `buffer_steps[i]` is the step buffer i holds complete, or None when it holds nothing usable.
    """
    pinned = {committed, newest_complete} - {None}
    free = [i for i, s in enumerate(buffer_steps) if s is None or s not in pinned]
    return sorted(free, key=lambda i: -1 if buffer_steps[i] is None else buffer_steps[i])
