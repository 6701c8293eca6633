"""The optimizer step over the fragments this rank owns (all stages, one code path).

A *fragment* is the part of a parameter inside this rank's owned range (layout.py): the whole
parameter at stage 0, its intersection with this rank's 1/dp shard of each bucket at stages 1-3. Each
fragment has an fp32 master tensor (the stored values themselves when the model is fp32, else an fp32
copy of the bf16/fp16 values) and the per-parameter state its update rule declares
(optim/update_rules.py: exp_avg / exp_avg_sq for Adam, momentum_buffer for SGD), sharded like the
fragment. The rule is torch's own op sequence, so the update is exactly torch's AdamW / SGD on every
element whatever the sharding. One step:

    found_inf = any non-finite gradient on any rank      (all-reduced over dp [x cp] and tp x pp)
    if found_inf: skip (nothing changes)
    norm = global L2 norm of the unscaled gradients, every element counted once
    grads *= (1 / loss_scale) * min(1, clip / (norm + 1e-6))
    rule step on the masters (per decay group); copy masters back into the model dtype;
    (stages 1-2) all-gather

With offload (offload.py) the masters and the rule's state live in host memory or NVMe files instead
and the host steps them (Adam: the CPU Adam kernel); everything up to the clip coefficient is the same
code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megazero import comm
from megazero.config import OptimizerConfig
from megazero.optim.update_rules import build_update_rule
from megazero.tensor_parallel.sharding import counts_toward_norm
from megazero.zero.grad_sync import GradSync
from megazero.zero.layout import BufferLayout
from megazero.zero.offload import OffloadedOptimizer
from megazero.zero.param_storage import ParamStorage
from megazero.zero.stage import ZeroStage


@dataclass(frozen=True)
class StepResult:
    grad_norm: float  # nan when skipped
    skipped: bool


def decays(name: str, param: torch.Tensor) -> bool:
    """Megatron's rule: no weight decay on biases and normalisation weights (1-D parameters). Must be
    decided while the parameter still has its shape (ZeRO-3 storage replaces it with an empty tensor)."""
    return not (param.ndim == 1 or name.endswith(".bias"))


class ZeroOptimizer:
    def __init__(self, layout: BufferLayout, grads: GradSync, storage: ParamStorage, weight_decay: dict[int, bool],
                 cfg: OptimizerConfig, *, stage: ZeroStage, dp_rank: int, tp_rank: int, dp_group, model_group,
                 offload: dict | None = None):
        """weight_decay: id(param) -> whether the rule decays it (see `decays`). offload: None, or
        OffloadedOptimizer's keyword arguments mode / sub_group_size / nvme_path / rank_tag."""
        self.grads, self.storage, self.stage = grads, storage, stage
        self.dp_group, self.model_group = dp_group, model_group
        self.rule = build_update_rule(cfg, offload=offload is not None)
        self.fragments = layout.fragments_of_rank(dp_rank, whole=stage.owns_whole_buffer)
        self.device = grads.device
        self.values = [storage.owned_values(f) for f in self.fragments]
        self.decays = [weight_decay[id(f.param)] for f in self.fragments]
        # views into the gradient storage, which is allocated once and zeroed in place every step
        self.grad_views = [grads.fragment_grad(f) for f in self.fragments]
        self._owned_buckets = {f.bucket for f in self.fragments}
        self.counted = [counts_toward_norm(f.param, tp_rank) for f in self.fragments]
        self.steps = 0  # successful updates (torch's state["step"]); the offloaded optimizer keeps its own
        self.offload = None
        if offload is not None:
            self.masters, self.state = [], []
            self.offload = OffloadedOptimizer(self.values, self.decays, self.rule, device=self.device,
                                              weight_decay=cfg.weight_decay, **offload)
            self._host_grads = set()  # buckets whose gradients reached the host this step
            if offload["mode"] == "cpu":
                self._fragments_of_bucket: dict[int, list[int]] = {}
                for i, f in enumerate(self.fragments):
                    self._fragments_of_bucket.setdefault(f.bucket, []).append(i)
                grads.register_bucket_reduced_hook(self._bucket_reduced)
            return
        # fp32 models step their stored values in place; others keep fp32 master copies
        self.masters = [v if v.dtype == torch.float32 else v.detach().float().clone() for v in self.values]
        # the rule's declared state, per owned fragment: what ZeRO shards (a 1/dp share of each bucket)
        self.state = [self.rule.init_state(m.numel(), m.device) for m in self.masters]
        # (master, value) pairs that are separate tensors: the model dtype is not fp32
        self._copy_back = [(m, v) for m, v in zip(self.masters, self.values) if m.data_ptr() != v.data_ptr()]
        # torch.optim's param groups, decayed first: (weight decay, owned fragment indices, masters, the
        # rule's state lists). Fixed here: import_state copies into these tensors in place. A rank whose
        # shards hold only padding has no group (tiny models, large dp).
        self._groups = []
        for decay in (True, False):
            owned = [i for i, d in enumerate(self.decays) if d == decay]
            if owned:
                self._groups.append((cfg.weight_decay if decay else 0.0, owned, [self.masters[i] for i in owned],
                                     {n: [self.state[i][n] for i in owned] for n in self.rule.state_names}))

    def _bucket_reduced(self, bucket: int) -> None:
        frags = self._fragments_of_bucket.get(bucket, [])
        self.offload.copy_grads_to_host(frags, [self.grad_views[i] for i in frags])
        self._host_grads.add(bucket)

    def _sum_over_ranks(self, value: torch.Tensor, op: str) -> torch.Tensor:
        # dp_group is the ZeRO group (dp x cp, ZeroEngine) and model_group tp x pp: together they
        # cover every rank exactly once, so each element is summed once. Shards are distinct over
        # dp x cp; at stage 0 every dp x cp replica holds the same reduced gradient (an inf anywhere
        # reached every replica through the all-reduce), so tp x pp suffices and the context-parallel
        # replicas are not counted cp times.
        if self.stage.shards_optimizer_state:
            comm.all_reduce_(value, self.dp_group, op=op)
        comm.all_reduce_(value, self.model_group, op=op)
        return value

    @torch.no_grad()
    def step(self, lr: float, max_norm: float, loss_scale: float) -> StepResult:
        grads = self.grad_views
        # One pass, one all-reduce for both questions: [sum of g^2 over everything this rank owns
        # (inf/NaN iff some element is), sum of g^2 over the elements that count toward the norm].
        # Scalars live on the gradients' device: NCCL groups reduce only device tensors.
        sums = torch.zeros(2, dtype=torch.float32, device=self.device)
        for g, counted in zip(grads, self.counted):
            sq = torch.linalg.vector_norm(g, dtype=torch.float32).square()  # no full-size temporary
            sums[0] += sq
            if counted:
                sums[1] += sq
        sums[0] = (~torch.isfinite(sums[0])).float()  # a 0/1 flag, without waiting for the device
        everything, counted_sq = self._sum_over_ranks(sums, "sum").tolist()
        if everything > 0:
            if self.offload is not None:
                self._host_grads = set()
            return StepResult(float("nan"), skipped=True)
        norm = counted_sq ** 0.5 / loss_scale
        coeff = 1.0 / loss_scale
        if max_norm > 0 and max_norm / (norm + 1e-6) < 1.0:
            coeff *= max_norm / (norm + 1e-6)
        if self.offload is not None:
            ready = self._owned_buckets <= self._host_grads
            self._host_grads = set()
            self.offload.step(grads, coeff, lr, host_grads_ready=ready)
            return StepResult(norm, skipped=False)
        self.steps += 1
        for g in grads:
            if coeff != 1.0:
                g.mul_(coeff)
        for weight_decay, owned, masters, state in self._groups:
            self.rule.step(masters, [grads[i].float() for i in owned], state, lr=lr, step=self.steps,
                           weight_decay=weight_decay)
        for master, value in self._copy_back:
            value.copy_(master)
        return StepResult(norm, skipped=False)

    # ----- checkpoints (megazero/checkpoint/) ----------------------------------------------------------
    def step_count(self) -> int:
        return self.offload.step_count if self.offload is not None else self.steps

    @torch.no_grad()
    def export_state(self) -> list[tuple[torch.Tensor | None, dict[str, torch.Tensor]]]:
        """Per owned fragment: (fp32 master, or None when the model is fp32 and the values are the
        masters; {state name: tensor} as the rule declares), flat, whatever the optimizer's home."""
        fp32 = all(v.dtype == torch.float32 for v in self.values)
        names = self.rule.state_names
        if self.offload is not None:
            return [(None if fp32 else s[0], dict(zip(names, s[1:]))) for s in self.offload.export_state()]
        return [(None if fp32 else m, dict(st)) for m, st in zip(self.masters, self.state)]

    @torch.no_grad()
    def import_state(self, masters: list[torch.Tensor], states: list[dict[str, torch.Tensor]] | None,
                     step_count: int) -> None:
        """Set every owned fragment's fp32 master and declared state (flat, any device; None: the rule's
        initial state) and the step count; the model-dtype values are the caller's (checkpoint loading
        writes them first)."""
        names = self.rule.state_names
        if states is None:
            states = [self.rule.init_state(m.numel()) for m in masters]
        if self.offload is not None:
            self.offload.import_state([torch.stack([m.float().cpu()] + [st[n].float().cpu() for n in names])
                                       for m, st in zip(masters, states)], step_count)
            return
        self.steps = step_count
        for master, own, m, st in zip(self.masters, self.state, masters, states):
            master.copy_(m)
            for n in names:
                own[n].copy_(st[n])

    def close(self) -> None:
        if self.offload is not None:
            self.offload.close()

    def nbytes(self) -> int:
        """fp32 master copies (when not the stored values) + the rule's state held by this rank on its
        device (0 with offload: see OffloadedOptimizer.host_bytes / nvme_bytes)."""
        if self.offload is not None:
            return 0
        total = sum(m.numel() * 4 for m, v in zip(self.masters, self.values) if m.data_ptr() != v.data_ptr())
        return total + sum(t.numel() * t.element_size() for st in self.state for t in st.values())
