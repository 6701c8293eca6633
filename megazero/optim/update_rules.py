"""Optimizers as update rules: what the ZeRO optimizer, offload and checkpoints need to know of one.

An update rule declares its per-parameter state (names and dtypes: `state`), makes the initial state of
one flat fp32 fragment (`init_state`) and steps lists of flat fp32 fragments (`step`). It holds no
tensors of its own, so ZeRO (zero/optimizer.py) shards whatever the rule declares over the
data-parallel ranks, offload (zero/offload.py) streams those rows through host memory or NVMe, and
checkpoints (checkpoint/state.py) store each declared name as a tensor kind (`exp_avg/<param>`) that
resharding treats like any other. `name` is written into checkpoints: loading the state of one rule
into another is refused (checkpoint/state.py).

    TorchAdam  torch's Adam / AdamW op sequence (torch.optim.adam.adam, the functional form the
               torch.optim classes call), on the device
    CpuAdam    the same update by megatron_kernels' one-pass CPU Adam (offloaded state), bit-equal
    Sgd        torch's SGD with momentum (torch.optim.sgd.sgd; coupled L2 decay, as Megatron's
               --optimizer sgd); offload steps it with the same torch code on the host

Weight decay is per call: the ZeRO optimizer calls `step` once per decay group (Megatron's groups: no
decay on biases and norm weights), as torch.optim does per param group.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from torch.optim.adam import adam as torch_adam  # the functional forms torch.optim's classes call
from torch.optim.sgd import sgd as torch_sgd

from megatron_kernels.cpu_adam import cpu_adam_step  # compiled on first call (or the reference)
from megazero.config import OptimizerConfig


@dataclass(frozen=True)
class StateTensor:
    """One per-parameter state tensor of an update rule: flat, one element per parameter element."""
    name: str  # also its checkpoint kind: "exp_avg/<param name>"
    dtype: torch.dtype = torch.float32


class UpdateRule(ABC):
    name: str  # recorded in checkpoints ("adamw", "adam_l2", "sgd")
    state: tuple[StateTensor, ...]

    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.state)

    def identity(self) -> dict:
        """What a checkpoint records of the rule: {"type": its name, "state": its state names}."""
        return {"type": self.name, "state": list(self.state_names)}

    def init_state(self, numel: int, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """The state of a fragment that has not been stepped (every rule here starts from zeros)."""
        return {s.name: torch.zeros(numel, dtype=s.dtype, device=device) for s in self.state}

    @abstractmethod
    def step(self, params: list[torch.Tensor], grads: list[torch.Tensor], state: dict[str, list[torch.Tensor]], *,
             lr: float, step: int, weight_decay: float) -> None:
        """Update flat fp32 `params` in place from `grads` (already unscaled and clipped) and the
        per-fragment `state` (name -> one tensor per param, updated in place). `step` counts this update
        (1 on the first, as torch's state["step"])."""

    def host_step(self, param: torch.Tensor, grad: torch.Tensor, state: dict[str, torch.Tensor], *, lr: float,
                  step: int, weight_decay: float, grad_scale: float,
                  low_precision_out: torch.Tensor | None = None) -> None:
        """Offload's step of one host-resident run: `grad` still needs `grad_scale` (clip coefficient /
        loss scale; the buffer may be scaled in place); `low_precision_out`, if given, receives the
        updated param in the model dtype. Default: scale, `step`, round."""
        if grad_scale != 1.0:
            grad.mul_(grad_scale)
        self.step([param], [grad], {k: [v] for k, v in state.items()}, lr=lr, step=step, weight_decay=weight_decay)
        if low_precision_out is not None:
            low_precision_out.copy_(param)

    def describe(self) -> str:
        return self.name


class TorchAdam(UpdateRule):
    """Adam with decoupled weight decay (AdamW; `decoupled=False`: L2 decay added to the gradient)."""

    state = (StateTensor("exp_avg"), StateTensor("exp_avg_sq"))

    def __init__(self, betas: tuple[float, float], eps: float, decoupled: bool = True):
        self.betas, self.eps, self.decoupled = betas, eps, decoupled
        self.name = "adamw" if decoupled else "adam_l2"

    def step(self, params, grads, state, *, lr, step, weight_decay) -> None:
        if not params:
            return
        # torch increments each step tensor before using it, as it does its state["step"]
        steps = [torch.tensor(float(step - 1)) for _ in params]
        torch_adam(params, grads, state["exp_avg"], state["exp_avg_sq"], [], steps, amsgrad=False,
                   beta1=self.betas[0], beta2=self.betas[1], lr=lr, weight_decay=weight_decay,
                   eps=self.eps, maximize=False, decoupled_weight_decay=self.decoupled)

    def describe(self) -> str:
        return f"{'AdamW' if self.decoupled else 'Adam (L2 decay)'} betas {self.betas}, eps {self.eps:g}"


class CpuAdam(TorchAdam):
    """TorchAdam's update by megatron_kernels' one-pass CPU Adam (equal to torch bit for bit; see
    megatron_kernels/cpu_adam.py): the unscale/clip is folded in and the bf16/fp16 copy written in the
    same pass."""

    def step(self, params, grads, state, *, lr, step, weight_decay) -> None:
        for p, g, m, v in zip(params, grads, state["exp_avg"], state["exp_avg_sq"]):
            self.host_step(p, g, {"exp_avg": m, "exp_avg_sq": v}, lr=lr, step=step, weight_decay=weight_decay,
                           grad_scale=1.0)

    def host_step(self, param, grad, state, *, lr, step, weight_decay, grad_scale, low_precision_out=None) -> None:
        cpu_adam_step(param, grad, state["exp_avg"], state["exp_avg_sq"], step=step, lr=lr, beta1=self.betas[0],
                      beta2=self.betas[1], eps=self.eps, weight_decay=weight_decay, grad_scale=grad_scale,
                      adamw=self.decoupled, low_precision_out=low_precision_out)


class Sgd(UpdateRule):
    """SGD with momentum, torch.optim.SGD's op sequence (dampening 0, no Nesterov):
    g += weight_decay * p; buf = momentum * buf + g; p -= lr * buf. The buffer starts at zero, which
    gives torch's first step (buf = g) exactly. Momentum 0 declares no state at all."""

    def __init__(self, momentum: float):
        self.momentum = momentum
        self.name = "sgd"
        self.state = (StateTensor("momentum_buffer"),) if momentum != 0 else ()

    def step(self, params, grads, state, *, lr, step, weight_decay) -> None:
        if not params:
            return
        buffers = state["momentum_buffer"] if self.state else [None] * len(params)
        torch_sgd(params, grads, buffers, weight_decay=weight_decay, momentum=self.momentum, lr=lr,
                  dampening=0.0, nesterov=False, maximize=False)

    def describe(self) -> str:
        return f"SGD momentum {self.momentum:g}"


def build_update_rule(cfg: OptimizerConfig, *, offload: bool = False) -> UpdateRule:
    """The rule `cfg` names; with optimizer offload, Adam runs as the CPU Adam kernel."""
    if cfg.optimizer_type == "sgd":
        return Sgd(cfg.sgd_momentum)
    cls = CpuAdam if offload else TorchAdam
    return cls((cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps, decoupled=cfg.optimizer_type == "adamw")
