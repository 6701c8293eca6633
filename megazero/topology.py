"""The (pp, dp, tp) rank grid and the process groups built from it.

Grid order is Megatron-LM's default `tp-dp-pp`: tp varies fastest, pp slowest,

    global_rank = tp_rank + tp * (dp_rank + dp * pp_rank)

so TP peers are adjacent ranks (inside one node) and a megazero run places every rank in the same
groups as a Megatron run of the same shape. A context-parallel axis (size 1 today) will sit between tp
and dp, as in Megatron.

Two halves:
- pure functions (`rank_to_coords`, `coords_to_rank`, `rank_groups`) that need no processes and are
  what users inspect and tests check against DESIGN.md's worked example;
- `Topology`, an immutable object holding this rank's coordinates and every process group, built
  once by `Topology.build()` after `torch.distributed` is initialised. Components get the group they
  need from it as an argument.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from megazero.errors import ConfigError


@dataclass(frozen=True)
class GridShape:
    """Sizes of the grid axes. `dp` is derived: world_size // (tp * pp)."""

    world_size: int
    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        for name in ("world_size", "tp", "pp"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.world_size % (self.tp * self.pp) != 0:
            raise ConfigError(
                f"world size {self.world_size} is not divisible by tensor-parallel size {self.tp} x "
                f"pipeline-parallel size {self.pp} = {self.tp * self.pp}; launch a multiple of "
                f"{self.tp * self.pp} processes or change --tp/--pp"
            )

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.pp)


def rank_to_coords(rank: int, shape: GridShape) -> tuple[int, int, int]:
    """Global rank -> (pp_rank, dp_rank, tp_rank)."""
    assert 0 <= rank < shape.world_size, f"rank {rank} outside world of {shape.world_size}"
    tp_rank = rank % shape.tp
    dp_rank = (rank // shape.tp) % shape.dp
    pp_rank = rank // (shape.tp * shape.dp)
    return pp_rank, dp_rank, tp_rank


def coords_to_rank(pp_rank: int, dp_rank: int, tp_rank: int, shape: GridShape) -> int:
    assert 0 <= tp_rank < shape.tp and 0 <= dp_rank < shape.dp and 0 <= pp_rank < shape.pp
    return tp_rank + shape.tp * (dp_rank + shape.dp * pp_rank)


_AXES = ("pp", "dp", "tp")


def _groups_along(shape: GridShape, varying: tuple[str, ...]) -> list[list[int]]:
    """Groups of ranks whose coordinates differ only along the `varying` axes, each in rank order."""
    buckets: dict[tuple[int, ...], list[int]] = {}
    for rank in range(shape.world_size):
        coords = dict(zip(_AXES, rank_to_coords(rank, shape)))
        key = tuple(coords[a] for a in _AXES if a not in varying)
        buckets.setdefault(key, []).append(rank)
    return list(buckets.values())  # dicts keep insertion order: groups sorted by first member


def embedding_groups(shape: GridShape) -> list[list[int]]:
    """First and last pipeline stage of every pipeline (they share the tied word embedding)."""
    return [[g[0], g[-1]] if len(g) > 1 else [g[0]] for g in _groups_along(shape, ("pp",))]


def rank_groups(world_size: int, tp: int = 1, pp: int = 1) -> dict[str, list[list[int]]]:
    """Process-free view of every group: {'tp', 'dp', 'pp', 'model', 'embedding'} -> list of rank lists.

    >>> rank_groups(16, tp=2, pp=4)["dp"][:2]
    [[0, 2], [1, 3]]
    """
    shape = GridShape(world_size=world_size, tp=tp, pp=pp)
    return {
        "tp": _groups_along(shape, ("tp",)),
        "dp": _groups_along(shape, ("dp",)),
        "pp": _groups_along(shape, ("pp",)),
        "model": _groups_along(shape, ("pp", "tp")),
        "embedding": embedding_groups(shape),
    }


@dataclass(frozen=True)
class Topology:
    """This rank's place in the grid and every process group it belongs to.

    Built once (`Topology.build`) after the default process group exists. Immutable: nothing in
    megazero mutates or replaces groups after start-up.
    """

    shape: GridShape
    rank: int
    tp_group: Any = field(repr=False)
    dp_group: Any = field(repr=False)
    pp_group: Any = field(repr=False)
    model_group: Any = field(repr=False)  # tp x pp: every rank holding a distinct slice of the model
    embedding_group: Any = field(repr=False)  # first + last pipeline stage (tied embeddings)
    world_group: Any = field(repr=False, default=None)  # every rank (accounting gathers, barriers)
    pp_ranks: tuple[int, ...] = ()  # global ranks of this rank's pipeline, stage order
    embedding_ranks: tuple[int, ...] = ()

    @property
    def world_size(self) -> int:
        return self.shape.world_size

    @property
    def tp(self) -> int:
        return self.shape.tp

    @property
    def pp(self) -> int:
        return self.shape.pp

    @property
    def dp(self) -> int:
        return self.shape.dp

    @property
    def coords(self) -> tuple[int, int, int]:
        return rank_to_coords(self.rank, self.shape)

    @property
    def pp_rank(self) -> int:
        return self.coords[0]

    @property
    def dp_rank(self) -> int:
        return self.coords[1]

    @property
    def tp_rank(self) -> int:
        return self.coords[2]

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
        are created here and the non-member handles are dropped.
        """
        import torch.distributed as dist

        from megazero import comm

        groups = rank_groups(shape.world_size, shape.tp, shape.pp)
        mine: dict[str, Any] = {}
        member_lists: dict[str, list[int]] = {}
        for axis in ("tp", "dp", "pp", "model", "embedding"):
            for ranks in groups[axis]:
                handle = comm.new_group(ranks, backend=backend)
                comm.traffic.name_group(handle, axis)
                if rank in ranks:
                    mine[axis] = handle
                    member_lists[axis] = ranks
        # Ranks in the middle of a pipeline belong to no embedding group (pp > 2).
        return cls(
            shape=shape,
            rank=rank,
            tp_group=mine["tp"],
            dp_group=mine["dp"],
            pp_group=mine["pp"],
            model_group=mine["model"],
            embedding_group=mine.get("embedding"),
            world_group=dist.group.WORLD,
            pp_ranks=tuple(member_lists["pp"]),
            embedding_ranks=tuple(member_lists.get("embedding", ())),
        )

    def describe(self) -> str:
        pp_rank, dp_rank, tp_rank = self.coords
        return (
            f"rank {self.rank}/{self.world_size}: tp {tp_rank}/{self.tp}, dp {dp_rank}/{self.dp}, "
            f"pp {pp_rank}/{self.pp}"
        )
