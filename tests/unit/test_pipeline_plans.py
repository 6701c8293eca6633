"""Pipeline partition and schedule plans, checked in the pure simulator (no processes).

- partition: Megatron's interleaved layer assignment, every layer exactly once in virtual-stage order,
  uneven first/last stages, one-line ConfigErrors for impossible splits;
- plans: over a sweep of (pp, vp, microbatches), the simulator (which checks exactly-once
  forward/backward per chunk, backward after forward, FIFO-paired messages, no deadlock) accepts every
  plan, the peak in-flight activations equal the stated bound and the bubble equals (p-1)/(v*m);
- the simulator itself rejects hand-broken plans (deadlock, out-of-order messages, duplicated or
  missing compute), next to a positive control, so the checks above can fail.
"""

from __future__ import annotations

import pytest

from megazero.errors import ConfigError
from megazero.pipeline_parallel.partition import (chunk_layer_ranges, layers_per_virtual_stage, stage_of_virtual,
                                                  virtual_stage)
from megazero.pipeline_parallel.schedules import (BACKWARD, FORWARD, RECV_ACT, RECV_GRAD, SEND_ACT, SEND_GRAD,
                                                  Action, build_all_plans, build_plan, in_flight_bound,
                                                  validate_schedule)
from megazero.pipeline_parallel.simulate import DeadlockError, simulate

PPS, VPS, MICROBATCHES = (1, 2, 3, 4, 8), (1, 2, 3), range(1, 17)


def _valid(pp: int, vp: int, m: int) -> bool:
    """Megatron's rule, stated independently of validate_schedule."""
    return m >= 1 and (vp == 1 or (pp > 1 and m % pp == 0))


def _one_line_config_error(excinfo) -> str:
    msg = str(excinfo.value)
    assert msg and "\n" not in msg, repr(msg)
    return msg


def _compute(plan: list[Action]) -> list[tuple[str, int, int]]:
    return [(a.kind, a.microbatch, a.chunk) for a in plan if not a.is_comm]


# ------------------------------------------------------------------------------------------------ partition

