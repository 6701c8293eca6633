"""The rank grid (tp, cp, dp, pp) and the process groups built from it.

Grid order is Megatron-LM's default `tp-cp-dp-pp`: tp varies fastest, pp slowest,

    global_rank = tp_rank + tp * (cp_rank + cp * (dp_rank + dp * pp_rank))

so TP peers are adjacent ranks (inside one node) and a megazero run places every rank in the same
groups as a Megatron run of the same shape. The context-parallel axis is --context-parallel-size
(default 1); with cp = 1 the formula is Megatron's `tp-dp-pp`.

Coordinates are named (`Coords(tp=, cp=, dp=, pp=)`), never unpacked by position, so adding an axis
moves no caller. Groups are named too (`dp_cp_index` / `Topology.dp_cp_rank`: a rank's index in its
dp_cp group):

    tp, cp, dp, pp     ranks differing only along that axis
    dp_cp              dp x cp: parameters are replicated over both, so gradients are reduced and ZeRO
                       shards over this group (equal to dp while cp = 1)
    tp_cp              tp x cp (equal to tp while cp = 1)
    model              tp x pp: every rank holding a distinct slice of the model
    embedding          first + last stage of each pipeline (tied word embedding)

Two halves:
- pure functions (`rank_to_coords`, `coords_to_rank`, `rank_groups`) that need no processes and are
  what users inspect and tests check against DESIGN.md's worked examples;
- `Topology`, an immutable object holding this rank's coordinates and every process group, built
  once by `Topology.build()` after `torch.distributed` is initialised. Components get the group they
  need from it as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megazero.errors import ConfigError

AXES = ("tp", "cp", "dp", "pp")  # fastest-varying first (Megatron's order string, left to right)

# Every named group: which axes vary inside it. Build order = this order, identical on all ranks.
GROUP_AXES: dict[str, tuple[str, ...]] = {
    "tp": ("tp",),
    "cp": ("cp",),
    "dp": ("dp",),
    "pp": ("pp",),
    "dp_cp": ("dp", "cp"),
    "tp_cp": ("tp", "cp"),
    "model": ("tp", "pp"),
}
GROUP_NAMES = (*GROUP_AXES, "embedding")
# The groups that existed before the cp axis keep their creation order and their own handles (so
# traffic accounting names stay as they were); the cp-related ones come after and may reuse a handle.
_BUILD_ORDER = ("tp", "dp", "pp", "model", "embedding", "cp", "dp_cp", "tp_cp")
_REUSABLE = frozenset({"cp", "dp_cp", "tp_cp"})


@dataclass(frozen=True)
class GridShape:
    """Sizes of the grid axes. `dp` is derived: world_size // (tp * cp * pp)."""

    world_size: int
    tp: int = 1
    pp: int = 1
    cp: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "pp", "cp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        model = self.tp * self.cp * self.pp
        if self.world_size % model != 0:
            cp = f"context-parallel size {self.cp} x " if self.cp > 1 else ""
            flags = "--tp/--cp/--pp" if self.cp > 1 else "--tp/--pp"
            raise ConfigError(
                f"world size {self.world_size} is not divisible by tensor-parallel size {self.tp} x {cp}"
                f"pipeline-parallel size {self.pp} = {model}; launch a multiple of {model} processes or "
                f"change {flags}"
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.cp * self.pp)

    def size(self, axis: str) -> int:
        assert axis in AXES, axis
        return getattr(self, axis)


@dataclass(frozen=True, kw_only=True)
class Coords:
    """One rank's position on every axis (keyword-only: no positional order to get wrong)."""

    tp: int
    cp: int = 0
    dp: int
    pp: int


def rank_to_coords(rank: int, shape: GridShape) -> Coords:
    """Global rank -> its named coordinates (inverse of coords_to_rank)."""
    assert 0 <= rank < shape.world_size, f"rank {rank} outside world of {shape.world_size}"
    values, rest = {}, rank
    for axis in AXES:
        values[axis], rest = rest % shape.size(axis), rest // shape.size(axis)
    return Coords(**values)


def coords_to_rank(coords: Coords, shape: GridShape) -> int:
    """tp + tp * (cp + cp * (dp + dp * pp))."""
    rank = 0
    for axis in reversed(AXES):  # Horner, slowest axis first
        value = getattr(coords, axis)
        assert 0 <= value < shape.size(axis), (coords, shape)
        rank = rank * shape.size(axis) + value
    return rank


def dp_cp_index(coords: Coords, shape: GridShape) -> int:
    """This rank's index in its dp_cp group (group-rank order = global rank order, where cp varies
    faster than dp): cp + cp_size * dp. Equals dp while cp = 1."""
    return coords.cp + shape.cp * coords.dp


def _groups_along(shape: GridShape, varying: tuple[str, ...]) -> list[list[int]]:
    """Groups of ranks whose coordinates differ only along the `varying` axes, each in rank order."""
    buckets: dict[tuple[int, ...], list[int]] = {}
    for rank in range(shape.world_size):
        coords = rank_to_coords(rank, shape)
        key = tuple(getattr(coords, a) for a in AXES if a not in varying)
        buckets.setdefault(key, []).append(rank)
    return list(buckets.values())  # dicts keep insertion order: groups sorted by first member


def embedding_groups(shape: GridShape) -> list[list[int]]:
    """First and last pipeline stage of every pipeline (they share the tied word embedding)."""
    return [[g[0], g[-1]] if len(g) > 1 else [g[0]] for g in _groups_along(shape, ("pp",))]


