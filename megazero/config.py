"""Typed, frozen configuration (DESIGN.md principle 7).

One dataclass per component. `megazero/cli.py` turns Megatron-style flags into a `RunConfig`;
`RunConfig.validate(world_size)` checks every cross-field constraint once, on every rank, before any
process group exists, raising ConfigError with a one-line fix. Nothing reads a global args object.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megazero.errors import ConfigError


@dataclass(frozen=True)
class ModelConfig:
    num_layers: int = 4
    hidden_size: int = 256
    num_attention_heads: int = 4
    ffn_hidden_size: int | None = None  # default 4 * hidden_size (GPT-2)
    seq_length: int = 128
    max_position_embeddings: int | None = None  # default seq_length
    vocab_size: int | None = None  # logical vocab; filled from the tokenizer at build time
    make_vocab_size_divisible_by: int = 128
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    init_method_std: float = 0.02
    layernorm_epsilon: float = 1e-5

    @property
    def ffn_size(self) -> int:
        return self.ffn_hidden_size or 4 * self.hidden_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int) -> int:
        """Round the vocab up to a multiple of make_vocab_size_divisible_by x tp (Megatron's rule)."""
        assert self.vocab_size is not None, "vocab_size is set from the tokenizer before the model is built"
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    zero_stage: int = 0
    distributed_backend: str | None = None  # None: nccl with CUDA, else gloo
    # Interleaved pipeline: give either the chunk count per stage (vp) or Megatron's layers per chunk.
    virtual_pipeline_model_parallel_size: int | None = None
    num_layers_per_virtual_pipeline_stage: int | None = None
    decoder_first_pipeline_num_layers: int | None = None
    decoder_last_pipeline_num_layers: int | None = None


@dataclass(frozen=True)
class OptimizerConfig:
    lr: float = 6e-4
    min_lr: float = 6e-5
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0
    lr_warmup_iters: int = 20
    lr_decay_iters: int | None = None  # default train_iters
    lr_decay_style: str = "cosine"  # cosine | linear | constant


@dataclass(frozen=True)
class DataConfig:
    data_path: str | None = None  # indexed-dataset prefix; None = default stdlib corpus
    tokenizer_model: str | None = None
    split: str = "969,30,1"
    default_vocab_size: int = 4096  # tokenizer vocab for the default corpus
    cache_dir: str | None = None
    num_workers: int = 0


@dataclass(frozen=True)
class TrainingConfig:
    micro_batch_size: int = 8
    global_batch_size: int | None = None  # default micro x dp x pp (no accumulation without pipelining)
    train_iters: int = 300
    seed: int = 1234
    log_interval: int = 10
    eval_interval: int = 100
    eval_iters: int = 10
    deterministic: bool = False


@dataclass(frozen=True)
class LoggingConfig:
    output_dir: str | None = None  # default output/run-<timestamp>
    tensorboard_dir: str | None = None  # default <output_dir>/tensorboard
    no_tensorboard: bool = False
    timeline_out: str | None = None  # JSON of the last training step's pipeline timeline


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def replace(self, **sections: Any) -> "RunConfig":
        """Copy with some fields of some sections replaced: cfg.replace(model={"vocab_size": 512})."""
        updated = {name: dataclasses.replace(getattr(self, name), **fields) for name, fields in sections.items()}
        return dataclasses.replace(self, **updated)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    # ----- derived sizes -------------------------------------------------------------------------
    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.parallel.tensor_model_parallel_size * self.parallel.pipeline_model_parallel_size)

    def global_batch_size(self, world_size: int) -> int:
        """Explicit, or by default micro x dp x pp: one microbatch per pipeline stage, the fewest that
        fill the pipeline (and a valid count for the interleaved schedule); micro x dp without pp."""
        t = self.training
        return t.global_batch_size or (
            t.micro_batch_size * self.data_parallel_size(world_size) * self.parallel.pipeline_model_parallel_size)

    def virtual_pipeline_size(self, num_layers: int | None = None) -> int:
        p = self.parallel
        if p.num_layers_per_virtual_pipeline_stage:
            return (num_layers or self.model.num_layers) // (
                p.pipeline_model_parallel_size * p.num_layers_per_virtual_pipeline_stage)
        return p.virtual_pipeline_model_parallel_size or 1

    def layers_per_virtual_stage(self) -> list[int]:
        from megazero.pipeline_parallel.partition import layers_per_virtual_stage

        p = self.parallel
        return layers_per_virtual_stage(self.model.num_layers, p.pipeline_model_parallel_size,
                                        self.virtual_pipeline_size(), p.decoder_first_pipeline_num_layers,
                                        p.decoder_last_pipeline_num_layers)

    def num_microbatches(self, world_size: int) -> int:
        return self.global_batch_size(world_size) // (self.training.micro_batch_size * self.data_parallel_size(world_size))

    # ----- validation ----------------------------------------------------------------------------
    def validate(self, world_size: int) -> None:
        """Every cross-field check, before any process group exists. Raises ConfigError (one line)."""
        from megazero.topology import GridShape

        m, p, o, t = self.model, self.parallel, self.optimizer, self.training
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        GridShape(world_size=world_size, tp=tp, pp=pp)  # world divisible by tp x pp
        if p.zero_stage != 0:
            raise ConfigError(
                f"--zero-stage {p.zero_stage}: ZeRO sharding is not built yet (issue 'ZeRO stages 1, 2 and 3'); "
                f"use --zero-stage 0 (plain data-parallel all-reduce)"
            )
        for name in ("num_layers", "hidden_size", "num_attention_heads", "seq_length", "make_vocab_size_divisible_by"):
            if getattr(m, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(m, name)}")
        if m.hidden_size % m.num_attention_heads:
            raise ConfigError(
                f"--hidden-size {m.hidden_size} is not divisible by --num-attention-heads {m.num_attention_heads}"
            )
        if m.num_attention_heads % tp:
            raise ConfigError(
                f"--num-attention-heads {m.num_attention_heads} is not divisible by tensor-parallel size {tp}; "
                f"choose heads that are a multiple of {tp} or a smaller --tp"
            )
        if m.ffn_size % tp:
            raise ConfigError(f"--ffn-hidden-size {m.ffn_size} is not divisible by tensor-parallel size {tp}")
        if m.seq_length > m.max_positions:
            raise ConfigError(
                f"--seq-length {m.seq_length} exceeds --max-position-embeddings {m.max_positions}; "
                f"raise --max-position-embeddings or lower --seq-length"
            )
        for name in ("hidden_dropout", "attention_dropout"):
            if not 0.0 <= getattr(m, name) < 1.0:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(m, name)}")
        if t.micro_batch_size < 1:
            raise ConfigError(f"--micro-batch-size must be >= 1, got {t.micro_batch_size}")
        dp = self.data_parallel_size(world_size)
        gbs = self.global_batch_size(world_size)
        if gbs % (t.micro_batch_size * dp):
            raise ConfigError(
                f"--global-batch-size {gbs} is not divisible by --micro-batch-size {t.micro_batch_size} x "
                f"data-parallel size {dp} = {t.micro_batch_size * dp}; use a multiple of {t.micro_batch_size * dp}"
            )
        self._validate_pipeline(world_size)
        if t.train_iters < 1:
            raise ConfigError(f"--train-iters must be >= 1, got {t.train_iters}")
        for name in ("log_interval", "eval_interval"):
            if getattr(t, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(t, name)}")
        if t.eval_iters < 0:
            raise ConfigError(f"--eval-iters must be >= 0, got {t.eval_iters}")
        if o.lr_decay_style not in ("cosine", "linear", "constant"):
            raise ConfigError(f"--lr-decay-style must be cosine, linear or constant, got {o.lr_decay_style!r}")
        if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
            raise ConfigError(f"need 0 <= --min-lr ({o.min_lr}) <= --lr ({o.lr}) and --lr > 0")
        if o.lr_warmup_iters < 0 or o.clip_grad < 0 or o.weight_decay < 0:
            raise ConfigError("--lr-warmup-iters, --clip-grad and --weight-decay must be >= 0")
        self._validate_data_paths()

    def _validate_pipeline(self, world_size: int) -> None:
        from megazero.pipeline_parallel.schedules import validate_schedule

        p, m = self.parallel, self.model
        pp = p.pipeline_model_parallel_size
        if p.virtual_pipeline_model_parallel_size and p.num_layers_per_virtual_pipeline_stage:
            raise ConfigError("give either --virtual-pipeline-model-parallel-size (--vp) or "
                              "--num-layers-per-virtual-pipeline-stage, not both")
        if p.num_layers_per_virtual_pipeline_stage is not None:
            n = p.num_layers_per_virtual_pipeline_stage
            if n < 1 or m.num_layers % (pp * n):
                raise ConfigError(f"--num-layers {m.num_layers} is not divisible by --pp {pp} x "
                                  f"--num-layers-per-virtual-pipeline-stage {n}")
        if self.virtual_pipeline_size() < 1:
            raise ConfigError(f"virtual pipeline size must be >= 1, got {self.virtual_pipeline_size()}")
        self.layers_per_virtual_stage()  # layer partition errors
        validate_schedule(pp, self.virtual_pipeline_size(), self.num_microbatches(world_size))

    def _validate_data_paths(self) -> None:
        d = self.data
        if d.data_path is not None:
            prefix = Path(d.data_path)
            for suffix in (".bin", ".idx"):
                f = prefix.with_name(prefix.name + suffix)
                if not f.is_file():
                    raise ConfigError(
                        f"--data-path {d.data_path}: {f} not found or not a file; pass the prefix written by "
                        f"tools/preprocess_data.py --output-prefix (without .bin/.idx)"
                    )
            if d.tokenizer_model is None:
                raise ConfigError(f"--data-path needs --tokenizer-model (the tokenizer the data was made with)")
        if d.tokenizer_model is not None and not Path(d.tokenizer_model).is_file():
            raise ConfigError(f"--tokenizer-model {d.tokenizer_model}: file not found")
        if d.tokenizer_model is not None and d.data_path is None:
            raise ConfigError("--tokenizer-model without --data-path: pass the dataset made with that tokenizer too")
