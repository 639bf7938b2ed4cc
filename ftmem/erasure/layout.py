"""Where every byte of an EC group's parity lives: groups of nodes, stripes, chunks, parity slots.

A job's nodes are split into EC groups of ``n`` consecutive node ranks. Inside a group each member's data is cut
into ``chunk_size`` chunks; a *stripe* combines one chunk from each of ``k = n - f`` members, and its ``f``
parity blocks live on the other ``f`` members, so no member holds parity for data it holds itself and losing any
``f`` members loses nothing. Stripes come in *rounds* of ``n``; stripe ``t`` puts its parity on members
``(t + i) % n`` for ``i < f``, so over a round every member is data in ``k`` stripes and parity in ``f``: parity
memory is even across members and about ``f / k`` of the largest member's data.

Members hold different amounts of data; a member whose data is shorter is virtually zero-padded. Padding is
never stored or sent: a chunk past the end of a member's data has length 0 and reads as zeros.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

PAGE = 4096
MAX_DEFAULT_GROUP = 8
MIN_DEFAULT_GROUP = 3


class ErasureConfigError(ValueError):
    """An EC group configuration that cannot work; the message says which flag to change."""


def default_group_size(nnodes: int) -> int:
    """Group size when the user gave none: the whole job up to 8 nodes, else the largest divisor in [3, 8].

    Larger groups cost less parity memory per node but make every rebuild read from more peers; 8 bounds that.
    """
    if nnodes < 1:
        raise ErasureConfigError(f"--nnodes must be at least 1, got {nnodes}")
    if nnodes <= MAX_DEFAULT_GROUP:
        return nnodes
    for n in range(MAX_DEFAULT_GROUP, MIN_DEFAULT_GROUP - 1, -1):
        if nnodes % n == 0:
            return n
    raise ErasureConfigError(
        f"no EC group size in [{MIN_DEFAULT_GROUP}, {MAX_DEFAULT_GROUP}] divides --nnodes {nnodes}; "
        f"pass --ftmem-ec-group with a divisor of {nnodes}"
    )


def check_config(nnodes: int, n: int, f: int) -> None:
    """Reject a group size ``n`` / parity count ``f`` that cannot partition ``nnodes`` nodes into EC groups."""
    if n < 2:
        raise ErasureConfigError(f"--ftmem-ec-group must be at least 2 (a group of {n} has no peer to hold parity)")
    if not 1 <= f < n:
        raise ErasureConfigError(
            f"--ftmem-ec-parity {f} must be between 1 and {n - 1} for --ftmem-ec-group {n} "
            f"(at least one node of each group must hold data)"
        )
    if nnodes % n != 0:
        divisors = [d for d in range(2, nnodes + 1) if nnodes % d == 0]
        raise ErasureConfigError(
            f"--ftmem-ec-group {n} does not divide --nnodes {nnodes}; use one of {divisors}"
        )


def group_members(node: int, n: int) -> tuple[int, ...]:
    """Node ranks of ``node``'s EC group (consecutive ranks, so a group is known from the node rank alone)."""
    if node < 0 or n < 1:
        raise ValueError(f"invalid node {node} or group size {n}")
    first = node // n * n
    return tuple(range(first, first + n))