def rank_groups(world_size: int, tp: int = 1, pp: int = 1, cp: int = 1) -> dict[str, list[list[int]]]:
    """Process-free view of every group (GROUP_NAMES) -> list of rank lists.

    >>> rank_groups(16, tp=2, pp=4)["dp"][:2]
    [[0, 2], [1, 3]]
    """
    shape = GridShape(world_size=world_size, tp=tp, pp=pp, cp=cp)
    groups = {name: _groups_along(shape, axes) for name, axes in GROUP_AXES.items()}
    groups["embedding"] = embedding_groups(shape)
    return groups


@dataclass(frozen=True)
class Topology:
    """This rank's place in the grid and every process group it belongs to.

    Built once (`Topology.build`) after the default process group exists. Immutable: nothing in
    megazero mutates or replaces groups after start-up. `group(name)` / `ranks(name)` for any of
    GROUP_NAMES; the common ones are also attributes (tp_group, dp_cp_group, ...).
    """

    shape: GridShape
    rank: int
    groups: dict[str, Any] = field(repr=False, compare=False)  # name -> handle (None: not a member)
    members: dict[str, tuple[int, ...]] = field(repr=False, compare=False)  # name -> global ranks
    world_group: Any = field(repr=False, default=None)  # every rank (accounting gathers, barriers)

    def group(self, name: str) -> Any:
        assert name in GROUP_NAMES, f"unknown group {name!r}; one of {GROUP_NAMES}"
        return self.groups.get(name)

    def ranks(self, name: str) -> tuple[int, ...]:
        """Global ranks of this rank's `name` group, in group-rank order (() if not a member)."""
        assert name in GROUP_NAMES, f"unknown group {name!r}; one of {GROUP_NAMES}"
        return self.members.get(name, ())

    # --- named groups ---
    tp_group = property(lambda self: self.group("tp"))
    cp_group = property(lambda self: self.group("cp"))
    dp_group = property(lambda self: self.group("dp"))
    pp_group = property(lambda self: self.group("pp"))
    dp_cp_group = property(lambda self: self.group("dp_cp"))  # gradient reduction, ZeRO (dp x cp)
    tp_cp_group = property(lambda self: self.group("tp_cp"))
    model_group = property(lambda self: self.group("model"))  # tp x pp
    embedding_group = property(lambda self: self.group("embedding"))  # None in mid-pipeline stages
    pp_ranks = property(lambda self: self.ranks("pp"))  # this rank's pipeline, stage order
    embedding_ranks = property(lambda self: self.ranks("embedding"))

    # --- sizes and coordinates ---
    @property
    def world_size(self) -> int:
        return self.shape.world_size

    tp = property(lambda self: self.shape.tp)
    cp = property(lambda self: self.shape.cp)
    dp = property(lambda self: self.shape.dp)
    pp = property(lambda self: self.shape.pp)

    @property
    def coords(self) -> Coords:
        return rank_to_coords(self.rank, self.shape)

    tp_rank = property(lambda self: self.coords.tp)
    cp_rank = property(lambda self: self.coords.cp)
    dp_rank = property(lambda self: self.coords.dp)
    pp_rank = property(lambda self: self.coords.pp)

    # dp x cp: the ranks over which parameters are replicated, so ZeRO's shard owners and the gradient
    # reduction (dp_cp_group). cp varies faster than dp in the grid, hence in the group's rank order.
    dp_cp = property(lambda self: self.shape.dp * self.shape.cp)
    dp_cp_rank = property(lambda self: dp_cp_index(self.coords, self.shape))

    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp - 1

    @property
    def prev_stage_rank(self) -> int | None:
        return self.pp_ranks[self.pp_rank - 1] if self.pp_rank > 0 else None

    @property
    def next_stage_rank(self) -> int | None:
        return self.pp_ranks[self.pp_rank + 1] if self.pp_rank < self.pp - 1 else None

    @classmethod
    def build(cls, shape: GridShape, rank: int, backend: str | None = None) -> "Topology":
        """Create every group of the grid (collectively, on all ranks) and keep the ones holding `rank`.

        torch requires every rank to call new_group for every group in the same order, so all groups
        are created here, in _BUILD_ORDER, and the non-member handles are dropped. A context-parallel
        group whose rank lists equal an earlier group's (while cp = 1: dp_cp = dp, tp_cp = tp, and the
        singleton cp groups = any size-1 axis) reuses that handle and its traffic name, so a cp = 1
        run creates no extra groups unless tp, dp and pp all exceed 1 (then one singleton per rank).
        The decision depends only on the shape, so every rank makes the same calls.
        """
        import torch.distributed as dist

        from megazero import comm

        lists = rank_groups(shape.world_size, shape.tp, shape.pp, shape.cp)
        created: list[tuple[list[list[int]], dict[int, Any]]] = []  # (rank lists, first member -> handle)
        mine: dict[str, Any] = {}
        members: dict[str, tuple[int, ...]] = {}
        for name in _BUILD_ORDER:
            handles = next((h for lst, h in created if lst == lists[name]), None) if name in _REUSABLE else None
            if handles is None:
                handles = {}
                for ranks in lists[name]:
                    handle = comm.new_group(ranks, backend=backend)
                    comm.traffic.name_group(handle, name)
                    handles[ranks[0]] = handle
                created.append((lists[name], handles))
            for ranks in lists[name]:
                if rank in ranks:
                    mine[name], members[name] = handles[ranks[0]], tuple(ranks)
        # Ranks in the middle of a pipeline belong to no embedding group (pp > 2).
        return cls(shape=shape, rank=rank, groups=mine, members=members, world_group=dist.group.WORLD)

    def describe(self) -> str:
        c = self.coords
        cp = f", cp {c.cp}/{self.cp}" if self.cp > 1 else ""
        return (f"rank {self.rank}/{self.world_size}: tp {c.tp}/{self.tp}{cp}, dp {c.dp}/{self.dp}, "
                f"pp {c.pp}/{self.pp}")
