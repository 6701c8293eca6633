"""The ZeRO stage as a policy object: what a stage shards, chosen once (`ZeroStage.of(n)`) and handed
to BufferLayout's caller, ParamStorage, GradSync and ZeroOptimizer, which read these facts instead of
comparing stage numbers.

| stage | optimizer state | gradients | parameters |
|-------|-----------------|-----------|------------|
| 0     | whole           | whole     | whole      |
| 1     | sharded         | whole     | whole      |
| 2     | sharded         | sharded   | whole      |
| 3     | sharded         | sharded   | sharded    |
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ZeroStage:
    number: int
    shards_optimizer_state: bool  # each dp rank steps (and keeps fp32 state for) its 1/dp shard only
    shards_gradients: bool  # each dp rank keeps its gradient shard; buckets reduce-scatter per microbatch
    shards_parameters: bool  # only shards persist; units are gathered just in time

    @staticmethod
    def of(n: int) -> "ZeroStage":
        assert n in (0, 1, 2, 3), f"ZeRO stage {n}: config validation admits 0-3"
        return ZeroStage(n, shards_optimizer_state=n >= 1, shards_gradients=n >= 2, shards_parameters=n == 3)

    # ----- derived facts ------------------------------------------------------------------------------
    @property
    def full_grad_buffer(self) -> bool:
        """A full gradient buffer (reduced once per step) rather than shards + transient buckets."""
        return not self.shards_gradients

    @property
    def flat_param_buffer(self) -> bool:
        """Parameters are views into one flat buffer, all-gathered after each step (stages 1-2)."""
        return self.shards_optimizer_state and not self.shards_parameters

    @property
    def owns_whole_buffer(self) -> bool:
        """Every dp rank owns (steps) every element: stage 0's all-reduce replicas."""
        return not self.shards_optimizer_state

    @property
    def gather_units(self) -> bool:
        """Buckets follow the model's declared gather units (zero_units()), not a size bound."""
        return self.shards_parameters

    def __str__(self) -> str:
        return f"ZeRO stage {self.number}"
