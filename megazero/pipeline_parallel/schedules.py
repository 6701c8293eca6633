"""Forward/backward schedules over microbatches.

Today: no pipelining (pp = 1), gradient accumulation over `num_microbatches`. The pipeline issue adds
1F1B and interleaved 1F1B as *plans* (pure lists of actions per rank) run by an executor; they take
the same arguments and return the same thing, so the trainer picks a schedule once and never changes.
"""

from __future__ import annotations

from typing import Callable, Iterator

import torch

# A microbatch is a dict of tensors ({"tokens": [b, s], "labels": [b, s]}), already on the device.
Microbatch = dict[str, torch.Tensor]
LossFn = Callable[[torch.nn.Module, Microbatch], torch.Tensor]


def forward_backward_no_pipelining(model: torch.nn.Module, microbatches: Iterator[Microbatch],
                                   num_microbatches: int, loss_fn: LossFn,
                                   forward_only: bool = False) -> list[torch.Tensor]:
    """Run every microbatch forward (and backward unless forward_only); gradients accumulate in place.

    Each microbatch's loss is divided by num_microbatches before backward, so the accumulated
    gradient is that of the mean loss over the batch. Returns the unscaled, detached losses.
    """
    losses = []
    for _ in range(num_microbatches):
        batch = next(microbatches)
        if forward_only:
            with torch.no_grad():
                loss = loss_fn(model, batch)
        else:
            loss = loss_fn(model, batch)
            (loss / num_microbatches).backward()
        losses.append(loss.detach())
    return losses
