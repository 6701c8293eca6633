"""Topology: the grid math as pure functions, and the groups a live gloo run builds."""

import pytest
import torch.distributed as dist

from megazero.errors import ConfigError
from megazero.topology import Coords, GridShape, Topology, coords_to_rank, rank_groups, rank_to_coords
from tests.dist_utils import run_distributed


def test_design_worked_example_16_ranks_tp2_pp4():
    groups = rank_groups(16, tp=2, pp=4)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert groups["dp"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert groups["pp"] == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert groups["embedding"] == [[0, 12], [1, 13], [2, 14], [3, 15]]
    assert groups["model"] == [[0, 1, 4, 5, 8, 9, 12, 13], [2, 3, 6, 7, 10, 11, 14, 15]]


def test_cp2_worked_example_16_ranks_tp2_cp2_pp2():
    """Megatron's tp-cp-dp-pp order worked by hand: rank = tp + 2 * (cp + 2 * (dp + 2 * pp)), dp = 2."""
    groups = rank_groups(16, tp=2, pp=2, cp=2)
    assert groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9], [10, 11], [12, 13], [14, 15]]
    assert groups["cp"] == [[0, 2], [1, 3], [4, 6], [5, 7], [8, 10], [9, 11], [12, 14], [13, 15]]
    assert groups["dp"] == [[0, 4], [1, 5], [2, 6], [3, 7], [8, 12], [9, 13], [10, 14], [11, 15]]
    assert groups["pp"] == [[0, 8], [1, 9], [2, 10], [3, 11], [4, 12], [5, 13], [6, 14], [7, 15]]
    assert groups["dp_cp"] == [[0, 2, 4, 6], [1, 3, 5, 7], [8, 10, 12, 14], [9, 11, 13, 15]]
    assert groups["tp_cp"] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert groups["model"] == [[0, 1, 8, 9], [2, 3, 10, 11], [4, 5, 12, 13], [6, 7, 14, 15]]
    assert groups["embedding"] == groups["pp"]  # pp = 2: first and last stage are the whole pipeline
    shape = GridShape(16, tp=2, pp=2, cp=2)
    assert rank_to_coords(13, shape) == Coords(tp=1, cp=0, dp=1, pp=1)
    assert coords_to_rank(Coords(tp=1, cp=1, dp=0, pp=1), shape) == 11


@pytest.mark.parametrize("tp,cp,dp,pp", [(t, c, d, p) for t in (1, 2) for c in (1, 2, 3) for d in (1, 2)
                                         for p in (1, 2)])
def test_combined_groups_are_products_of_their_axes(tp, cp, dp, pp):
    world = tp * cp * dp * pp
    shape = GridShape(world, tp=tp, pp=pp, cp=cp)
    assert shape.dp == dp
    for rank in range(world):
        c = rank_to_coords(rank, shape)
        assert rank == c.tp + tp * (c.cp + cp * (c.dp + dp * c.pp)) == coords_to_rank(c, shape)
    groups = rank_groups(world, tp, pp, cp)
    for name, axes in (("cp", ("cp",)), ("dp_cp", ("dp", "cp")), ("tp_cp", ("tp", "cp")), ("model", ("tp", "pp"))):
        size = 1
        for a in axes:
            size *= shape.size(a)
        assert sorted(r for g in groups[name] for r in g) == list(range(world)), name
        for g in groups[name]:
            assert len(g) == size and g == sorted(g), name
            fixed = {tuple(getattr(rank_to_coords(r, shape), a) for a in ("tp", "cp", "dp", "pp") if a not in axes)
                     for r in g}
            assert len(fixed) == 1, name  # members differ only along the group's own axes
    # dp x cp is the union of dp groups across cp (and of cp groups across dp)
    for g in groups["dp_cp"]:
        assert sorted(r for d in groups["dp"] if d[0] in g for r in d) == g


