"""Learning-rate schedule: linear warmup, then cosine / linear / constant decay to min_lr.

`lr_at(i)` is a pure function of the (1-based) iteration, so resuming needs only the iteration
count. Iteration i <= warmup uses lr * i / warmup (the first step already moves: Megatron's schedule
gives lr 0 to the first step, which wastes it). Past lr_decay_iters the lr stays at min_lr.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class LRSchedule:
    max_lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int
    style: str = "cosine"
    warmup_init: float = 0.0  # lr the warmup starts from
    warmup_style: str = "linear"  # linear | log (DeepSpeed WarmupLR: ln(i + 1) / ln(max(2, warmup)))

    def lr_at(self, iteration: int) -> float:
        if self.warmup_iters > 0 and iteration <= self.warmup_iters:
            if self.warmup_style == "log":
                frac = min(1.0, math.log(iteration + 1) / math.log(max(2, self.warmup_iters)))
            else:
                frac = iteration / self.warmup_iters
            return self.warmup_init + (self.max_lr - self.warmup_init) * frac
        if self.style == "constant":
            return self.max_lr
        span = max(self.decay_iters - self.warmup_iters, 1)
        ratio = min(max(iteration - self.warmup_iters, 0) / span, 1.0)
        if self.style == "linear":
            coeff = 1.0 - ratio
        else:  # cosine
            coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))
        return self.min_lr + coeff * (self.max_lr - self.min_lr)
