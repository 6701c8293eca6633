"""Optimizer-side pieces: lr schedule, global grad norm and clipping, AdamW construction."""

from megazero.optim.clip_grad import clip_grads_, global_grad_norm
from megazero.optim.lr_schedule import LRSchedule
from megazero.optim.optimizer import build_adamw

__all__ = ["LRSchedule", "build_adamw", "clip_grads_", "global_grad_norm"]