@pytest.mark.parametrize("tp,dp,pp", [(t, d, p) for t in (1, 2, 4) for d in (1, 2, 3) for p in (1, 2, 4)])
def test_grid_sweep_is_a_partition_with_tp_fastest(tp, dp, pp):
    world = tp * dp * pp
    shape = GridShape(world, tp=tp, pp=pp)
    assert shape.dp == dp
    for rank in range(world):
        c = rank_to_coords(rank, shape)
        assert c.cp == 0
        assert rank == c.tp + tp * (c.dp + dp * c.pp) == coords_to_rank(c, shape)
    groups = rank_groups(world, tp, pp)
    for axis, size in (("tp", tp), ("dp", dp), ("pp", pp), ("model", tp * pp)):
        members = sorted(r for g in groups[axis] for r in g)
        assert members == list(range(world)), axis  # every rank in exactly one group
        assert all(len(g) == size for g in groups[axis]), axis
    for g in groups["tp"]:  # tp ranks are adjacent
        assert g == list(range(g[0], g[0] + tp))
    for g in groups["dp"]:  # a dp group shares pp and tp coordinates
        assert len({(rank_to_coords(r, shape).pp, rank_to_coords(r, shape).tp) for r in g}) == 1
    assert groups["dp_cp"] == groups["dp"] and groups["tp_cp"] == groups["tp"]  # cp = 1
    assert groups["cp"] == [[r] for r in range(world)]
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


@pytest.mark.parametrize("world,tp,cp,pp,needle", [
    (8, 2, 3, 1, "tensor-parallel size 2 x context-parallel size 3 x pipeline-parallel size 1 = 6; .*--cp"),
    (8, 1, 0, 1, "cp must be a positive integer"),
])
def test_bad_cp_is_a_one_line_error(world, tp, cp, pp, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        GridShape(world, tp=tp, pp=pp, cp=cp)
    assert "\n" not in str(err.value)


def _live_groups(rank, world_size, tp, pp, cp=1):
    topo = Topology.build(GridShape(world_size, tp=tp, pp=pp, cp=cp), rank)
    ranks_of = lambda g: sorted(dist.get_process_group_ranks(g))
    return {
        "coords": topo.coords,
        "tp": ranks_of(topo.tp_group),
        "dp": ranks_of(topo.dp_group),
        "pp": ranks_of(topo.pp_group),
        "model": ranks_of(topo.model_group),
        "embedding": ranks_of(topo.embedding_group),
        "cp": ranks_of(topo.cp_group),
        "dp_cp": ranks_of(topo.dp_cp_group),
        "tp_cp": ranks_of(topo.tp_cp_group),
        "named": {name: ranks_of(topo.group(name)) for name in ("tp", "cp", "dp", "pp", "dp_cp", "tp_cp")},
        "reused": (topo.dp_cp_group is topo.dp_group, topo.tp_cp_group is topo.tp_group),
        "neighbours": (topo.prev_stage_rank, topo.next_stage_rank),
    }


def test_live_8_rank_gloo_groups_match_the_pure_math():
    world, tp, pp = 8, 2, 2
    results = run_distributed(_live_groups, world, tp, pp)
    expected = rank_groups(world, tp, pp)
    shape = GridShape(world, tp=tp, pp=pp)
    for rank, got in enumerate(results):
        assert got["coords"] == rank_to_coords(rank, shape)
        for axis in ("tp", "dp", "pp", "model", "embedding", "cp", "dp_cp", "tp_cp"):
            mine = [g for g in expected[axis] if rank in g]
            assert [got[axis]] == mine, (rank, axis)
        assert got["named"]["dp_cp"] == got["dp"] and got["reused"] == (True, True)  # cp = 1: no new groups
        pipe = next(g for g in expected["pp"] if rank in g)
        i = pipe.index(rank)
        assert got["neighbours"] == (pipe[i - 1] if i > 0 else None, pipe[i + 1] if i < pp - 1 else None)


def test_live_cp2_gloo_groups_match_the_pure_math():
    world, tp, pp, cp = 4, 1, 1, 2  # dp = 2: dp x cp spans the world, tp x cp = cp
    results = run_distributed(_live_groups, world, tp, pp, cp)
    expected = rank_groups(world, tp, pp, cp)
    for rank, got in enumerate(results):
        assert got["coords"] == rank_to_coords(rank, GridShape(world, tp=tp, pp=pp, cp=cp))
        for axis in ("tp", "cp", "dp", "pp", "dp_cp", "tp_cp", "model", "embedding"):
            assert [got[axis]] == [g for g in expected[axis] if rank in g], (rank, axis)
        assert got["reused"] == (False, False) and got["dp_cp"] == [0, 1, 2, 3] and got["tp_cp"] == got["cp"]
