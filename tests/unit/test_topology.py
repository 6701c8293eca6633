"""Topology: the grid math as pure functions, and the groups a live gloo run builds."""

import pytest
import torch.distributed as dist

from megazero.errors import ConfigError
from megazero.topology import GridShape, Topology, coords_to_rank, rank_groups, rank_to_coords
from tests.dist_utils import run_distributed


def test_design_worked_example_16_ranks_tp2_pp4():
    groups = rank_groups(16, tp=2, pp=4)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert groups["pp"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert groups["embedding"] == [[0, 12], [1, 13], [2, 14], [3, 15]]
    assert groups["model"] == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]


@pytest.mark.parametrize("tp,dp,pp", [(t, d, p) for t in (1, 2, 4) for d in (1, 2, 3) for p in (1, 2, 4)])
def test_grid_sweep_is_a_partition_with_tp_fastest(tp, dp, pp):
    world = tp * dp * pp
    shape = GridShape(world, tp=tp, pp=pp)
    assert shape.dp == dp
    for rank in range(world):
        p, d, t = rank_to_coords(rank, shape)
        assert rank == t + tp * (d + dp * p) == coords_to_rank(p, d, t, shape)
    groups = rank_groups(world, tp, pp)
    for axis, size in (("tp", tp), ("dp", dp), ("pp", pp), ("model", tp * pp)):
        members = sorted(r for g in groups[axis] for r in g)
        assert members == list(range(world)), axis  # every rank in exactly one group
        assert all(len(g) == size for g in groups[axis]), axis
    for g in groups["tp"]:  # tp ranks are adjacent
        assert g == list(range(g[0], g[0] + tp))
    for g in groups["dp"]:  # a dp group shares pp and tp coordinates
        assert len({(rank_to_coords(r, shape)[0], rank_to_coords(r, shape)[2]) for r in g}) == 1
    for pipe, emb in zip(groups["pp"], groups["embedding"]):
        assert emb == ([pipe[0], pipe[-1]] if pp > 1 else [pipe[0]])


@pytest.mark.parametrize("world,tp,pp,needle", [
    (6, 4, 1, "world size 6 is not divisible by tensor-parallel size 4"),
    (8, 3, 1, "not divisible"),
    (8, 0, 1, "tp must be a positive integer"),
])
def test_bad_grid_is_a_one_line_error(world, tp, pp, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        GridShape(world, tp=tp, pp=pp)
    assert "\n" not in str(err.value)


def _live_groups(rank, world_size, tp, pp):
    topo = Topology.build(GridShape(world_size, tp=tp, pp=pp), rank)
    ranks_of = lambda g: sorted(dist.get_process_group_ranks(g))
    return {
        "coords": topo.coords,
        "tp": ranks_of(topo.tp_group),
        "dp": ranks_of(topo.dp_group),
        "pp": ranks_of(topo.pp_group),
        "model": ranks_of(topo.model_group),
        "embedding": ranks_of(topo.embedding_group),
        "neighbours": (topo.prev_stage_rank, topo.next_stage_rank),
    }


def test_live_8_rank_gloo_groups_match_the_pure_math():
    world, tp, pp = 8, 2, 2
    results = run_distributed(_live_groups, world, tp, pp)
    expected = rank_groups(world, tp, pp)
    shape = GridShape(world, tp=tp, pp=pp)
    for rank, got in enumerate(results):
        assert got["coords"] == rank_to_coords(rank, shape)
        for axis in ("tp", "dp", "pp", "model", "embedding"):
            mine = [g for g in expected[axis] if rank in g]
            assert [got[axis]] == mine, (rank, axis)
        pipe = next(g for g in expected["pp"] if rank in g)
        i = pipe.index(rank)
        assert got["neighbours"] == (pipe[i - 1] if i > 0 else None, pipe[i + 1] if i < pp - 1 else None)
