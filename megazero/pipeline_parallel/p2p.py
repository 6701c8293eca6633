"""Point-to-point transfers between pipeline stages.

Fixed shape/dtype contract per run: every activation and activation-gradient crossing a stage
boundary has the one shape and dtype the model chunks declare (`chunk.pipeline_activation(micro)`;
for the GPT [micro_batch, seq, hidden] in the model dtype, with seq sharded under sequence or
context parallelism), so receivers allocate buffers without a shape handshake. Adjacent comm actions of a plan are posted as one batch_isend_irecv; receives are
waited at once (their data is needed next), sends are returned as pending handles the executor waits
later (a send never blocks the plan: that is the semantics simulate.py proves plans deadlock-free under).
Tags separate activations from gradients and name the receiving chunk (simulate.message_tag).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.distributed as dist

from megazero import comm
from megazero.pipeline_parallel.schedules import RECV_ACT, RECV_GRAD, SEND_ACT, SEND_GRAD, Action
from megazero.pipeline_parallel.simulate import message_tag, receiving_chunk


@dataclass
class PendingSend:
    work: object
    tensor: torch.Tensor  # kept alive until the send completes


def declared_activation(chunks: Sequence[torch.nn.Module], micro_batch_size: int
                        ) -> tuple[tuple[int, ...], torch.dtype]:
    """The (shape, dtype) every chunk of this rank declares for what crosses a stage boundary
    (`pipeline_activation(micro_batch_size)`); they must agree: one buffer shape per run."""
    specs = {(tuple(shape), dtype) for shape, dtype in (c.pipeline_activation(micro_batch_size) for c in chunks)}
    assert len(specs) == 1, f"pipeline chunks declare different activations: {specs}"
    return next(iter(specs))


class PipelineP2P:
    def __init__(self, pp_ranks: tuple[int, ...], pp_rank: int, pp_group, shape: tuple[int, ...],
                 dtype: torch.dtype, device: torch.device):
        self.pp_ranks, self.pp_rank, self.group = pp_ranks, pp_rank, pp_group
        self.shape, self.dtype, self.device = tuple(shape), dtype, device

    @classmethod
    def for_chunks(cls, chunks: Sequence[torch.nn.Module], micro_batch_size: int, pp_ranks: tuple[int, ...],
                   pp_rank: int, pp_group, device: torch.device) -> "PipelineP2P":
        """Transfers shaped as the model chunks declare (declared_activation), so a model that shards
        its activations (sequence / context parallelism) changes no caller."""
        shape, dtype = declared_activation(chunks, micro_batch_size)
        return cls(pp_ranks, pp_rank, pp_group, shape, dtype, device)

    def exchange(self, actions: list[Action], send_tensors: dict[Action, torch.Tensor]
                 ) -> tuple[dict[Action, torch.Tensor], list[PendingSend]]:
        """Post one batch of adjacent comm actions. Returns received tensors (already arrived) and the
        pending sends."""
        pp = len(self.pp_ranks)
        ops, received, pending, recv_works = [], {}, [], []
        for a in actions:
            peer = self.pp_ranks[a.peer]
            tag = message_tag(a.kind, receiving_chunk(a, self.pp_rank, pp))
            if a.kind in (SEND_ACT, SEND_GRAD):
                tensor = send_tensors[a].contiguous()
                assert tuple(tensor.shape) == self.shape and tensor.dtype == self.dtype, \
                    (a, tuple(tensor.shape), tensor.dtype, "declared", self.shape, self.dtype)
                ops.append(dist.P2POp(dist.isend, tensor, peer, self.group, tag))
                pending.append(PendingSend(None, tensor))
            else:
                assert a.kind in (RECV_ACT, RECV_GRAD)
                buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
                ops.append(dist.P2POp(dist.irecv, buf, peer, self.group, tag))
                received[a] = buf
        works = comm.batch_isend_irecv(ops)
        send_iter = iter(pending)
        for op, work in zip(ops, works):
            if op.op is dist.isend:
                next(send_iter).work = work
            else:
                recv_works.append(work)
        for work in recv_works:
            work.wait()
        return received, pending
