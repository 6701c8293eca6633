"""The trainer: builds every component from a validated RunConfig + Topology and runs the loop.

The step, on one screen (DESIGN.md principle 8):

    zero.start_step -> schedule (this rank's pipeline plan: forward/backward over microbatches,
    loss scaled) -> zero.finish_grad_sync (DP reduction, tied embeddings across first/last stage)
    -> zero.step (overflow check, grad norm, unscale + clip, update rule on owned fragments, parameter
    gather) -> loss-scale update -> log

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
from megazero.context_parallel import shard_sequence
from megazero.model.parts import describe_parts
from megazero.data import build_data_iterator
from megazero.monitor import TrainingMonitor
from megazero.optim import LRSchedule
from megazero.optim.loss_scaler import build_loss_scaler
from megazero.optim.train_state import TrainState
from megazero.pipeline_parallel.executor import Microbatch, PipelineExecutor
from megazero.pipeline_parallel.p2p import PipelineP2P
from megazero.pipeline_parallel.schedules import build_plan
from megazero.random import RNGStreams
from megazero.tensor_parallel.sharding import counts_toward_norm
from megazero.topology import Topology, rank_to_coords
from megazero.training.data_setup import ResolvedData, build_datasets
from megazero.training.memory_report import MemoryAccounting
from megazero.training.model_builder import build_model_chunks
from megazero.watchdog import context as run_context  # what a collective-timeout report names
from megazero.zero.engine import ZeroEngine


@dataclass(frozen=True)
class StepRecord:
    iteration: int
    lm_loss: float
    grad_norm: float
    lr: float
    consumed_samples: int
    loss_scale: float = 1.0
    skipped: bool = False  # non-finite gradients somewhere: nothing was updated


class _SigtermFlag:
    """Preemption: SIGTERM sets a flag the loop checks at the next step boundary (save, exit 0)."""

    def __init__(self):
        import signal
        import threading

        self._event = threading.Event()
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda signum, frame: self._event.set())

    def is_set(self) -> bool:
        return self._event.is_set()


def lm_loss(chunk: torch.nn.Module, inputs: torch.Tensor, batch: Microbatch) -> torch.Tensor:
    """Mean next-token loss of one microbatch (fp32 scalar), on the last virtual pipeline stage."""
    return chunk(inputs, batch["labels"]).mean()


def _state_field(name: str) -> property:
    """trainer.iteration etc.: the TrainState's field (the trainer's state lives in self.state)."""
    return property(lambda self: getattr(self.state, name), lambda self, v: setattr(self.state, name, v),
                    doc=f"self.state.{name}")


class Trainer:
    iteration = _state_field("iteration")
    consumed_samples = _state_field("consumed_samples")
    optimizer_steps = _state_field("optimizer_steps")
    consecutive_skips = _state_field("consecutive_skips")
    scaler = _state_field("scaler")
    rng = _state_field("rng")

    def __init__(self, cfg: RunConfig, topo: Topology, data: ResolvedData, device: torch.device,
                 run_dir: Path | None, log: Callable[[str], None], datasets: dict | None = None):
        self.cfg, self.topo, self.device, self.log = cfg, topo, device, log
        self.tokenizer_model = data.tokenizer_model  # checkpoints carry a copy (Hugging Face export)
        m, t, o = cfg.model, cfg.training, cfg.optimizer
        self.global_batch = cfg.global_batch_size(topo.world_size)
        self.num_microbatches = cfg.num_microbatches(topo.world_size)

        if t.deterministic:
            torch.use_deterministic_algorithms(True)
        rng = RNGStreams(t.seed, topo.tp_rank, topo.pp_rank, device)
        # This rank's model chunks (one per virtual stage it holds; one without interleaving).
        self.vp = cfg.virtual_pipeline_size()
        self.chunks = build_model_chunks(cfg, topo, rng, device)
        self.params = [p for p in self.chunks.parameters() if p.requires_grad]
        # Whole-model parameter count: each distinct slice once (before ZeRO-3 shards the storage).
        count = torch.tensor(float(sum(p.numel() for p in self.params if counts_toward_norm(p, topo.tp_rank))),
                             device=device)  # NCCL groups reduce only device tensors
        comm.all_reduce_(count, topo.model_group)
        self.num_parameters = int(count.item())
        self.zero = ZeroEngine(list(self.chunks), topo, cfg.zero, o, device)
        pr = cfg.precision
        scaler = build_loss_scaler(pr.params_dtype, pr.loss_scale, pr.initial_loss_scale, pr.loss_scale_window,
                                   pr.hysteresis, pr.min_loss_scale)
        # iteration, consumed samples, optimizer steps (the lr schedule advances only on these, Megatron),
        # consecutive skips, loss scaler, RNG streams: what checkpoints save besides the ZeRO state
        self.state = TrainState(scaler=scaler, rng=rng)
        # stage-to-stage transfers shaped as the chunks declare (GPTModel.pipeline_activation)
        p2p = PipelineP2P.for_chunks(list(self.chunks), cfg.micro_batch_size(topo.world_size), topo.pp_ranks,
                                     topo.pp_rank, topo.pp_group, device) if topo.pp > 1 else None
        self.executor = PipelineExecutor(list(self.chunks), topo.pp_rank, topo.pp, p2p, input_key="tokens")
        # saved-for-backward bytes (memory_report.py): on the steps that report them (the first one, and
        # those --log-memory logs) the meter records around the whole schedule (saved-tensor hooks nest by
        # replacement) and the executor labels microbatches
        self.memory = MemoryAccounting(list(self.chunks), self.zero, topo, device)
        self.activation_meter = self.memory.meter
        self.train_plan = build_plan(topo.pp_rank, topo.pp, self.vp, self.num_microbatches)
        self.eval_plan = build_plan(topo.pp_rank, topo.pp, self.vp, self.num_microbatches, forward_only=True)
        self.lr_schedule = LRSchedule(o.lr, o.min_lr, o.lr_warmup_iters, o.lr_decay_iters or t.train_iters,
                                      o.lr_decay_style, o.lr_warmup_init, o.lr_warmup_style)

        self.datasets = datasets if datasets is not None else build_datasets(cfg, data, topo.world_size)

        self.log(f"model: {self.num_parameters:,} parameters ({m.num_layers} layers, hidden {m.hidden_size}, "
                 f"{m.num_attention_heads} heads, seq {m.seq_length}, vocab {m.vocab_size} padded to "
                 f"{m.padded_vocab_size(topo.tp)}; {describe_parts(m)}; {cfg.activation.describe()}); "
                 f"{topo.tp}-way tensor x {topo.pp}-way pipeline"
                 f"{f' (interleaved, {self.vp} chunks per stage)' if self.vp > 1 else ''} x {topo.dp}-way data parallel; "
                 f"global batch {self.global_batch} = micro {cfg.micro_batch_size(topo.world_size)} x {self.num_microbatches} "
                 f"accumulation x {topo.dp} dp; ZeRO stage {cfg.zero.stage}, {pr.params_dtype}; "
                 f"optimizer {self.zero.optimizer.rule.describe()}")
        if topo.cp > 1:  # the dp ranks above count replicas; each replica's samples are split over cp
            self.log(f"context parallel: {topo.cp}-way ({cfg.parallel.cp_comm_type}), each rank holds "
                     f"{m.seq_length // topo.cp} of {m.seq_length} tokens per sample (2 load-balanced chunks); "
                     f"world {topo.world_size} = tp {topo.tp} x cp {topo.cp} x dp {topo.dp} x pp {topo.pp}")
        if self.zero.optimizer.offload is not None:
            self.log(self.zero.optimizer.offload.describe() + " (rank 0)")
        self.run_dir = run_dir
        self.monitor: TrainingMonitor | None = None  # opened by train(), once the start iteration is known
        self.phase_ms: dict[str, float] = {}  # --wall-clock-breakdown: this step's phase times
        self.log_writer = print if topo.rank == topo.world_size - 1 else (lambda _: None)

    def _open_monitor(self) -> TrainingMonitor:
        """The last rank holds the loss (last pipeline stage) and writes every monitoring file. Opened
        at the iteration training starts from, so a resumed run continues its run folder's CSVs and
        TensorBoard curves (rows an earlier attempt logged after its last checkpoint are replaced)."""
        lc, run_dir = self.cfg.logging, self.run_dir
        tensorboard_dir = None
        if run_dir is not None and not lc.no_tensorboard:
            tensorboard_dir = Path(lc.tensorboard_dir) if lc.tensorboard_dir else run_dir / "tensorboard"
        return TrainingMonitor(
            run_dir or Path("."), tensorboard_dir=tensorboard_dir, config=self.cfg.to_dict(),
            enabled=run_dir is not None and self.topo.rank == self.topo.world_size - 1,
            total_iters=self.cfg.training.train_iters, log=print, csv=not lc.no_csv,
            resume_iteration=self.iteration)

    # ----- data ----------------------------------------------------------------------------------
    def _batches(self, split: str, consumed: int) -> Iterator[Microbatch]:
        it = build_data_iterator(self.datasets[split], consumed, self.cfg.micro_batch_size(self.topo.world_size),
                                 self.topo.dp_rank, self.topo.dp, self.cfg.data.num_workers)
        cp_rank, cp = self.topo.cp_rank, self.topo.cp  # the cp ranks of a replica share its samples and
        for batch in it:  # each keeps its two chunks of the sequence (tokens and labels alike)
            yield {k: shard_sequence(v, 1, cp_rank, cp).to(self.device, non_blocking=True) for k, v in batch.items()}

    def _next_microbatches(self, batches: Iterator[Microbatch]) -> list[Microbatch]:
        return [next(batches) for _ in range(self.num_microbatches)]

    def _batch_mean_loss(self, losses: list[torch.Tensor]) -> float:
        """Mean loss of the global batch on every rank: the last stage holds the microbatch losses
        (summed over the pipeline group so all stages get it), then averaged over DP x CP (each cp rank's
        loss is the mean over its s/cp tokens, the same count on every cp rank: their mean is the
        sequence's token mean; the dp_cp group is the dp group while cp = 1)."""
        run_context.set_phase("loss average")
        mean = torch.stack(losses).mean().float() if losses else torch.zeros((), device=self.device)
        comm.all_reduce_(mean, self.topo.pp_group, op="sum")
        comm.all_reduce_(mean, self.topo.dp_cp_group, op="avg")
        return mean.item()

    # ----- one step --------------------------------------------------------------------------------
    def train_step(self, batches: Iterator[Microbatch]) -> StepRecord:
        self.chunks.train()
        run_context.step(self.iteration + 1, "forward/backward")
        scale = self.scaler.scale
        clock = self._phase_clock()
        self.zero.start_step(self.num_microbatches)
        microbatches = self._next_microbatches(batches)
        iteration = self.iteration + 1
        if self.memory.records(logged=self.cfg.logging.log_memory and self._logs_at(iteration)):
            with self.memory.recording(iteration, self.executor):
                losses = self.executor.run(self.train_plan, microbatches, lm_loss, grad_scale=scale)
        else:
            losses = self.executor.run(self.train_plan, microbatches, lm_loss, grad_scale=scale)
        clock("forward-backward")
        run_context.set_phase("gradient reduction")
        self.zero.finish_grad_sync()
        clock("grad-sync")
        run_context.set_phase("optimizer step")
        lr = self.lr_schedule.lr_at(self.optimizer_steps + 1)
        result = self.zero.step(lr, self.cfg.optimizer.clip_grad, scale)
        clock("optimizer")
        self.scaler.update(result.skipped)
        self.iteration += 1
        self.consumed_samples += self.global_batch
        if result.skipped:
            self.consecutive_skips += 1
            self.log_writer(f"iteration {self.iteration}: non-finite gradients, step skipped "
                            f"(loss scale {scale:g} -> {self.scaler.scale:g})")
            limit = self.cfg.precision.max_consecutive_skipped_steps
            if self.consecutive_skips >= limit:
                raise FloatingPointError(
                    f"{limit} consecutive steps had non-finite gradients (last at iteration {self.iteration}); "
                    f"lower --lr, use --bf16 instead of --fp16, or raise --max-consecutive-skipped-steps")
        else:
            self.consecutive_skips = 0
            self.optimizer_steps += 1
        return StepRecord(self.iteration, self._batch_mean_loss(losses), result.grad_norm, lr, self.consumed_samples,
                          scale, result.skipped)

    def _logs_at(self, iteration: int) -> bool:
        """Whether the loop logs training step `iteration` (every log_interval-th and the last)."""
        t = self.cfg.training
        return iteration % t.log_interval == 0 or iteration == t.train_iters

    @torch.no_grad()
    def evaluate(self, split: str = "valid") -> float | None:
        """Mean loss over eval_iters global batches; always the first batches of the split, so
        successive evaluations are comparable."""
        if self.datasets[split] is None or self.cfg.training.eval_iters == 0:
            return None
        self.chunks.eval()
        run_context.set_phase(f"evaluation ({split})")
        batches = self._batches(split, 0)
        losses: list[torch.Tensor] = []
        for _ in range(self.cfg.training.eval_iters):
            losses += self.executor.run(self.eval_plan, self._next_microbatches(batches), lm_loss, forward_only=True)
        self.zero.release_params()
        return self._batch_mean_loss(losses)

    def _phase_clock(self) -> Callable[[str], None]:
        """--wall-clock-breakdown: returns clock(name), which records the ms since the previous call
        (synchronising CUDA so a phase's kernels count in that phase); a no-op otherwise."""
        if not self.cfg.logging.wall_clock_breakdown:
            return lambda name: None
        last = [time.perf_counter()]

        def clock(name: str) -> None:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            now = time.perf_counter()
            self.phase_ms[name] = 1000.0 * (now - last[0])
            last[0] = now
        return clock

    def _log_accounting(self, iteration: int, comm_bytes: dict) -> None:
        """--log-memory / --log-comm: every rank's numbers, gathered to the writer rank, printed as
        one line per rank and logged to TensorBoard as memory/rank{r}/..., comm/rank{r}/..."""
        lc = self.cfg.logging
        mine: dict[str, float] = {}
        activations = ""  # --log-memory: this rank's saved-for-backward line (memory_report.py)
        if lc.log_memory:
            mine, activations = self.memory.step_fields()
        if lc.log_comm:
            mine |= {f"comm/{kind}-{group}-bytes": v for (kind, group), v in sorted(comm_bytes.items())}
        if not mine:
            return
        everyone = comm.all_gather_object((mine, activations), self.topo.world_group)
        scalars: dict[str, float] = {}  # memory/rank{r}/..., comm/rank{r}/...
        lines = [f" per-rank accounting at iteration {iteration}:"]
        for r, (values, act) in enumerate(everyone):
            fields = []
            for key, v in values.items():
                kind, name = key.split("/", 1)
                scalars[f"{kind}/rank{r}/{name}"] = v
                fields.append(f"{name.removesuffix('-bytes')}: {v / 2**20:.2f} MiB")
            c = rank_to_coords(r, self.topo.shape)
            lines.append(f" rank {r} (pp {c.pp}, dp {c.dp}, tp {c.tp}): " + " | ".join(fields))
            if act:  # --log-memory: the rank's activation line
                lines.append(f"   {act}")
        self.monitor.log_scalars(iteration, scalars, lines)

    def _save_timeline(self, path: Path, events: list[dict]) -> None:
        """Gather the last training step's compute intervals from every stage of this pipeline; the
        writer rank saves them in the format tools/plot_schedule.py --timeline draws."""
        from megazero.pipeline_parallel.timeline import save_timeline

        per_stage = comm.all_gather_object(events, self.topo.pp_group)
        if self.topo.rank != self.topo.world_size - 1:
            return
        origin = min((e["start"] for events in per_stage for e in events), default=0.0)
        ranks = [{"pp_rank": r, "events": [dict(e, start=e["start"] - origin, end=e["end"] - origin) for e in events]}
                 for r, events in enumerate(per_stage)]
        save_timeline({"pp": self.topo.pp, "vp": self.vp, "num_microbatches": self.num_microbatches,
                       "ranks": ranks}, path)
        self.log_writer(f"pipeline timeline of iteration {self.iteration} written to {path}")

    def close(self) -> None:
        """End of the run: no collective left in flight, offload files removed."""
        self.zero.close()

    # ----- checkpoints -----------------------------------------------------------------------------
    def checkpoint_subject(self):
        """What checkpoints save and restore: the TrainState, the ZeRO engine, the chunks, topology, config."""
        from megazero.checkpoint.state import CheckpointSubject

        return CheckpointSubject(self.state, self.zero, list(self.chunks), self.topo, self.cfg, self.tokenizer_model)

    def load(self, folder: Path) -> None:
        from megazero.checkpoint.state import load_checkpoint

        c = self.cfg.checkpoint
        run_context.set_phase("checkpoint load")
        load_checkpoint(self.checkpoint_subject(), folder, load_optim=not c.no_load_optim, load_rng=not c.no_load_rng,
                        finetune=c.finetune, log=self.log)

    def save(self) -> None:
        from megazero.checkpoint.state import save_checkpoint

        c = self.cfg.checkpoint
        run_context.set_phase("checkpoint save")
        done = save_checkpoint(self.checkpoint_subject(), c.save, c.keep_last)
        self.last_saved = self.iteration
        self.log_writer(f"saved checkpoint {done['path']} (iteration {self.iteration}) in {done['seconds']:.2f} s"
                        + (f", {done['bytes'] / 2**20:.1f} MiB" if done["bytes"] else ""))

    def _should_exit(self, started: float) -> str | None:
        """Why to stop now, or None. --exit-interval is the same on every rank; SIGTERM (which may reach
        only some ranks) and the wall clock are agreed over the world group, once per step."""
        c = self.cfg.checkpoint
        if c.exit_interval and self.iteration % c.exit_interval == 0:
            return f"--exit-interval {c.exit_interval}"
        if self._sigterm is None and not c.exit_duration_in_mins:
            return None
        flags = torch.tensor([float(self._sigterm is not None and self._sigterm.is_set()),
                              float(bool(c.exit_duration_in_mins)
                                    and time.perf_counter() - started >= 60 * c.exit_duration_in_mins)],
                             device=self.device)
        run_context.set_phase("stop check (SIGTERM / --exit-duration-in-mins)")
        comm.all_reduce_(flags, self.topo.world_group, op="max")
        sigterm, timeout = flags.tolist()
        return "SIGTERM" if sigterm else f"--exit-duration-in-mins {c.exit_duration_in_mins}" if timeout else None

    # ----- the loop --------------------------------------------------------------------------------
    def train(self) -> list[StepRecord]:
        t, c = self.cfg.training, self.cfg.checkpoint
        started = time.perf_counter()
        self.last_saved = self.iteration if c.load else None
        self._sigterm = _SigtermFlag() if c.save else None
        history: list[StepRecord] = []
        stop: str | None = None
        self.monitor = self._open_monitor()
        batches = self._batches("train", self.consumed_samples)
        tokens_per_iter = self.global_batch * self.cfg.model.seq_length
        interval_start, interval_iters = time.perf_counter(), 0
        interval_losses: list[float] = []  # lm loss of this log interval's applied (not skipped) steps
        timeline_out = self.cfg.logging.timeline_out
        timeline_events: list[dict] = []
        comm.traffic.enabled = self.cfg.logging.log_comm
        while self.iteration < t.train_iters:
            self.executor.record_timeline = bool(timeline_out) and self.iteration + 1 == t.train_iters
            comm.traffic.reset()
            record = self.train_step(batches)
            step_traffic = comm.traffic.reset()  # this step's bytes, before logging adds its own
            if self.executor.record_timeline:  # keep the training step's events, not a later evaluation's
                timeline_events, self.executor.record_timeline = self.executor.events, False
            history.append(record)
            interval_iters += 1
            if not record.skipped:
                interval_losses.append(record.lm_loss)
            last = record.iteration == t.train_iters
            if self._logs_at(record.iteration):
                elapsed = time.perf_counter() - interval_start
                # Megatron logs the mean lm loss over the log interval's applied steps (one step's loss
                # is noisy); with every step skipped, the step's own (non-finite) loss.
                loss = sum(interval_losses) / len(interval_losses) if interval_losses else record.lm_loss
                interval_losses = []
                self.monitor.log_train(
                    record.iteration, consumed_samples=record.consumed_samples, lm_loss=loss,
                    lr=record.lr, grad_norm=record.grad_norm, batch_size=self.global_batch,
                    iteration_time_ms=1000.0 * elapsed / interval_iters,
                    tokens_per_sec=tokens_per_iter * interval_iters / elapsed)
                if not math.isfinite(loss):
                    raise FloatingPointError(f"loss is {loss} at iteration {record.iteration}")
                self._log_accounting(record.iteration, step_traffic)
                if self.phase_ms:  # the logged step's phases (DeepSpeed's wall_clock_breakdown)
                    self.monitor.log_scalars(
                        record.iteration, {f"timers/{k}-time-ms": v for k, v in self.phase_ms.items()},
                        [" time (ms) | " + " | ".join(f"{k}: {v:.1f}" for k, v in self.phase_ms.items())])
            if record.iteration % t.eval_interval == 0 or last:
                valid = self.evaluate("valid")
                if valid is not None:
                    self.monitor.log_eval(record.iteration, lm_loss=valid)
            if c.save and c.save_interval and record.iteration % c.save_interval == 0 and not last:
                self.save()
            stop = None if last else self._should_exit(started)
            if stop is not None:
                self.log_writer(f"{stop}: stopping at iteration {record.iteration}"
                                + (" after saving a checkpoint" if c.save else ""))
                break
            if record.iteration % t.log_interval == 0 or record.iteration % t.eval_interval == 0:
                # throughput intervals start after logging / evaluation, so they measure training only
                interval_start, interval_iters = time.perf_counter(), 0
        interval_losses: list[float] = []  # lm loss of this log interval's applied (not skipped) steps
        self.zero.wait()  # no parameter gather may outlive training (teardown, checkpoints)
        if c.save and self.last_saved != self.iteration:
            self.save()
        if timeline_out and stop is None:
            self._save_timeline(Path(timeline_out), timeline_events)
        test = self.evaluate("test") if stop is None else None  # an early stop is resumed, not finished
        memory = self.memory.summary()  # collective: every rank's numbers
        extra = {"test_lm_loss": test, "num_parameters": self.num_parameters, "world_size": self.topo.world_size,
                 "tp": self.topo.tp, "dp": self.topo.dp, "pp": self.topo.pp, "iteration": self.iteration,
                 "exit_reason": stop or "train-iters reached"}
        self.summary = self.monitor.close(memory=memory, extra_summary=extra)
        return history
