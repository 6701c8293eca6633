"""The optimizer step over the fragments this rank owns (all stages, one code path).

A *fragment* is the part of a parameter inside this rank's owned range (layout.py): the whole
parameter at stage 0, its intersection with this rank's 1/dp shard of each bucket at stages 1-3. Each
fragment has an fp32 master tensor (the stored values themselves when the model is fp32, else an fp32
copy of the bf16/fp16 values) stepped by torch's AdamW, so the update is exactly AdamW's on every
element whatever the sharding. One step:

    found_inf = any non-finite gradient on any rank      (all-reduced over dp and tp x pp)
    if found_inf: skip (nothing changes)
    norm = global L2 norm of the unscaled gradients, every element counted once
    grads *= (1 / loss_scale) * min(1, clip / (norm + 1e-6))
    AdamW step on the masters; copy masters back into the model dtype; (stages 1-2) all-gather

With offload (offload.py) the masters and moments live in host memory or NVMe files instead and the
CPU Adam steps them; everything up to the clip coefficient is the same code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megazero import comm
from megazero.config import OptimizerConfig
from megazero.tensor_parallel.sharding import counts_toward_norm
from megazero.zero.grad_sync import GradSync
from megazero.zero.layout import BufferLayout
from megazero.zero.offload import OffloadedAdam
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
        """weight_decay: id(param) -> whether AdamW decays it (see `decays`). offload: None, or
        OffloadedAdam's keyword arguments mode / sub_group_size / nvme_path / rank_tag."""
        self.grads, self.storage, self.stage = grads, storage, stage
        self.dp_group, self.model_group = dp_group, model_group
        self.fragments = layout.fragments_of_rank(dp_rank, whole=stage.owns_whole_buffer)
        self.device = grads.device
        self.values = [storage.owned_values(f) for f in self.fragments]
        # views into the gradient storage, which is allocated once and zeroed in place every step
        self.grad_views = [grads.fragment_grad(f) for f in self.fragments]
        self._owned_buckets = {f.bucket for f in self.fragments}
        self.counted = [counts_toward_norm(f.param, tp_rank) for f in self.fragments]
        self.offload = None
        if offload is not None:
            self.masters, self.optimizer = [], None
            self.offload = OffloadedAdam(
                self.values, [weight_decay[id(f.param)] for f in self.fragments], device=self.device, lr=cfg.lr,
                betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps, weight_decay=cfg.weight_decay,
                adamw=cfg.optimizer_type == "adamw", **offload)
            self._host_grads = set()  # buckets whose gradients reached the host this step
            if offload["mode"] == "cpu":
                self._fragments_of_bucket: dict[int, list[int]] = {}
                for i, f in enumerate(self.fragments):
                    self._fragments_of_bucket.setdefault(f.bucket, []).append(i)
                grads.register_bucket_reduced_hook(self._bucket_reduced)
            return
        # fp32 models step their stored values in place; others keep fp32 master copies
        self.masters = [torch.nn.Parameter(v if v.dtype == torch.float32 else v.detach().float().clone())
                        for v in self.values]
        decay = [m for m, f in zip(self.masters, self.fragments) if weight_decay[id(f.param)]]
        no_decay = [m for m, f in zip(self.masters, self.fragments) if not weight_decay[id(f.param)]]
        groups = [g for g in ({"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
        cls = torch.optim.AdamW if cfg.optimizer_type == "adamw" else torch.optim.Adam
        # A rank whose shards hold only padding owns nothing to step (tiny models, large dp).
        self.optimizer = cls(groups, lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps) \
            if groups else None
        # (master, value) pairs that are separate tensors: the model dtype is not fp32
        self._copy_back = [(m, v) for m, v in zip(self.masters, self.values) if m.data_ptr() != v.data_ptr()]

    def _bucket_reduced(self, bucket: int) -> None:
        frags = self._fragments_of_bucket.get(bucket, [])
        self.offload.copy_grads_to_host(frags, [self.grad_views[i] for i in frags])
        self._host_grads.add(bucket)

    def _sum_over_ranks(self, value: torch.Tensor, op: str) -> torch.Tensor:
        # Shards are distinct over dp; at stage 0 every dp replica holds the same reduced gradient
        # (an inf anywhere reached every replica through the all-reduce), so tp x pp suffices.
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
        for master, g in zip(self.masters, grads):
            if coeff != 1.0:
                g.mul_(coeff)
            master.grad = g if g.dtype == torch.float32 else g.float()
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            self.optimizer.step()
        for master, value in self._copy_back:
            value.copy_(master)
        for master in self.masters:
            master.grad = None
        return StepResult(norm, skipped=False)

    # ----- checkpoints (megazero/checkpoint/) ----------------------------------------------------------
    def step_count(self) -> int:
        if self.offload is not None:
            return self.offload.step_count
        for state in (self.optimizer.state.values() if self.optimizer is not None else ()):
            return int(state["step"])
        return 0

    @torch.no_grad()
    def export_state(self) -> list[tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]]:
        """Per owned fragment: (fp32 master or None when the model is fp32 and the values are the
        masters, exp_avg, exp_avg_sq), flat, whatever the optimizer's home."""
        fp32 = all(v.dtype == torch.float32 for v in self.values)
        if self.offload is not None:
            return [(None if fp32 else s[0], s[1], s[2]) for s in self.offload.export_state()]
        out = []
        for master in self.masters:
            state = self.optimizer.state.get(master, {}) if self.optimizer is not None else {}
            zeros = torch.zeros_like(master)
            out.append((None if fp32 else master.detach(), state.get("exp_avg", zeros), state.get("exp_avg_sq", zeros)))
        return out

    @torch.no_grad()
    def import_state(self, masters: list[torch.Tensor], exp_avgs: list[torch.Tensor], exp_avg_sqs: list[torch.Tensor],
                     step_count: int) -> None:
        """Set every owned fragment's fp32 master and moments (flat, any device) and the step count; the
        model-dtype values are the caller's (checkpoint loading writes them first)."""
        if self.offload is not None:
            self.offload.import_state([torch.stack([m.float().cpu(), a.cpu(), b.cpu()])
                                       for m, a, b in zip(masters, exp_avgs, exp_avg_sqs)], step_count)
            return
        for master, m, a, b in zip(self.masters, masters, exp_avgs, exp_avg_sqs):
            master.copy_(m)
            if self.optimizer is None:
                continue
            if step_count == 0:
                self.optimizer.state.pop(master, None)
            else:
                self.optimizer.state[master] = {"step": torch.tensor(float(step_count)),
                                                "exp_avg": a.to(master.device, torch.float32).clone(),
                                                "exp_avg_sq": b.to(master.device, torch.float32).clone()}

    def close(self) -> None:
        if self.offload is not None:
            self.offload.close()

    def nbytes(self) -> int:
        """fp32 master copies (when not the stored values) + optimizer moments held by this rank on its
        device (0 with offload: see OffloadedAdam.host_bytes / nvme_bytes)."""
        if self.offload is not None:
            return 0
        total = sum(m.numel() * 4 for m, v in zip(self.masters, self.values) if m.data_ptr() != v.data_ptr())
        for state in (self.optimizer.state.values() if self.optimizer is not None else ()):
            total += sum(t.numel() * t.element_size() for t in state.values() if torch.is_tensor(t) and t.ndim > 0)
        return total
