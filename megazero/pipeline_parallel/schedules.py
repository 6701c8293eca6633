"""Pipeline schedules as *plans*: pure lists of actions per pipeline rank.

A plan says, for one rank, in order: forward / backward of microbatch m on model chunk c, and the
sends / receives of activations (forward) and gradients (backward) around them. It is a pure function
of (pp rank, pp size, vp, number of microbatches); nothing here touches processes, so plans are
unit-tested (every microbatch forwarded and backwarded exactly once per chunk, sends and receives pair
up, no deadlock, in-flight bound) and drawn (tools/plot_schedule.py) without any. `executor.py` runs a
plan on real tensors.

Schedules:
- 1F1B (vp = 1; pp = 1 is plain gradient accumulation): rank r first runs min(pp - r - 1, m) warm-up
  forwards, then alternates one forward and one backward, then drains the remaining backwards. At
  most min(pp - r, m) microbatches are in flight (forwarded, not yet backwarded) on rank r.
- Interleaved 1F1B (vp > 1, Megatron's schedule): the m*vp (microbatch, chunk) pairs run in groups of
  pp microbatches per chunk; warm-up is (pp - r - 1) * 2 + (vp - 1) * pp forwards (all of them when
  m == pp). The bubble shrinks by a factor vp: (pp - 1) / (vp * m) of the ideal time instead of
  (pp - 1) / m.

Communication actions carry the *peer's pipeline rank*. Comm actions that are adjacent in a plan are
posted together (one batch_isend_irecv) by the executor, sends never block, receives block; the
simulator in simulate.py checks plans against exactly those semantics.
"""

from __future__ import annotations

from dataclasses import dataclass

from megazero.errors import ConfigError
from megazero.pipeline_parallel.partition import stage_of_virtual, virtual_stage

FORWARD, BACKWARD = "F", "B"
SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD = "send_act", "recv_act", "send_grad", "recv_grad"
COMM_KINDS = (SEND_ACT, RECV_ACT, SEND_GRAD, RECV_GRAD)


@dataclass(frozen=True)
class Action:
    kind: str  # FORWARD | BACKWARD | one of COMM_KINDS
    microbatch: int
    chunk: int  # this rank's model chunk the action belongs to
    peer: int | None = None  # pipeline rank of the other side (comm actions only)

    @property
    def is_comm(self) -> bool:
        return self.kind in COMM_KINDS

    def __str__(self) -> str:
        where = f" <-> pp{self.peer}" if self.peer is not None else ""
        return f"{self.kind}(mb{self.microbatch}, c{self.chunk}){where}"


def validate_schedule(pp: int, vp: int, num_microbatches: int) -> None:
    if pp < 1 or vp < 1:
        raise ConfigError(f"pipeline size ({pp}) and virtual pipeline size ({vp}) must be >= 1")
    if num_microbatches < 1:
        raise ConfigError(f"number of microbatches must be >= 1, got {num_microbatches}")
    if vp > 1:
        if pp == 1:
            raise ConfigError("interleaved pipeline schedule (vp > 1) needs --pipeline-model-parallel-size > 1")
        if num_microbatches % pp:
            raise ConfigError(
                f"interleaved pipeline schedule needs the number of microbatches ({num_microbatches}) to be a "
                f"multiple of the pipeline size {pp} (--pipeline-model-parallel-size); in pretrain_gpt.py the "
                f"microbatches are global batch / (micro batch x dp): change --global-batch-size or --micro-batch-size")


def _forward_actions(pp_rank: int, pp: int, vp: int, mb: int, chunk: int) -> list[Action]:
    v = virtual_stage(pp_rank, chunk, pp)
    acts = []
    if v > 0:
        acts.append(Action(RECV_ACT, mb, chunk, stage_of_virtual(v - 1, pp)[0]))
    acts.append(Action(FORWARD, mb, chunk))
    if v < pp * vp - 1:
        acts.append(Action(SEND_ACT, mb, chunk, stage_of_virtual(v + 1, pp)[0]))
    return acts


def _backward_actions(pp_rank: int, pp: int, vp: int, mb: int, chunk: int) -> list[Action]:
    v = virtual_stage(pp_rank, chunk, pp)
    acts = []
    if v < pp * vp - 1:
        acts.append(Action(RECV_GRAD, mb, chunk, stage_of_virtual(v + 1, pp)[0]))
    acts.append(Action(BACKWARD, mb, chunk))
    if v > 0:
        acts.append(Action(SEND_GRAD, mb, chunk, stage_of_virtual(v - 1, pp)[0]))
    return acts


def _interleaved_order(pp: int, vp: int, m: int, k: int, backward: bool) -> tuple[int, int]:
    """k-th forward (or backward) of a rank -> (microbatch, chunk): groups of pp microbatches per chunk."""
    group, within = divmod(k, pp * vp)
    chunk = within // pp
    if backward:
        chunk = vp - 1 - chunk
    return group * pp + within % pp, chunk


def warmup_forwards(pp_rank: int, pp: int, vp: int, m: int) -> int:
    total = m * vp
    if vp == 1:
        return min(pp - pp_rank - 1, m)
    if m == pp:
        return total  # Megatron: with m == pp the interleaved schedule runs every forward first
    return min((pp - pp_rank - 1) * 2 + (vp - 1) * pp, total)


def in_flight_bound(pp_rank: int, pp: int, vp: int, m: int) -> int:
    """Most (microbatch, chunk) activations a rank holds at once under the schedule."""
    return min(warmup_forwards(pp_rank, pp, vp, m) + 1, m * vp)


def build_plan(pp_rank: int, pp: int, vp: int, num_microbatches: int, forward_only: bool = False) -> list[Action]:
    """The ordered actions of one pipeline rank for one training (or evaluation) step."""
    validate_schedule(pp, vp, num_microbatches)
    m, total = num_microbatches, num_microbatches * vp

    def fwd(k: int) -> list[Action]:
        return _forward_actions(pp_rank, pp, vp, *_interleaved_order(pp, vp, m, k, backward=False))

    def bwd(k: int) -> list[Action]:
        return _backward_actions(pp_rank, pp, vp, *_interleaved_order(pp, vp, m, k, backward=True))

    if forward_only:
        return [a for k in range(total) for a in fwd(k)]
    warmup = warmup_forwards(pp_rank, pp, vp, m)
    plan: list[Action] = []
    for k in range(warmup):
        plan += fwd(k)
    for k in range(total - warmup):  # steady state: one forward, one backward
        plan += fwd(warmup + k)
        plan += bwd(k)
    for k in range(total - warmup, total):  # cool-down
        plan += bwd(k)
    return plan


def build_all_plans(pp: int, vp: int, num_microbatches: int, forward_only: bool = False) -> list[list[Action]]:
    validate_schedule(pp, vp, num_microbatches)
    return [build_plan(r, pp, vp, num_microbatches, forward_only) for r in range(pp)]
