"""The trainer: builds every component from a validated RunConfig + Topology and runs the loop.

The step, on one screen (DESIGN.md principle 8):

    zero grads -> schedule (forward/backward over microbatches) -> finish gradient reduction (DP)
    -> grad norm -> clip -> optimizer step -> lr step -> log

`train()` returns the per-iteration history (loss, grad norm, lr) that layout-parity tests compare.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from megazero import comm
from megazero.config import RunConfig
from megazero.data import build_data_iterator, build_train_valid_test_datasets
from megazero.model import GPTModel
from megazero.monitor import TrainingMonitor
from megazero.optim import LRSchedule, build_adamw, clip_grads_, global_grad_norm
from megazero.optim.clip_grad import counts_toward_norm
from megazero.pipeline_parallel.schedules import Microbatch, forward_backward_no_pipelining
from megazero.random import RNGStreams
from megazero.tensor_parallel.init import initialize_parameters
from megazero.topology import Topology
from megazero.training.data_setup import ResolvedData
from megazero.zero.grad_buffer import GradBuffer


@dataclass(frozen=True)
class StepRecord:
    iteration: int
    lm_loss: float
    grad_norm: float
    lr: float
    consumed_samples: int


def lm_loss(model: torch.nn.Module, batch: Microbatch) -> torch.Tensor:
    """Mean next-token loss of one microbatch (fp32 scalar)."""
    return model(batch["tokens"], batch["labels"]).mean()


class Trainer:
    def __init__(self, cfg: RunConfig, topo: Topology, data: ResolvedData, device: torch.device,
                 run_dir: Path | None, log: Callable[[str], None]):
        self.cfg, self.topo, self.device, self.log = cfg, topo, device, log
        m, t, o = cfg.model, cfg.training, cfg.optimizer
        self.global_batch = cfg.global_batch_size(topo.world_size)
        self.num_microbatches = cfg.num_microbatches(topo.world_size)

        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        self.rng = RNGStreams(t.seed, topo.tp_rank, topo.pp_rank, device)
        self.model = GPTModel(m, tp_group=topo.tp_group, rng=self.rng, device=device)
        initialize_parameters(self.model, t.seed)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.grads = GradBuffer(self.params, topo.dp_group)
        self.optimizer = build_adamw(self.model, o)
        self.lr_schedule = LRSchedule(o.lr, o.min_lr, o.lr_warmup_iters, o.lr_decay_iters or t.train_iters,
                                      o.lr_decay_style)

        eval_runs = t.train_iters // t.eval_interval + 1
        train_ds, valid_ds, test_ds = build_train_valid_test_datasets(
            data.prefix, cfg.data.split, m.seq_length, t.seed,
            (t.train_iters * self.global_batch, t.eval_iters * self.global_batch * (1 if eval_runs else 0),
             t.eval_iters * self.global_batch))
        self.datasets = {"train": train_ds, "valid": valid_ds, "test": test_ds}
        self.consumed_samples = 0
        self.iteration = 0

        # Whole-model parameter count: each distinct slice once (replicated params on TP rank 0 only).
        count = torch.tensor(float(sum(p.numel() for p in self.params if counts_toward_norm(p, topo.tp_rank))))
        comm.all_reduce_(count, topo.model_group)
        self.num_parameters = int(count.item())
        self.log(f"model: {self.num_parameters:,} parameters ({m.num_layers} layers, hidden {m.hidden_size}, "
                 f"{m.num_attention_heads} heads, seq {m.seq_length}, vocab {m.vocab_size} padded to "
                 f"{m.padded_vocab_size(topo.tp)}); {topo.tp}-way tensor x {topo.dp}-way data parallel; "
                 f"global batch {self.global_batch} = micro {t.micro_batch_size} x {self.num_microbatches} "
                 f"accumulation x {topo.dp} dp")
        # The last rank holds the loss (last pipeline stage) and writes every monitoring file.
        self.monitor = TrainingMonitor(
            run_dir or Path("."), tensorboard_dir=self._tensorboard_dir(run_dir), config=cfg.to_dict(),
            enabled=run_dir is not None and topo.rank == topo.world_size - 1, total_iters=t.train_iters,
            log=print)

    def _tensorboard_dir(self, run_dir: Path | None) -> Path | None:
        lc = self.cfg.logging
        if run_dir is None or lc.no_tensorboard:
            return None
        return Path(lc.tensorboard_dir) if lc.tensorboard_dir else run_dir / "tensorboard"

    # ----- data ----------------------------------------------------------------------------------
    def _batches(self, split: str, consumed: int) -> Iterator[Microbatch]:
        it = build_data_iterator(self.datasets[split], consumed, self.cfg.training.micro_batch_size,
                                 self.topo.dp_rank, self.topo.dp, self.cfg.data.num_workers)
        for batch in it:
            yield {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def _dp_mean(self, losses: list[torch.Tensor]) -> float:
        mean = torch.stack(losses).mean().float().cpu()
        comm.all_reduce_(mean, self.topo.dp_group, op="avg")
        return mean.item()

    # ----- one step --------------------------------------------------------------------------------
    def train_step(self, batches: Iterator[Microbatch]) -> StepRecord:
        self.model.train()
        self.grads.zero()
        losses = forward_backward_no_pipelining(self.model, batches, self.num_microbatches, lm_loss)
        self.grads.reduce_gradients()
        grad_norm = global_grad_norm(self.params, tp_rank=self.topo.tp_rank, model_group=self.topo.model_group)
        clip_grads_(self.params, grad_norm, self.cfg.optimizer.clip_grad)
        self.iteration += 1
        lr = self.lr_schedule.apply(self.optimizer, self.iteration)
        self.optimizer.step()
        self.consumed_samples += self.global_batch
        return StepRecord(self.iteration, self._dp_mean(losses), grad_norm, lr, self.consumed_samples)

    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> float | None:
        """Mean loss over eval_iters global batches; always the first batches of the split, so
        successive evaluations are comparable."""
        if self.datasets[split] is None or self.cfg.training.eval_iters == 0:
            return None
        self.model.eval()
        batches = self._batches(split, 0)
        losses: list[torch.Tensor] = []
        for _ in range(self.cfg.training.eval_iters):
            losses += forward_backward_no_pipelining(self.model, batches, self.num_microbatches, lm_loss,
                                                     forward_only=True)
        return self._dp_mean(losses)

    # ----- the loop --------------------------------------------------------------------------------
    def train(self) -> list[StepRecord]:
        t = self.cfg.training
        history: list[StepRecord] = []
        batches = self._batches("train", self.consumed_samples)
        tokens_per_iter = self.global_batch * self.cfg.model.seq_length
        interval_start, interval_iters = time.perf_counter(), 0
        while self.iteration < t.train_iters:
            record = self.train_step(batches)
            history.append(record)
            interval_iters += 1
            last = record.iteration == t.train_iters
            if record.iteration % t.log_interval == 0 or last:
                elapsed = time.perf_counter() - interval_start
                self.monitor.log_train(
                    record.iteration, consumed_samples=record.consumed_samples, lm_loss=record.lm_loss,
                    lr=record.lr, grad_norm=record.grad_norm, batch_size=self.global_batch,
                    iteration_time_ms=1000.0 * elapsed / interval_iters,
                    tokens_per_sec=tokens_per_iter * interval_iters / elapsed)
                if not math.isfinite(record.lm_loss):
                    raise FloatingPointError(f"loss is {record.lm_loss} at iteration {record.iteration}")
            if record.iteration % t.eval_interval == 0 or last:
                valid = self.evaluate("valid")
                if valid is not None:
                    self.monitor.log_eval(record.iteration, lm_loss=valid)
            if record.iteration % t.log_interval == 0 or record.iteration % t.eval_interval == 0:
                # throughput intervals start after logging / evaluation, so they measure training only
                interval_start, interval_iters = time.perf_counter(), 0
        test = self.evaluate("test")
        self.summary = self.monitor.close({"test_lm_loss": test, "num_parameters": self.num_parameters,
                                           "world_size": self.topo.world_size, "tp": self.topo.tp,
                                           "dp": self.topo.dp, "pp": self.topo.pp})
        return history
