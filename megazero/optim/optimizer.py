"""AdamW with Megatron's parameter groups: no weight decay on biases and normalisation weights."""

from __future__ import annotations

import torch
from torch import nn

from megazero.config import OptimizerConfig


def build_adamw(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim == 1 or name.endswith(".bias") else decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=cfg.lr,
                             betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