def choose_chunk_size(max_size: int, k: int, target: int = 4 << 20) -> int:
    """Chunk size for a group whose largest member holds ``max_size`` bytes: page-aligned, at most about
    ``target``, and as even as possible so the last round wastes little padding.

    Small chunks mean more per-stripe overhead (messages, encoder calls); large ones mean more padding and
    coarser pipelining. Data that fits one round uses the smallest page multiple that covers it.
    """
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    target = max(PAGE, target // PAGE * PAGE)
    if max_size <= 0:
        return PAGE
    rounds = -(-max_size // (k * target))
    chunk = -(-max_size // (rounds * k))
    return -(-chunk // PAGE) * PAGE


@dataclass(frozen=True)
class StripeLayout:
    """Stripe geometry of one EC group for one snapshot; every SMP of the group computes the same one.

    ``sizes[m]`` is the number of data bytes group member ``m`` (its position in the group, 0..n-1) holds.
    """

    n: int
    f: int
    chunk_size: int
    sizes: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", tuple(int(s) for s in self.sizes))
        if self.n < 2 or not 1 <= self.f < self.n:
            raise ValueError(f"need n >= 2 and 1 <= f < n, got n={self.n} f={self.f}")
        if self.chunk_size <= 0:
            raise ValueError(f"chunk_size must be positive, got {self.chunk_size}")
        if len(self.sizes) != self.n or any(s < 0 for s in self.sizes):
            raise ValueError(f"need {self.n} non-negative sizes, got {self.sizes}")

    @property
    def k(self) -> int:
        return self.n - self.f

    @property
    def rounds(self) -> int:
        return -(-max(self.sizes) // (self.k * self.chunk_size))

    @property
    def num_stripes(self) -> int:
        return self.rounds * self.n

    # Within a round the pattern repeats, so everything below is derived from position j = stripe % n.

    @cached_property
    def _data_rank(self) -> tuple[tuple[int, ...], ...]:
        """_data_rank[j][m]: how many data stripes member m has in a round before position j (its chunk index
        within the round when it is data at j)."""
        return tuple(
            tuple(sum(1 for i in range(j) if not self._is_parity(i, m)) for m in range(self.n)) for j in range(self.n)
        )

    @cached_property
    def _parity_positions(self) -> tuple[tuple[int, ...], ...]:
        """_parity_positions[m]: positions in a round where member m holds parity, ascending."""
        return tuple(tuple(j for j in range(self.n) if self._is_parity(j, m)) for m in range(self.n))

    def _is_parity(self, j: int, member: int) -> bool:
        return (member - j) % self.n < self.f

    def _check(self, stripe: int | None = None, member: int | None = None) -> None:
        if stripe is not None and not 0 <= stripe < self.num_stripes:
            raise ValueError(f"stripe {stripe} out of range [0, {self.num_stripes})")
        if member is not None and not 0 <= member < self.n:
            raise ValueError(f"member {member} out of range [0, {self.n})")

    def parity_members(self, stripe: int) -> tuple[int, ...]:
        """The ``f`` members holding this stripe's parity; member ``(stripe + i) % n`` holds parity block i."""
        self._check(stripe)
        return tuple((stripe + i) % self.n for i in range(self.f))

    def data_members(self, stripe: int) -> tuple[int, ...]:
        """The ``k`` members contributing data, ascending; a member's position here is its zfec block number."""
        self._check(stripe)
        j = stripe % self.n
        return tuple(m for m in range(self.n) if not self._is_parity(j, m))

    def is_parity(self, stripe: int, member: int) -> bool:
        """Whether ``member`` holds parity (rather than data) in ``stripe``."""
        self._check(stripe, member)
        return self._is_parity(stripe % self.n, member)

    def block_number(self, stripe: int, member: int) -> int:
        """zfec block number of what ``member`` holds in ``stripe``: its data position, or k + parity index."""
        self._check(stripe, member)
        j = stripe % self.n
        if self._is_parity(j, member):
            return self.k + (member - j) % self.n
        return sum(1 for m in range(member) if not self._is_parity(j, m))

    def data_chunk(self, stripe: int, member: int) -> tuple[int, int]:
        """(offset, length) of ``member``'s chunk of ``stripe`` within its own data; length is short near the
        end of its data and 0 past it, the rest reads as zeros."""
        if self.is_parity(stripe, member):
            raise ValueError(f"member {member} holds parity, not data, in stripe {stripe}")
        q = stripe // self.n * self.k + self._data_rank[stripe % self.n][member]
        offset = q * self.chunk_size
        return offset, max(0, min(self.chunk_size, self.sizes[member] - offset))

    def data_stripes(self, member: int) -> list[int]:
        """Stripes where ``member`` contributes data, in order of its data offsets (its q-th chunk is in the
        q-th one)."""
        self._check(member=member)
        return [t for t in range(self.num_stripes) if not self._is_parity(t % self.n, member)]

    def parity_stripes(self, member: int) -> list[int]:
        """Stripes where ``member`` holds parity, ascending; its parity buffer holds one chunk per entry, in
        this order."""
        self._check(member=member)
        positions = self._parity_positions[member]
        return [r * self.n + j for r in range(self.rounds) for j in positions]

    def parity_slot(self, stripe: int, member: int) -> int:
        """Index of this stripe's parity block in ``member``'s parity buffer (byte offset slot * chunk_size)."""
        if not self.is_parity(stripe, member):
            raise ValueError(f"member {member} holds data, not parity, in stripe {stripe}")
        return stripe // self.n * self.f + self._parity_positions[member].index(stripe % self.n)

    def parity_index(self, stripe: int, member: int) -> int:
        """Which parity block (0..f-1) ``member`` holds for ``stripe``; its zfec block number is k + this."""
        if not self.is_parity(stripe, member):
            raise ValueError(f"member {member} holds data, not parity, in stripe {stripe}")
        return (member - stripe) % self.n

    def parity_bytes(self, member: int) -> int:
        """Size of ``member``'s parity buffer: the same for every member, as rounds are balanced."""
        self._check(member=member)
        return self.rounds * self.f * self.chunk_size
