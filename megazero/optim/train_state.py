"""TrainState: the training loop's own state, apart from the model and optimizer tensors (#11 item 4).

The trainer holds one and advances it each step; checkpoints (megazero/checkpoint/state.py) save and
restore it through `to_index()` / `restore()` without reaching into the trainer. Kept here, below both
zero/ and checkpoint/ and training/ in the import order, so each of them may read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TrainState:
    scaler: Any  # the loss scaler (optim/loss_scaler.py): state_dict() / load_state_dict()
    rng: Any  # this rank's RNG streams (megazero.random.RNGStreams): state_dict() / load_state_dict()
    iteration: int = 0
    consumed_samples: int = 0
    optimizer_steps: int = 0  # successful steps: the lr schedule advances only on these (Megatron)
    consecutive_skips: int = 0

    def to_index(self, rule_steps: int, optimizer: dict | None = None) -> dict:
        """The checkpoint index's "state". `adam_steps` keeps its name from the first format version but
        is the update rule's step count whatever the rule; `optimizer` ({"type", "state"}: the rule's
        name and declared state names) says which rule's state the checkpoint holds."""
        out = {"iteration": self.iteration, "consumed_samples": self.consumed_samples,
               "optimizer_steps": self.optimizer_steps, "consecutive_skips": self.consecutive_skips,
               "adam_steps": rule_steps, "loss_scaler": self.scaler.state_dict()}
        if optimizer is not None:
            out["optimizer"] = optimizer
        return out

    def restore(self, saved: dict, *, loss_scaler: bool) -> None:
        """Counters from an index's "state"; the loss scaler too when the optimizer state is loaded."""
        self.iteration = saved["iteration"]
        self.consumed_samples = saved["consumed_samples"]
        self.optimizer_steps = saved["optimizer_steps"]
        self.consecutive_skips = saved["consecutive_skips"]
        if loss_scaler:
            self.scaler.load_state_dict(saved["loss_scaler"])
