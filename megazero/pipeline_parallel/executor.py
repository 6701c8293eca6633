"""Runs one rank's plan (schedules.py) on real tensors: forward/backward of model chunks and the p2p
transfers between them.

Per (microbatch, chunk) the executor stashes what backward needs: the received input (a leaf that
requires grad, whose .grad is sent upstream) and the chunk's output. The last virtual stage's output is
the microbatch loss, divided by the number of microbatches before backward so accumulated gradients
are those of the batch-mean loss.

Output deallocation (Megatron's trick): once a chunk's output activation has been sent downstream its
data is not needed again (backward needs only its autograd node and the gradient that comes back), so
its storage is replaced by a 1-element tensor as soon as the send completes, and backward is run
through the autograd engine directly (torch.autograd.backward would compare the freed tensor's shape
with the gradient's). Activation memory then follows the schedule's in-flight count, not m.

Accounting: with `meter` set (a SavedTensorMeter, megazero/activation/saved_tensors.py, recording
around run()), each training forward runs in the meter's scope (microbatch, "other") and each backward
in ("recompute", "other"), which the meter's per-layer hooks refine to (microbatch, layer) and
("recompute", layer). Forward-only runs save nothing and are not scoped.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import torch
from torch.autograd import Variable

from megazero.pipeline_parallel.p2p import PendingSend, PipelineP2P
from megazero.pipeline_parallel.partition import virtual_stage
from megazero.pipeline_parallel.schedules import (FORWARD, RECV_ACT, SEND_ACT, SEND_GRAD,
                                                  Action)
from megazero.watchdog import context as run_context  # what a timeout report says this rank was doing

Microbatch = dict[str, torch.Tensor]
# loss_fn(chunk, inputs, batch) -> mean loss of the microbatch (last virtual stage only)
LossFn = Callable[[torch.nn.Module, torch.Tensor, Microbatch], torch.Tensor]


def _free_storage(t: torch.Tensor) -> None:
    t.data = torch.empty((1,), dtype=t.dtype, device=t.device)


def _backward_from(output: torch.Tensor, grad: torch.Tensor | None) -> None:
    """Backward from `output` whose data may have been freed: call the engine directly."""
    Variable._execution_engine.run_backward(
        (output,), (grad,), keep_graph=False, create_graph=False, inputs=(), allow_unreachable=True,
        accumulate_grad=True)


class PipelineExecutor:
    """`input_key`: the microbatch entry the first virtual stage consumes (the rest of the
    microbatch reaches only loss_fn). What crosses stages is whatever `p2p` was shaped for
    (PipelineP2P.for_chunks: the chunks' declared activation)."""

    def __init__(self, chunks: list[torch.nn.Module], pp_rank: int, pp: int, p2p: PipelineP2P | None,
                 input_key: str = "tokens"):
        self.chunks, self.pp_rank, self.pp, self.p2p = chunks, pp_rank, pp, p2p
        self.input_key = input_key
        self.vp = len(chunks)
        self.last_virtual = pp * self.vp - 1
        self.record_timeline = False
        self.events: list[dict] = []  # compute intervals of the last run, when record_timeline
        self.peak_in_flight = 0
        self.outputs_freed_before_backward = True
        self.meter = None  # a SavedTensorMeter whose labels this executor sets (see the module docstring)

    def _scope(self, label):
        return self.meter.scope(label) if self.meter is not None else contextlib.nullcontext()

    def run(self, plan: list[Action], microbatches: list[Microbatch], loss_fn: LossFn,
            forward_only: bool = False, grad_scale: float = 1.0) -> list[torch.Tensor]:
        """Execute `plan`; returns the detached per-microbatch losses (last stage; empty elsewhere).
        Backward starts from loss * grad_scale / m (grad_scale: the fp16 loss scale)."""
        m = len(microbatches)
        inputs: dict[tuple[int, int], torch.Tensor] = {}
        outputs: dict[tuple[int, int], torch.Tensor] = {}
        grads_in: dict[tuple[int, int], torch.Tensor] = {}  # gradients received for our outputs
        grads_out: dict[tuple[int, int], torch.Tensor] = {}  # gradients of our inputs, to send upstream
        sends: dict[tuple[int, int], PendingSend] = {}  # activation sends not yet known complete
        other_sends: list[PendingSend] = []
        losses: list[torch.Tensor] = []
        self.events, self.peak_in_flight, self.outputs_freed_before_backward = [], 0, True

        def reap_sends(key: tuple[int, int] | None = None) -> None:
            """Free sent outputs whose send completed; for `key`, wait for it (its gradient is back, so
            the receiver has long posted its receive: this cannot block for long)."""
            for k in list(sends):
                if k == key:
                    sends[k].work.wait()
                if k == key or sends[k].work.is_completed():
                    if not forward_only:
                        _free_storage(outputs[k])
                    del sends[k]

        i = 0
        while i < len(plan):
            action = plan[i]
            if action.is_comm:
                batch = [action]
                while i + 1 < len(plan) and plan[i + 1].is_comm:
                    i += 1
                    batch.append(plan[i])
                run_context.action = batch
                to_send = {a: (outputs[(a.microbatch, a.chunk)] if a.kind == SEND_ACT
                               else grads_out.pop((a.microbatch, a.chunk)))
                           for a in batch if a.kind in (SEND_ACT, SEND_GRAD)}
                received, pending = self.p2p.exchange(batch, {a: t.detach() for a, t in to_send.items()})
                for a, p in zip([a for a in batch if a.kind in (SEND_ACT, SEND_GRAD)], pending):
                    if a.kind == SEND_ACT:
                        sends[(a.microbatch, a.chunk)] = p
                        if forward_only:
                            outputs.pop((a.microbatch, a.chunk))
                    else:
                        other_sends.append(p)
                for a, buf in received.items():
                    key = (a.microbatch, a.chunk)
                    if a.kind == RECV_ACT:
                        inputs[key] = buf.requires_grad_(not forward_only)
                    else:
                        grads_in[key] = buf
            else:
                reap_sends()
                run_context.action = action
                start = self._now()
                if action.kind == FORWARD:
                    with self._scope(None if forward_only else (action.microbatch, "other")):
                        loss = self._forward(action, microbatches, inputs, outputs, loss_fn, forward_only,
                                             grad_scale / m)
                    if loss is not None:
                        losses.append(loss)
                    self.peak_in_flight = max(self.peak_in_flight, len(outputs))  # stashed for backward
                else:
                    with self._scope(("recompute", "other")):
                        self._backward(action, inputs, outputs, grads_in, grads_out, sends, reap_sends)
                if self.record_timeline:
                    self.events.append({"kind": action.kind, "microbatch": action.microbatch,
                                        "chunk": action.chunk, "start": start, "end": self._now()})
            i += 1
        run_context.action = "completing the last pipeline sends"
        for p in other_sends:
            p.work.wait()
        reap_sends()
        for k in list(sends):
            reap_sends(k)
        assert not grads_in and not grads_out and (forward_only or not outputs), "plan left work undone"
        run_context.action = None
        return losses

    def _now(self) -> float:
        """Wall time for the timeline; on CUDA wait for queued kernels so intervals are compute, not launch."""
        if self.record_timeline and torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.synchronize()
        return time.time()

    def _forward(self, a: Action, microbatches, inputs, outputs, loss_fn, forward_only, loss_factor):
        v = virtual_stage(self.pp_rank, a.chunk, self.pp)
        batch = microbatches[a.microbatch]
        x = batch[self.input_key] if v == 0 else inputs[(a.microbatch, a.chunk)]
        if forward_only:
            inputs.pop((a.microbatch, a.chunk), None)
        chunk = self.chunks[a.chunk]
        with torch.set_grad_enabled(not forward_only):
            if v == self.last_virtual:
                loss = loss_fn(chunk, x, batch)
                if not forward_only:
                    outputs[(a.microbatch, a.chunk)] = loss * loss_factor
                return loss.detach()
            outputs[(a.microbatch, a.chunk)] = chunk(x)
        return None

    def _backward(self, a: Action, inputs, outputs, grads_in, grads_out, sends, reap_sends):
        key = (a.microbatch, a.chunk)
        v = virtual_stage(self.pp_rank, a.chunk, self.pp)
        if v == self.last_virtual:
            outputs.pop(key).backward()  # the loss * (scale / m) scalar
        else:
            if key in sends:
                reap_sends(key)
            out = outputs.pop(key)
            self.outputs_freed_before_backward &= out.numel() == 1
            _backward_from(out, grads_in.pop(key))
        if v > 0:
            x = inputs.pop(key)
            grads_out[key] = x.grad
