"""The cp axis in config, flags, validation and the topology (issue 14 item 1). Pure and fast: parse_args,
validate and the grid math, no processes. (ZeRO over dp x cp and checkpoints across cp:
tests/unit/test_context_parallel_zero.py.)"""

import re

import pytest

from megazero.cli import parse_args
from megazero.config import RunConfig
from megazero.errors import ConfigError
from megazero.topology import GridShape, Topology, dp_cp_index, rank_groups, rank_to_coords
from megazero.validation import validate
from tests.unit.test_activation_flags import refusal  # validate(parse_args(argv), world): its one line

CP = ["--attention-dropout", "0"]  # context parallelism draws no attention dropout


def test_flags_and_defaults():
    p = parse_args([]).parallel
    assert (p.context_parallel_size, p.cp_comm_type) == (1, "p2p")
    for spelling in ("--cp", "--context-parallel-size"):
        p = parse_args([spelling, "2", "--cp-comm-type", "a2a"]).parallel
        assert (p.context_parallel_size, p.cp_comm_type) == (2, "a2a")
    with pytest.raises(ConfigError, match="^--cp must be >= 1, got 0$"):
        parse_args(["--cp", "0"])


@pytest.mark.parametrize("world,tp,cp,pp,dp", [(8, 1, 2, 1, 4), (8, 2, 2, 1, 2), (16, 2, 2, 2, 2), (4, 1, 4, 1, 1)])
def test_cp_ranks_share_samples(world, tp, cp, pp, dp):
    """dp = world / (tp x cp x pp), and the batch follows it (global = micro x accumulation x dp)."""
    cfg = RunConfig().replace(parallel={"tensor_model_parallel_size": tp, "context_parallel_size": cp,
                                        "pipeline_model_parallel_size": pp},
                              training={"micro_batch_size": 2, "global_batch_size": 4 * dp})
    assert cfg.data_parallel_size(world) == dp == GridShape(world, tp=tp, pp=pp, cp=cp).dp
    assert cfg.batch_sizes(world) == (2, 2, 4 * dp)


def test_batch_message_says_where_dp_comes_from():
    cfg = parse_args(["--cp", "2", "--micro-batch-size", "8", "--global-batch-size", "12", *CP])
    with pytest.raises(ConfigError) as e:
        cfg.batch_sizes(8)
    assert str(e.value) == ("--global-batch-size 12 is not divisible by --micro-batch-size 8 x data-parallel size 4 "
                            "(world 8 / (tp 1 x cp 2 x pp 1): context-parallel ranks share samples) = 32; use a "
                            "multiple of 32")


@pytest.mark.parametrize("argv,world", [
    (["--cp", "2", *CP], 4),
    (["--cp", "2", "--tp", "2", "--sequence-parallel", "--seq-length", "64", *CP], 8),
    (["--cp", "2", "--cp-comm-type", "a2a", "--tp", "2", "--num-attention-heads", "8", *CP], 4),
    # GQA, 2 kv groups at tp 4: each rank holds one (shared) kv head and 2 query heads
    (["--cp", "2", "--cp-comm-type", "a2a", "--tp", "4", "--num-attention-heads", "8", "--group-query-attention",
      "--num-query-groups", "2", *CP], 8),
    (["--cp", "4", "--position-embedding-type", "rope", "--seq-length", "64", *CP], 4),
    (["--cp", "2", "--position-embedding-type", "none", *CP], 2),
    (["--cp-comm-type", "a2a"], 1),  # cp 1: the comm type is unused, and dropout is fine
])
def test_valid_context_parallel_layouts(argv, world):
    validate(parse_args(argv), world)


@pytest.mark.parametrize("argv,world,needle", [
    (["--cp", "3", *CP], 8, "world size 8 is not divisible by tensor-parallel size 1 x context-parallel size 3 x "
                            "pipeline-parallel size 1 = 3; .* --tp/--cp/--pp"),
    (["--cp", "4", "--seq-length", "100", *CP], 4, "2 x 4 = 8 equal chunks .* --seq-length 100 must be a multiple "
                                                   "of 8"),
    (["--cp", "2", "--tp", "4", "--sequence-parallel", "--seq-length", "132", *CP], 8,
     r"each rank's 66 tokens .* across the 4 tensor-parallel ranks, so --seq-length must be a multiple of 8"),
    (["--cp", "2"], 2, "no attention dropout, and this run has --attention-dropout 0.1; add --attention-dropout 0"),
    (["--cp", "2", "--cp-comm-type", "a2a+p2p", *CP], 2, "a2a\\+p2p .* not built .*; use p2p .* or a2a"),
    (["--cp-comm-type", "a2a+p2p"], 1, "not built"),
    (["--cp", "4", "--cp-comm-type", "a2a", "--tp", "2", *CP], 8,
     r"heads per tensor-parallel rank \(2\) divisible by --context-parallel-size \(4\)"),
])
def test_bad_context_parallel_settings_are_one_line(argv, world, needle):
    msg = refusal(argv, world)
    assert re.search(needle, msg), msg


def test_unknown_comm_type_from_a_config_object():
    cfg = RunConfig().replace(parallel={"cp_comm_type": "ring"})
    with pytest.raises(ConfigError, match="--cp-comm-type must be p2p or a2a, got 'ring'"):
        validate(cfg, 1)


@pytest.mark.parametrize("tp,cp,dp,pp", [(1, 2, 2, 1), (2, 2, 2, 2), (2, 3, 2, 1), (1, 1, 4, 2)])
def test_dp_cp_rank_is_the_index_in_the_dp_cp_group(tp, cp, dp, pp):
    world = tp * cp * dp * pp
    shape = GridShape(world, tp=tp, pp=pp, cp=cp)
    groups = rank_groups(world, tp, pp, cp)["dp_cp"]
    for rank in range(world):
        group = next(g for g in groups if rank in g)
        topo = Topology(shape=shape, rank=rank, groups={}, members={})  # coordinates only, no process group
        assert topo.dp_cp == dp * cp == len(group)
        assert topo.dp_cp_rank == group.index(rank) == dp_cp_index(rank_to_coords(rank, shape), shape)
        if cp == 1:
            assert topo.dp_cp_rank == topo.dp_rank