def test_megatron_interleaved_assignment_example():
    # docs/pipeline.md's worked example: 16 layers, pp=4, vp=2 -> 2 layers per virtual stage.
    counts = layers_per_virtual_stage(16, 4, 2)
    assert counts == [2] * 8
    expected = {0: [(0, 1), (8, 9)], 1: [(2, 3), (10, 11)], 2: [(4, 5), (12, 13)], 3: [(6, 7), (14, 15)]}
    for r, chunks in expected.items():
        assert [tuple(rng) for rng in chunk_layer_ranges(r, 4, counts)] == chunks
    assert [stage_of_virtual(v, 4) for v in range(8)] == [(v % 4, v // 4) for v in range(8)]
    assert [virtual_stage(r, c, 4) for c in range(2) for r in range(4)] == list(range(8))


@pytest.mark.parametrize("num_layers,pp,vp,first,last", [
    (16, 1, 1, None, None), (16, 4, 1, None, None), (16, 4, 2, None, None), (24, 4, 3, None, None),
    (24, 8, 3, None, None), (12, 3, 2, None, None), (10, 4, 1, 1, 3), (16, 4, 2, 1, 3), (13, 4, 1, 1, None),
    (15, 4, 1, None, 3), (9, 2, 1, 4, 5), (18, 4, 2, 0, 6),
])
def test_every_layer_exactly_once_in_virtual_stage_order(num_layers, pp, vp, first, last):
    counts = layers_per_virtual_stage(num_layers, pp, vp, first, last)
    assert len(counts) == pp * vp and sum(counts) == num_layers and min(counts) >= 0
    if first is not None:
        assert counts[0] == first
    if last is not None:
        assert counts[-1] == last
    free = counts[int(first is not None): len(counts) - int(last is not None)]
    assert len(set(free)) <= 1, counts  # the rest split evenly
    ranges = {(r, c): rng for r in range(pp) for c, rng in enumerate(chunk_layer_ranges(r, pp, counts))}
    assert len(ranges) == pp * vp
    in_virtual_order = [layer for v in range(pp * vp) for layer in ranges[stage_of_virtual(v, pp)]]
    assert in_virtual_order == list(range(num_layers))


def test_uneven_first_and_last_stage():
    counts = layers_per_virtual_stage(10, 4, 1, first_stage_layers=1, last_stage_layers=3)
    assert counts == [1, 3, 3, 3]
    assert [list(chunk_layer_ranges(r, 4, counts)[0]) for r in range(4)] == [[0], [1, 2, 3], [4, 5, 6], [7, 8, 9]]
    counts = layers_per_virtual_stage(16, 4, 2, first_stage_layers=1, last_stage_layers=3)
    assert counts == [1, 2, 2, 2, 2, 2, 2, 3]
    assert chunk_layer_ranges(0, 4, counts) == [range(0, 1), range(7, 9)]
    assert chunk_layer_ranges(3, 4, counts) == [range(5, 7), range(13, 16)]


@pytest.mark.parametrize("num_layers,pp,vp,first,last,match", [
    (16, 3, 1, None, None, "not divisible"),                # layers % (pp*vp)
    (16, 4, 3, None, None, "not divisible"),
    (16, 1, 2, None, None, "needs --pipeline-model-parallel-size > 1"),  # vp > 1 with pp = 1
    (16, 4, 1, 10, 10, "exceed --num-layers 16"),            # first + last > num_layers
    (16, 4, 1, 2, 15, "exceed --num-layers 16"),
    (16, 2, 1, 5, 5, "must add up to --num-layers 16"),     # no free stage left to absorb the rest
    (16, 1, 1, None, 4, "more than one pipeline stage"),
    (16, 4, 1, 2, None, "not divisible"),                    # 14 over 3 remaining stages
])
def test_partition_rejects_with_one_line(num_layers, pp, vp, first, last, match):
    with pytest.raises(ConfigError, match=match) as excinfo:
        layers_per_virtual_stage(num_layers, pp, vp, first, last)
    _one_line_config_error(excinfo)


# ------------------------------------------------------------------------------------------------ plans

def _expected_in_flight(r: int, pp: int, vp: int, m: int) -> int:
    """Megatron's warm-up counts (+1 for the steady state's forward), restated independently."""
    if vp == 1:
        return min(pp - r, m)
    if m == pp:  # interleaved with m == pp: every forward runs first
        return m * vp
    return min((pp - r - 1) * 2 + (vp - 1) * pp + 1, m * vp)


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("vp", VPS)
def test_plans_simulate_with_bounded_in_flight_and_theoretical_bubble(pp, vp):
    checked = 0
    for m in MICROBATCHES:
        if not _valid(pp, vp, m):
            with pytest.raises(ConfigError) as excinfo:
                build_all_plans(pp, vp, m)
            _one_line_config_error(excinfo)
            continue
        plans = build_all_plans(pp, vp, m)
        for r, plan in enumerate(plans):
            assert sorted(_compute(plan)) == sorted((k, mb, c) for k in "FB" for mb in range(m) for c in range(vp))
        result = simulate(plans, vp, m)  # raises on any broken pairing, ordering, count or deadlock
        theory = (pp - 1) / (vp * m)
        for r in range(pp):
            peak = result.ranks[r].peak_in_flight
            assert peak == in_flight_bound(r, pp, vp, m) == _expected_in_flight(r, pp, vp, m), (pp, vp, m, r)
            assert result.bubble_ratio(r) == pytest.approx(theory, abs=1e-12), (pp, vp, m, r)
            assert result.idle_fraction(r) == pytest.approx(theory / (1 + theory), abs=1e-12), (pp, vp, m, r)
        # The formula holds for other cost ratios too (it counts in units of one forward+backward).
        other = simulate(plans, vp, m, forward_cost=1.0, backward_cost=1.0)
        assert [other.bubble_ratio(r) for r in range(pp)] == pytest.approx([theory] * pp, abs=1e-12)
        checked += 1
    assert checked == sum(_valid(pp, vp, m) for m in MICROBATCHES) and (checked > 0 or (pp == 1 and vp > 1))


@pytest.mark.parametrize("pp", PPS)
@pytest.mark.parametrize("vp", VPS)
def test_forward_only_plans(pp, vp):
    for m in MICROBATCHES:
        if not _valid(pp, vp, m):
            continue
        plans = build_all_plans(pp, vp, m, forward_only=True)
        for plan in plans:
            assert all(a.kind in (FORWARD, RECV_ACT, SEND_ACT) for a in plan)
            assert sorted(_compute(plan)) == sorted((FORWARD, mb, c) for mb in range(m) for c in range(vp))
        simulate(plans, vp, m, forward_only=True)
        # ...and the simulator notices when a training step is expected: no backward ran.
        with pytest.raises(AssertionError, match=r"B\(mb0, c0\) ran 0 times"):
            simulate(plans, vp, m)


def test_1f1b_order_golden():
    # pp=4, m=8, rank 1: 2 warm-up forwards, 6 x (F, B), 2 cool-down backwards.
    order = [f"{k}{mb}" for k, mb, _ in _compute(build_plan(1, 4, 1, 8))]
    assert order == ["F0", "F1", "F2", "B0", "F3", "B1", "F4", "B2", "F5", "B3", "F6", "B4", "F7", "B5", "B6", "B7"]
    # Comm around a middle stage: receive the activation from pp0, send it to pp2; gradients reverse.
    plan = build_plan(1, 4, 1, 8)
    assert plan[:3] == [Action(RECV_ACT, 0, 0, 0), Action(FORWARD, 0, 0), Action(SEND_ACT, 0, 0, 2)]
    assert plan[-3:] == [Action(RECV_GRAD, 7, 0, 2), Action(BACKWARD, 7, 0), Action(SEND_GRAD, 7, 0, 0)]


def test_interleaved_order_golden():
    # Megatron, pp=2, vp=2, m=4, rank 0: warm-up (2-0-1)*2 + (2-1)*2 = 4 forwards in groups of pp
    # microbatches per chunk; backward walks the chunks in reverse.
    order = [f"{k}{mb}c{c}" for k, mb, c in _compute(build_plan(0, 2, 2, 4))]
    assert order == ["F0c0", "F1c0", "F0c1", "F1c1",
                     "F2c0", "B0c1", "F3c0", "B1c1", "F2c1", "B0c0", "F3c1", "B1c0",
                     "B2c1", "B3c1", "B2c0", "B3c0"]
    # Rank 1 holds the last virtual stage (chunk 1): 2 warm-up forwards.
    order = [f"{k}{mb}c{c}" for k, mb, c in _compute(build_plan(1, 2, 2, 4))]
    assert order[:3] == ["F0c0", "F1c0", "F0c1"] and order[3] == "B0c1"


@pytest.mark.parametrize("pp,vp,m,match", [
    (1, 2, 4, "needs --pipeline-model-parallel-size > 1"),   # interleaving without a pipeline
    (4, 2, 6, "multiple of the pipeline size 4"),  # interleaved, m % pp != 0
    (2, 3, 3, "multiple of the pipeline size 2"),
    (4, 1, 0, "microbatches must be >= 1"),
    (4, 2, -4, "microbatches must be >= 1"),
])
def test_rejected_schedules_one_line(pp, vp, m, match):
    for call in (lambda: validate_schedule(pp, vp, m), lambda: build_all_plans(pp, vp, m),
                 lambda: build_plan(0, pp, vp, m, forward_only=True)):
        with pytest.raises(ConfigError, match=match) as excinfo:
            call()
        _one_line_config_error(excinfo)


@pytest.mark.parametrize("pp,vp,m", [(2, 0, 4), (2, -1, 4), (0, 1, 4)])
def test_rejects_non_positive_sizes(pp, vp, m):
    with pytest.raises(ConfigError):
        build_all_plans(pp, vp, m)


@pytest.mark.parametrize("pp,vp,first", [(4, 0, None), (0, 1, None), (4, 1, -1)])
def test_partition_non_positive_message_names_the_problem(pp, vp, first):
    with pytest.raises(ConfigError, match=r"virtual pipeline size \(\S+\) must be >= 1|"
                                          r"--decoder-first-pipeline-num-layers must be >= 0"):
        layers_per_virtual_stage(16, pp, vp, first_stage_layers=first)


def test_partition_rejects_empty_virtual_stages():
    with pytest.raises(ConfigError, match="every stage needs at least one layer"):
        layers_per_virtual_stage(16, 4, 2, first_stage_layers=8, last_stage_layers=8)


# ---------------------------------------------------------------------------------------- the simulator can fail

def _pp2_m1(rank0: list[Action] | None = None) -> list[list[Action]]:
    """A correct hand-written pp=2, vp=1, m=1 pair (or rank 0 replaced by a broken variant)."""
    ok0 = [Action(FORWARD, 0, 0), Action(SEND_ACT, 0, 0, 1), Action(RECV_GRAD, 0, 0, 1), Action(BACKWARD, 0, 0)]
    r1 = [Action(RECV_ACT, 0, 0, 0), Action(FORWARD, 0, 0), Action(BACKWARD, 0, 0), Action(SEND_GRAD, 0, 0, 0)]
    return [rank0 if rank0 is not None else ok0, r1]


def test_hand_plan_positive_control_and_timing():
    result = simulate(_pp2_m1(), vp=1, num_microbatches=1, forward_cost=1.0, backward_cost=2.0)
    # rank0 F [0,1]; rank1 F [1,2], B [2,4]; rank0 B [4,6]
    assert [(a.kind, s, e) for a, s, e in result.ranks[0].intervals] == [("F", 0.0, 1.0), ("B", 4.0, 6.0)]
    assert [(a.kind, s, e) for a, s, e in result.ranks[1].intervals] == [("F", 1.0, 2.0), ("B", 2.0, 4.0)]
    assert result.makespan == 6.0 and result.bubble_ratio(0) == 1.0 == result.bubble_ratio(1)


def test_comm_batch_posts_its_sends_before_blocking_on_its_receives():
    # The receive comes first inside one comm batch; the send is still posted, so no deadlock.
    rank0 = [Action(FORWARD, 0, 0), Action(RECV_GRAD, 0, 0, 1), Action(SEND_ACT, 0, 0, 1), Action(BACKWARD, 0, 0)]
    simulate(_pp2_m1(rank0), vp=1, num_microbatches=1)


def test_both_ranks_receiving_first_deadlocks():
    rank0 = [Action(RECV_GRAD, 0, 0, 1), Action(FORWARD, 0, 0), Action(SEND_ACT, 0, 0, 1), Action(BACKWARD, 0, 0)]
    with pytest.raises(DeadlockError, match="pp0.*recv_grad.*pp1.*recv_act"):
        simulate(_pp2_m1(rank0), vp=1, num_microbatches=1)


def test_send_to_the_wrong_peer_is_caught():
    plans = build_all_plans(3, 1, 3)
    plans[0] = [Action(a.kind, a.microbatch, a.chunk, 2) if a.kind == SEND_ACT else a for a in plans[0]]
    with pytest.raises((DeadlockError, AssertionError)):
        simulate(plans, 1, 3)


def test_mismatched_microbatch_order_is_caught():
    plans = build_all_plans(2, 1, 2)
    simulate(plans, 1, 2)  # positive control
    swap = {0: 1, 1: 0}  # rank 1 expects microbatch 1 first, rank 0 sends 0 first
    plans[1] = [Action(a.kind, swap[a.microbatch], a.chunk, a.peer) for a in plans[1]]
    with pytest.raises(AssertionError, match="received microbatch 0"):
        simulate(plans, 1, 2)


def test_duplicated_forward_is_caught():
    plan = build_plan(0, 1, 1, 2)
    with pytest.raises(AssertionError, match=r"F\(mb0, c0\) ran 2 times"):
        simulate([[Action(FORWARD, 0, 0)] + plan], 1, 2)
    # On a pipeline the duplicate also sends twice: a message nobody receives.
    plans = build_all_plans(2, 1, 2)
    plans[0] = plans[0][:2] + plans[0][:2] + plans[0][2:]  # F0, send_act0 twice
    with pytest.raises(AssertionError):
        simulate(plans, 1, 2)


def test_missing_or_early_backward_is_caught():
    plan = build_plan(0, 1, 1, 2)
    with pytest.raises(AssertionError, match=r"B\(mb1, c0\) ran 0 times"):
        simulate([plan[:-1]], 1, 2)
    with pytest.raises(AssertionError, match="before its forward"):
        simulate([[Action(BACKWARD, 0, 0), Action(FORWARD, 0, 0)]], 1, 1)


def test_wrong_chunk_tag_is_caught():
    # pp=2, vp=2: rank 1 receives microbatch 0's activation for chunk 1 where the plan sends it to chunk 0.
    plans = build_all_plans(2, 2, 2)
    simulate(plans, 2, 2)
    i = next(i for i, a in enumerate(plans[1]) if a.kind == RECV_ACT)
    a = plans[1][i]
    plans[1][i] = Action(a.kind, a.microbatch, 1, a.peer)
    with pytest.raises((DeadlockError, AssertionError)):
        simulate(plans, 2, 2)
