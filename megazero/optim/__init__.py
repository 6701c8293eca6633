"""Optimizer-side pieces: lr schedule, loss scaling, the gradient-norm counting rule. The optimizer
step itself (AdamW over owned fragments, every ZeRO stage) is megazero/zero/optimizer.py."""

from megazero.optim.grad_norm import counts_toward_norm
from megazero.optim.loss_scaler import ConstantLossScaler, DynamicLossScaler, build_loss_scaler
from megazero.optim.lr_schedule import LRSchedule

__all__ = ["ConstantLossScaler", "DynamicLossScaler", "LRSchedule", "build_loss_scaler", "counts_toward_norm"]
