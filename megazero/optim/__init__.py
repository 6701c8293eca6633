"""Optimizer-side pieces: lr schedule, loss scaling. (The gradient-norm counting rule lives with the
sharding metadata: tensor_parallel/sharding.counts_toward_norm.) The optimizer
step itself (AdamW over owned fragments, every ZeRO stage) is megazero/zero/optimizer.py."""

from megazero.optim.loss_scaler import ConstantLossScaler, DynamicLossScaler, build_loss_scaler
from megazero.optim.lr_schedule import LRSchedule

__all__ = ["ConstantLossScaler", "DynamicLossScaler", "LRSchedule", "build_loss_scaler"]
