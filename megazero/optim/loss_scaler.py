"""Loss scaling for fp16 (and the no-op scaler for fp32 / bf16).

The loss is multiplied by `scale` before backward so small fp16 gradients do not flush to zero; the
optimizer divides the gradients by `scale` again (folded into the clipping coefficient). A step whose
gradients contain inf/NaN on *any* rank is skipped on every rank (the caller all-reduces the flag).

Dynamic scaling (Megatron's / DeepSpeed's rule): after `hysteresis` overflows (not necessarily in a
row) the scale halves (never below min_scale); after `window` overflow-free steps in a row it doubles
and the hysteresis budget is restored.
"""

from __future__ import annotations


class ConstantLossScaler:
    """A fixed scale: 1.0 for fp32 / bf16, or a user-given static fp16 scale."""

    def __init__(self, scale: float = 1.0):
        self.scale = float(scale)

    def update(self, found_inf: bool) -> None:
        pass

    def state_dict(self) -> dict:
        return {"scale": self.scale}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])


class DynamicLossScaler:
    def __init__(self, initial_scale: float = 2.0**16, window: int = 1000, hysteresis: int = 2,
                 min_scale: float = 1.0):
        assert initial_scale > 0 and window >= 1 and hysteresis >= 1 and min_scale > 0
        self.scale = float(initial_scale)
        self.window, self.hysteresis, self.min_scale = window, hysteresis, float(min_scale)
        self._good_steps = 0
        self._hysteresis_left = hysteresis

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self._good_steps = 0
            self._hysteresis_left -= 1
            if self._hysteresis_left <= 0:
                self.scale = max(self.scale / 2.0, self.min_scale)
        else:
            self._good_steps += 1
            if self._good_steps == self.window:
                self._good_steps = 0
                self._hysteresis_left = self.hysteresis
                self.scale *= 2.0

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self._good_steps, "hysteresis_left": self._hysteresis_left}

    def load_state_dict(self, state: dict) -> None:
        self.scale = float(state["scale"])
        self._good_steps = int(state["good_steps"])
        self._hysteresis_left = int(state["hysteresis_left"])


def build_loss_scaler(params_dtype: str, loss_scale: float | None, initial_scale: float, window: int,
                      hysteresis: int, min_scale: float):
    if params_dtype != "fp16":
        return ConstantLossScaler(1.0)
    if loss_scale is not None:
        return ConstantLossScaler(loss_scale)
    return DynamicLossScaler(initial_scale, window, hysteresis, min_scale)
