"""Activation recomputation (Megatron's --recompute-*; DeepSpeed's activation_checkpointing).

`checkpoint(fn, *inputs, rng=, storage=)` returns fn(*inputs), run without recording a graph, and
keeps only `inputs` for backward (ctx.save_for_backward, so SavedTensorMeter counts exactly them).
Its backward is the recomputation: fn runs again, with grad, on detached copies of the inputs and with
the random draws of the forward replayed (`rng.snapshot()` / `rng.replay()`: the live generator and
every named stream; rng=None declares that fn draws nothing), then backward runs through the
recomputed outputs; parameter gradients accumulate as in any backward (ZeRO's post-accumulate-grad
hooks fire), the inputs' gradients are returned. Same ops in the same order as without checkpoint:
fp32 results are bitwise equal. With grad disabled, or no input requiring grad, it is fn(*inputs).
One backward per forward: a second one through a retained graph raises RuntimeError (TWICE).

This is a reentrant autograd.Function, not torch.utils.checkpoint: the non-reentrant variant keeps
inputs alive in closures that saved-tensor hooks never see, and torch's RNG preservation knows the
ambient generator only, not our named streams.

`storage` (InputStorage) says where the kept inputs live: as 1/n slices across `partition_group`
(all-gathered before the recomputation), in host memory (`offload`: copied back ahead of use, the
copy of checkpoint k-1's input starting when checkpoint k's backward starts), or as they are.

`recomputing()` is True while a recomputation runs (zero/stage3.py keeps the blocks it gathers for
it until their gradients are in, and prefetches backward, not forward).

`recompute_spans(layer_ids, act)` -> [(layer ids, checkpointed)] in order: the model runs each span's
blocks, through `checkpoint` when checkpointed (full recomputation; uniform or block method).
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from megazero.activation.input_storage import InputStorage, KeptInputs
from megazero.config import ActivationConfig
from megazero.random import RNGStreams

__all__ = ["InputStorage", "KEEP", "checkpoint", "recomputing", "recompute_spans", "core_attention_pays"]

KEEP = InputStorage()
TWICE = ("backward through a recomputed region twice is not supported; the first backward releases its "
         "recomputation state (the function, the forward's RNG snapshot): run one backward per forward, or train "
         "without recomputation (no --recompute-granularity) where the graph is needed again (retain_graph=True)")

# Per thread: the autograd engine runs a CUDA backward (so the recomputation) on its device thread.
_state = threading.local()


def recomputing() -> bool:
    """Whether this thread is inside a checkpoint's recomputation (fn re-run in backward)."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def _recomputation() -> Iterator[None]:
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def checkpoint(fn: Callable[..., torch.Tensor], *inputs: torch.Tensor, rng: RNGStreams | None,
               storage: InputStorage = KEEP) -> torch.Tensor:
    if not torch.is_grad_enabled() or not any(x.requires_grad for x in inputs):
        return fn(*inputs)
    return _Checkpoint.apply(fn, rng, storage, *inputs)


@dataclass
class _Replay:
    fn: Callable
    rng: RNGStreams | None
    snapshot: object  # RNGSnapshot, or None when rng is None
    kept: KeptInputs
    previous: object | None  # the preceding checkpoint's backward node whose kept input to prefetch


class _Checkpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn, rng, storage: InputStorage, *inputs: torch.Tensor):
        storage.boundary(inputs[0].device)
        snapshot = rng.snapshot() if rng is not None else None
        with torch.no_grad():
            outputs = fn(*inputs)
        kept = KeptInputs(storage)
        ctx.save_for_backward(*kept.keep(inputs))  # the inputs, their chunks or host copies (host bytes)
        # consecutive spans: this input is the previous checkpoint's output, so its backward node is that
        # checkpoint's ctx; our backward (which runs just before its own) starts its input's copy back
        previous = inputs[0].grad_fn if isinstance(inputs[0].grad_fn, _Checkpoint._backward_cls) else None
        ctx.replay = _Replay(fn, rng, snapshot, kept, previous if storage.offload else None)
        return outputs

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        replay: _Replay | None = ctx.replay
        if replay is None:  # a retained graph's second backward: the replay went with the first
            raise RuntimeError(TWICE)
        ctx.replay = None  # drop fn, snapshot and the previous node with this backward
        previous = replay.previous
        if previous is not None and previous.replay is not None:  # its backward is next: copy its input back
            previous.replay.kept.prefetch(previous.saved_tensors)
        inputs = replay.kept.restore(ctx.saved_tensors)  # detached; requires_grad as the originals
        replay.kept.storage.boundary(inputs[0].device)
        with torch.enable_grad(), _recomputation(), \
                replay.rng.replay(replay.snapshot) if replay.rng is not None else contextlib.nullcontext():
            outputs = replay.fn(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if o.requires_grad and g is not None]
        if pairs:  # (none: no output reached the loss)
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None, None, *(x.grad if x.requires_grad else None for x in inputs))


def recompute_spans(layer_ids: list[int], act: ActivationConfig) -> list[tuple[list[int], bool]]:
    """A model chunk's layers in order as spans run together; checkpointed spans are recomputed.

    uniform: every `layers_per_checkpoint` consecutive layers form one checkpointed span (the last may
    be shorter); block: the first `layers_per_checkpoint` layers are checkpointed one by one and the rest
    form one span that stores everything; otherwise one span, not checkpointed."""
    if act.method == "uniform":
        n = act.layers_per_checkpoint
        return [(layer_ids[i:i + n], True) for i in range(0, len(layer_ids), n)]
    if act.method == "block":
        n = min(act.layers_per_checkpoint, len(layer_ids))
        rest = [(layer_ids[n:], False)] if layer_ids[n:] else []
        return [([i], True) for i in layer_ids[:n]] + rest
    return [(layer_ids, False)] if layer_ids else []


def core_attention_pays(backend: str, device_type: str, dropout_p: float) -> bool:
    """Selective recomputation re-runs the core attention only where its backward would otherwise keep
    [b, heads, s, s] tensors: the fused / unfused backends, and CPU sdpa with dropout (torch's math path;
    without dropout CPU sdpa is a flash kernel keeping only its output and log-sum-exp, as CUDA sdpa is)."""
    if backend in ("fused", "unfused"):
        return True
    return device_type == "cpu" and dropout_p > 0
