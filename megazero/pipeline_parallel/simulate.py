"""Run a set of plans (one per pipeline rank) in a pure simulation, under the executor's semantics.

Semantics (the same the executor gives on gloo / nccl):
- a rank runs its actions in order; adjacent comm actions form one batch whose sends are posted
  first (never blocking), then whose receives block until the matching message has been sent;
- messages travel on channels (src rank, dst rank, tag) and are matched first-in first-out, with
  tag = (activation | gradient, receiving chunk), as the executor tags them;
- forward costs `forward_cost`, backward `backward_cost`; a message arrives `comm_cost` after it
  is sent (0 in the textbook bubble formula; the bench passes the measured p2p latency).

`simulate()` checks that every message is received as the (microbatch, chunk) the receiver expects,
that every (microbatch, chunk) is forwarded and backwarded exactly once with the backward after the
forward, and that no rank waits forever (a deadlock raises, naming the stuck actions). It returns per
rank compute intervals, idle time, and the peak number of in-flight activations, from which the
bubble fraction and the schedule picture (tools/plot_schedule.py) are made.
"""

from __future__ import annotations

from collections import defaultdict, deque
from dataclasses import dataclass, field

from megazero.pipeline_parallel.partition import stage_of_virtual, virtual_stage
from megazero.pipeline_parallel.schedules import (BACKWARD, FORWARD, RECV_ACT, RECV_GRAD, SEND_ACT, SEND_GRAD,
                                                  Action)


class DeadlockError(RuntimeError):
    pass


def message_tag(kind: str, receiving_chunk: int) -> int:
    """Tag of an activation (even) or gradient (odd) message, by the chunk that receives it."""
    return 2 * receiving_chunk + (1 if kind in (SEND_GRAD, RECV_GRAD) else 0)


def receiving_chunk(action: Action, pp_rank: int, pp: int) -> int:
    """For a send: the chunk on the peer that receives it. For a receive: this action's own chunk."""
    if action.kind == SEND_ACT:
        return stage_of_virtual(virtual_stage(pp_rank, action.chunk, pp) + 1, pp)[1]
    if action.kind == SEND_GRAD:
        return stage_of_virtual(virtual_stage(pp_rank, action.chunk, pp) - 1, pp)[1]
    return action.chunk


@dataclass
class RankTrace:
    intervals: list[tuple[Action, float, float]] = field(default_factory=list)  # compute actions
    end: float = 0.0
    peak_in_flight: int = 0

    @property
    def busy(self) -> float:
        return sum(e - s for _, s, e in self.intervals)


@dataclass
class SimulationResult:
    ranks: list[RankTrace]

    @property
    def makespan(self) -> float:
        return max(r.end for r in self.ranks)

    def idle_fraction(self, rank: int) -> float:
        """Share of the step's wall time this rank spends not computing."""
        return 1.0 - self.ranks[rank].busy / self.makespan

    def bubble_ratio(self, rank: int) -> float:
        """Idle time over busy time: the quantity Megatron's (p-1)/(v*m) predicts."""
        busy = self.ranks[rank].busy
        return (self.makespan - busy) / busy


def _batches(plan: list[Action]) -> list[list[Action]]:
    out: list[list[Action]] = []
    for a in plan:
        if a.is_comm and out and out[-1][0].is_comm:
            out[-1].append(a)
        else:
            out.append([a])
    return out


def simulate(plans: list[list[Action]], vp: int, num_microbatches: int, forward_cost: float = 1.0,
             backward_cost: float = 2.0, forward_only: bool = False, comm_cost: float = 0.0) -> SimulationResult:
    pp = len(plans)
    batches = [_batches(p) for p in plans]
    cursor = [0] * pp
    posted = [False] * pp  # sends of the current comm batch already posted
    clock = [0.0] * pp
    traces = [RankTrace() for _ in range(pp)]
    channels: dict[tuple[int, int, int], deque] = defaultdict(deque)  # -> (mb, sent_at)
    in_flight = [0] * pp
    done: dict[tuple[str, int, int, int], int] = defaultdict(int)  # (kind, rank, mb, chunk) -> count

    def step(r: int) -> bool:
        batch = batches[r][cursor[r]]
        first = batch[0]
        if not first.is_comm:
            cost = forward_cost if first.kind == FORWARD else backward_cost
            key = (first.kind, r, first.microbatch, first.chunk)
            if first.kind == BACKWARD and not done[(FORWARD, r, first.microbatch, first.chunk)]:
                raise AssertionError(f"pp{r}: {first} before its forward")
            done[key] += 1
            in_flight[r] += 1 if first.kind == FORWARD else -1
            traces[r].peak_in_flight = max(traces[r].peak_in_flight, in_flight[r])
            traces[r].intervals.append((first, clock[r], clock[r] + cost))
            clock[r] += cost
            return True
        if not posted[r]:
            for a in batch:
                if a.kind in (SEND_ACT, SEND_GRAD):
                    tag = message_tag(a.kind, receiving_chunk(a, r, pp))
                    channels[(r, a.peer, tag)].append((a.microbatch, clock[r] + comm_cost))
            posted[r] = True
        recvs = [a for a in batch if a.kind in (RECV_ACT, RECV_GRAD)]
        keys = [(a.peer, r, message_tag(a.kind, a.chunk)) for a in recvs]
        # FIFO per channel: the i-th receive on a channel in this batch takes the i-th queued message
        need: dict = defaultdict(int)
        for k in keys:
            need[k] += 1
        if any(len(channels[k]) < n for k, n in need.items()):
            return False
        for a, k in zip(recvs, keys):
            mb, sent_at = channels[k].popleft()
            if mb != a.microbatch:
                raise AssertionError(f"pp{r}: {a} received microbatch {mb} (sends and receives out of order)")
            clock[r] = max(clock[r], sent_at)
        posted[r] = False
        return True

    while True:
        progressed = False
        for r in range(pp):
            while cursor[r] < len(batches[r]) and step(r):
                cursor[r] += 1
                progressed = True
        if all(cursor[r] == len(batches[r]) for r in range(pp)):
            break
        if not progressed:
            stuck = {f"pp{r}": [str(a) for a in batches[r][cursor[r]]] for r in range(pp) if cursor[r] < len(batches[r])}
            raise DeadlockError(f"pipeline plans deadlock; waiting: {stuck}")

    leftovers = {k: len(q) for k, q in channels.items() if q}
    if leftovers:
        raise AssertionError(f"messages sent but never received: {leftovers}")
    kinds = (FORWARD,) if forward_only else (FORWARD, BACKWARD)
    for r in range(pp):
        for chunk in range(vp):
            for mb in range(num_microbatches):
                for kind in kinds:
                    n = done[(kind, r, mb, chunk)]
                    if n != 1:
                        raise AssertionError(f"pp{r}: {kind}(mb{mb}, c{chunk}) ran {n} times")
        traces[r].end = clock[r]
    return SimulationResult(traces)
