"""Typed, frozen configuration (DESIGN.md principle 7).

One dataclass per component. `megazero/cli.py` turns Megatron-style flags into a `RunConfig`;
`megazero.validation.validate(cfg, world_size)` checks every cross-field constraint once, on every
rank, before any process group exists, raising ConfigError with a one-line fix; the checks that need
only these dataclasses are methods here (config.py imports nothing of megazero but errors). Nothing
reads a global args object.

Numeric fields declare what they accept where they are defined (`num(default, ge=, gt=, le=, lt=)`:
range metadata on the dataclass field); `field_requirement` checks one value against it and
`RunConfig.check_fields` checks a whole config. Every float must also be finite, declared or not.
cli.py applies the same rule to each flag as the user spelled it, the ds_config mapping to each key
of the file, so `--lr nan`, `--seed -1` or `"gradient_clipping": -1` is one line naming the input.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megazero.errors import ConfigError

SEED_MAX = 2**32 - 1  # numpy's and torch's seeds are unsigned 32-bit


def num(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
        lt: float | None = None, flag: str | None = None) -> Any:
    """A numeric dataclass field with the range it accepts (None is always accepted where the
    default is None: "not given"); `flag` names it in messages when its flag is not --field-name."""
    return field(default=default, metadata={"ge": ge, "gt": gt, "le": le, "lt": lt, "flag": flag})


def _bound(x: float) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def _range_text(meta: dict) -> str:
    lo = (">=", meta.get("ge")) if meta.get("ge") is not None else (">", meta.get("gt"))
    hi = ("<=", meta.get("le")) if meta.get("le") is not None else ("<", meta.get("lt"))
    if lo[1] is not None and hi[1] is not None:
        return f"in {'[' if lo[0] == '>=' else '('}{_bound(lo[1])}, {_bound(hi[1])}{']' if hi[0] == '<=' else ')'}"
    if lo[1] is not None:
        return f"{lo[0]} {_bound(lo[1])}"
    if hi[1] is not None:
        return f"{hi[0]} {_bound(hi[1])}"
    return ""


def field_requirement(f: dataclasses.Field, value: Any) -> str | None:
    """What `value` for dataclass field `f` violates, as "must be ..." (None when it is fine): its
    declared range (num(...)), and for any float, being finite."""
    if value is None or isinstance(value, (bool, str)):
        return None
    meta = f.metadata
    rng = _range_text(meta)
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number{' ' + rng if rng else ''}"
    if not isinstance(value, (int, float)):
        return None
    ok = ((meta.get("ge") is None or value >= meta["ge"]) and (meta.get("gt") is None or value > meta["gt"])
          and (meta.get("le") is None or value <= meta["le"]) and (meta.get("lt") is None or value < meta["lt"]))
    return None if ok else f"must be {rng}"


def field_flag(f: dataclasses.Field) -> str:
    """How messages name a field: its flag (`--lr`)."""
    return f.metadata.get("flag") or f"--{f.name.replace('_', '-')}"


def show_value(value: Any) -> str:
    return f"{value:.10g}" if isinstance(value, float) else str(value)


def check_folder(flag: str, path: str | None) -> None:
    """A folder the run creates or writes into (--output-dir, --save, ...): not an existing file, and its
    nearest existing ancestor a folder this process may write into. ConfigError otherwise."""
    import os

    if path is None:
        return
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ConfigError(f"{flag} {path}: exists and is not a folder; choose a folder")
    existing = next(a for a in [p, *p.parents] if a.exists())
    if not existing.is_dir():
        raise ConfigError(f"{flag} {path}: {existing} is a file, so the folder cannot be created there; choose "
                          f"another path")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: {existing} is not writable by this user; choose a folder you can "
                          f"write to")


@dataclass(frozen=True)
class ModelConfig:
    # --model-size: the preset (megazero/presets.py) the shape fields below were expanded from, recorded in
    # config.json; a name only (the checkpoint shape check compares the fields, not this)
    model_size: str | None = None
    num_layers: int = num(4, ge=1)
    hidden_size: int = num(256, ge=1)
    num_attention_heads: int = num(4, ge=1)
    ffn_hidden_size: int | None = num(None, ge=1)  # default 4 * hidden_size (GPT-2)
    seq_length: int = num(128, ge=1)
    max_position_embeddings: int | None = num(None, ge=1)  # default seq_length
    vocab_size: int | None = num(None, ge=1)  # logical vocab; filled from the tokenizer at build time
    make_vocab_size_divisible_by: int = num(128, ge=1)
    hidden_dropout: float = num(0.1, ge=0.0, lt=1.0)
    attention_dropout: float = num(0.1, ge=0.0, lt=1.0)
    init_method_std: float = num(0.02, gt=0.0)
    layernorm_epsilon: float = num(1e-5, gt=0.0, flag="--norm-epsilon")  # LayerNorm and RMSNorm alike
    fused_kernels: bool = True  # fused CUDA norms where built and applicable (--no-fused-kernels: reference)
    # The block's parts (Megatron's flags; the defaults are GPT-2's; docs/models.md; their checks and
    # description: megazero/model/parts.py). Llama: RMSNorm,
    # rope, swiglu, query groups, untied output layer, no linear biases.
    normalization: str = "LayerNorm"  # LayerNorm | RMSNorm
    position_embedding_type: str = "learned_absolute"  # learned_absolute | rope | none
    rotary_base: float = num(10000.0, gt=0.0)  # rope theta
    rotary_percent: float = num(1.0, gt=0.0, le=1.0)  # fraction of each head's dims rotated
    # Llama 3.1 frequency scaling (HF "rope_type": "llama3"): the factor and its bands
    use_rope_scaling: bool = False
    rope_scaling_factor: float = num(8.0, gt=0.0)
    rope_low_freq_factor: float = num(1.0, gt=0.0)
    rope_high_freq_factor: float = num(4.0, gt=0.0)
    rope_original_max_positions: int = num(8192, ge=1)
    swiglu: bool = False  # silu(x W_gate) * (x W_up) instead of gelu(x W_1)
    group_query_attention: bool = False  # Megatron: num_query_groups is used only with this set
    num_query_groups: int = num(1, ge=1)  # grouped-query attention: key/value heads
    kv_channels: int | None = num(None, ge=1)  # per-head dim (None = hidden / heads)
    untie_embeddings_and_output_weights: bool = False
    add_bias_linear: bool = True  # biases in every linear layer (--disable-bias-linear: none)
    add_qkv_bias: bool = False  # a QKV bias even without add_bias_linear (Qwen2)
    qk_layernorm: bool = False  # normalise q and k per head before attention (the block's norm type)
    attention_backend: str = "auto"  # auto | sdpa | fused | unfused

    @property
    def ffn_size(self) -> int:
        if self.ffn_hidden_size:
            return self.ffn_hidden_size
        if self.swiglu:  # Megatron's SwiGLU default: 2/3 of 4h (same parameter count), a multiple of 64
            return int(4 * self.hidden_size * 2 / 3 / 64) * 64 or 64
        return 4 * self.hidden_size

    @property
    def max_positions(self) -> int:
        return self.max_position_embeddings or self.seq_length

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def query_groups(self) -> int:
        """Key/value heads: each serves num_attention_heads / query_groups query heads (MHA: all)."""
        return self.num_query_groups if self.group_query_attention else self.num_attention_heads

    @property
    def qkv_bias(self) -> bool:
        return self.add_bias_linear or self.add_qkv_bias

    def padded_vocab_size(self, tp: int) -> int:
        """Round the vocab up to a multiple of make_vocab_size_divisible_by x tp (Megatron's rule)."""
        assert self.vocab_size is not None, "vocab_size is set from the tokenizer before the model is built"
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple


@dataclass(frozen=True)
class ParallelConfig:
    tensor_model_parallel_size: int = num(1, ge=1)
    pipeline_model_parallel_size: int = num(1, ge=1)
    # Context parallelism (megazero/context_parallel/): the sequence of each sample is split across cp
    # ranks (load-balanced chunks), which share the same samples and replicate the parameters (Megatron).
    context_parallel_size: int = num(1, ge=1)
    cp_comm_type: str = "p2p"  # p2p (ring attention) | a2a (all-to-all, DeepSpeed-Ulysses)
    distributed_backend: str | None = None  # None: nccl with CUDA, else gloo
    # A collective or p2p transfer waiting longer than this ends the job naming what timed out and which
    # ranks did not arrive (comm.py, watchdog.py, docs/failures.md); Megatron's flag, fractions allowed.
    distributed_timeout_minutes: float = num(10.0, gt=0.0)
    # Interleaved pipeline: give either the chunk count per stage (vp) or Megatron's layers per chunk.
    virtual_pipeline_model_parallel_size: int | None = num(None, ge=1)
    num_layers_per_virtual_pipeline_stage: int | None = num(None, ge=1)
    decoder_first_pipeline_num_layers: int | None = num(None, ge=0)
    decoder_last_pipeline_num_layers: int | None = num(None, ge=0)


RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")


@dataclass(frozen=True)
class ActivationConfig:
    """Activation memory (docs/activation-memory.md; Megatron's flags, DeepSpeed's activation_checkpointing).

    - sequence_parallel: the norm / dropout regions between tensor-parallel layers hold [b, s/tp, h]
      (all-gather before each column-parallel layer, reduce-scatter after each row-parallel one).
    - recompute_granularity: None (store everything autograd saves), "selective" (recompute the core
      attention and the MLP activation function in backward), "full" (store only the input of each
      checkpointed span of layers and recompute the span in backward).
    - recompute_method (full only): "uniform" checkpoints every span of recompute_num_layers layers of
      each model chunk; "block" checkpoints the first recompute_num_layers layers of each chunk one by
      one and stores the rest in full. recompute_num_layers defaults to 1.
    - distribute_saved_activations (DeepSpeed partition_activations): each checkpointed input is kept
      as 1/tp slices across the tensor-parallel ranks and all-gathered for the recomputation.
    - cpu_offload_activations (DeepSpeed cpu_checkpointing): checkpointed inputs live in host memory,
      copied back ahead of their recomputation.
    - synchronize_checkpoint_boundary (DeepSpeed): CUDA synchronize at each checkpoint's forward and
      recomputation (a profiling aid; nothing to do on CPU).
    """

    sequence_parallel: bool = False
    recompute_granularity: str | None = None  # None | full | selective
    recompute_method: str | None = None  # full: uniform (default) | block
    recompute_num_layers: int | None = num(None, ge=1)  # full: default 1
    distribute_saved_activations: bool = False
    cpu_offload_activations: bool = False
    synchronize_checkpoint_boundary: bool = False

    @property
    def full(self) -> bool:
        return self.recompute_granularity == "full"

    @property
    def selective(self) -> bool:
        return self.recompute_granularity == "selective"

    @property
    def method(self) -> str | None:
        """The full-recomputation method in force (uniform unless given); None without full."""
        return (self.recompute_method or "uniform") if self.full else None

    @property
    def layers_per_checkpoint(self) -> int:
        return self.recompute_num_layers or 1

    def describe(self) -> str:
        """One phrase for the start-up log: "activations: sequence parallel; full recomputation (uniform,
        1 layer per checkpoint, inputs offloaded to host)", "activations: no recomputation"."""
        parts = ["sequence parallel"] if self.sequence_parallel else []
        if self.full:
            n = self.layers_per_checkpoint
            layers = f"{n} layer{'s' if n > 1 else ''}"
            how = ([f"uniform, {layers} per checkpoint"] if self.method == "uniform"
                   else [f"block, the first {layers} of each model chunk checkpointed one by one"])
            kept = [w for w, on in (("partitioned across tensor-parallel ranks", self.distribute_saved_activations),
                                    ("offloaded to host", self.cpu_offload_activations)) if on]
            if kept:
                how.append("inputs " + " and ".join(kept))
            if self.synchronize_checkpoint_boundary:
                how.append("synchronized checkpoint boundaries")
            parts.append(f"full recomputation ({', '.join(how)})")
        elif self.selective:
            parts.append("selective recomputation (core attention where it pays, MLP activation)")
        else:
            parts.append("no recomputation")
        return "activations: " + "; ".join(parts)

    def check(self, tp: int, seq_length: int) -> None:
        """The activation settings alone and against tp / seq_length; ConfigError with the fix."""
        g = self.recompute_granularity
        if g is not None and g not in RECOMPUTE_GRANULARITIES:
            raise ConfigError(f"--recompute-granularity must be full or selective, got {g!r}")
        if self.recompute_method is not None and self.recompute_method not in RECOMPUTE_METHODS:
            raise ConfigError(f"--recompute-method must be uniform or block, got {self.recompute_method!r}")
        if not self.full:
            given = [f for f, on in (("--recompute-method", self.recompute_method is not None),
                                     ("--recompute-num-layers", self.recompute_num_layers is not None),
                                     ("--distribute-saved-activations (partition_activations)",
                                      self.distribute_saved_activations),
                                     ("--cpu-offload-activations (cpu_checkpointing)", self.cpu_offload_activations),
                                     ("synchronize_checkpoint_boundary", self.synchronize_checkpoint_boundary))
                     if on]
            if given:
                now = f"--recompute-granularity {g}" if g else "no recomputation"
                raise ConfigError(f"{given[0]} applies to full recomputation (the checkpointed layer inputs), and "
                                  f"this run has {now}; add --recompute-granularity full or drop it")
        if self.sequence_parallel:
            if tp == 1:
                raise ConfigError("--sequence-parallel shards activations across tensor-parallel ranks and --tp is 1; "
                                  "add --tp 2 or more, or drop --sequence-parallel")
            if seq_length % tp:
                raise ConfigError(f"--sequence-parallel splits the sequence across the {tp} tensor-parallel ranks: "
                                  f"--seq-length {seq_length} must be a multiple of {tp}")
            if self.distribute_saved_activations:
                raise ConfigError("--distribute-saved-activations (partition_activations) with --sequence-parallel: "
                                  "the checkpointed inputs are already split across the tensor-parallel ranks; "
                                  "drop one of them")
        elif self.distribute_saved_activations and tp == 1:
            raise ConfigError("--distribute-saved-activations (partition_activations) splits checkpointed inputs "
                              "across tensor-parallel ranks and --tp is 1; add --tp 2 or more, or drop it")


@dataclass(frozen=True)
class PrecisionConfig:
    """Model (parameter and activation) dtype; master weights, gradient accumulation and optimizer
    state are always fp32. fp16 uses a loss scaler (dynamic unless loss_scale is set)."""

    params_dtype: str = "fp32"  # fp32 | bf16 | fp16
    loss_scale: float | None = num(None, gt=0.0)  # fp16: None = dynamic, a number = static scale
    initial_loss_scale: float = num(2.0**16, gt=0.0)
    loss_scale_window: int = num(1000, ge=1)  # overflow-free steps before the dynamic scale doubles
    hysteresis: int = num(2, ge=1)  # overflows tolerated before the scale halves
    min_loss_scale: float = num(1.0, gt=0.0)
    max_consecutive_skipped_steps: int = num(50, ge=1)  # stop the run after this many skipped steps in a row


@dataclass(frozen=True)
class ZeroConfig:
    """ZeRO over the data-parallel group: 0 = all-reduce gradients; 1 = shard optimizer state and fp32
    master weights; 2 = also gradients; 3 = also parameters. Sizes are in elements."""

    stage: int = num(0, ge=0, le=3, flag="--zero-stage")
    # Gradient bucket (reduce / reduce-scatter unit): 6.25M elements = torch DDP's 25 MB in fp32, small
    # enough that reductions start while backward is still running on mid-sized models.
    reduce_bucket_size: int = num(6_250_000, ge=1, flag="--ddp-bucket-size")
    overlap_comm: bool = True  # reduce buckets during backward; gather parameters ahead of use
    # Gradient accumulation / reduction dtype: fp32 (Megatron's default for bf16; exact sums) or the
    # model's dtype (DeepSpeed's default; half the gradient memory and reduce traffic in bf16/fp16).
    grad_reduce_dtype: str = "fp32"  # fp32 | model
    stage3_prefetch_layers: int = num(1, ge=0)  # stage 3: layers whose parameters are gathered ahead
    # Offload (zero/offload.py): fp32 masters + Adam moments to host RAM or NVMe files, stepped by the
    # CPU Adam; parameter shards to host RAM (stage 3).
    offload_optimizer: str = "none"  # none | cpu | nvme
    offload_param: str = "none"  # none | cpu
    offload_nvme_path: str | None = None
    # Elements stepped per NVMe read/step/write round: host RAM holds 2 sub-groups' state (2 x 12 B/elt)
    # plus their gradients. DeepSpeed's default is 1e9; 1e8 keeps that window ~2.4 GB + 0.8 GB.
    offload_sub_group_size: int = num(100_000_000, ge=1)


@dataclass(frozen=True)
class OptimizerConfig:
    # adamw (decoupled decay; Megatron's and DeepSpeed's "adam") | adam_l2 | sgd (with momentum; its weight
    # decay is L2 added to the gradient, as in torch.optim.SGD and Megatron's --optimizer sgd)
    optimizer_type: str = "adamw"
    lr: float = num(6e-4, gt=0.0)
    min_lr: float = num(6e-5, ge=0.0)
    weight_decay: float = num(0.1, ge=0.0)
    # adam_* apply to adamw / adam_l2 only, sgd_momentum to sgd only.
    adam_beta1: float = num(0.9, ge=0.0, lt=1.0)
    adam_beta2: float = num(0.95, ge=0.0, lt=1.0)
    adam_eps: float = num(1e-8, gt=0.0)
    sgd_momentum: float = num(0.9, ge=0.0)  # Megatron's default (torch.optim.SGD's is 0)
    clip_grad: float = num(1.0, ge=0.0)
    lr_warmup_iters: int = num(20, ge=0)
    lr_warmup_init: float = num(0.0, ge=0.0)  # lr the warmup starts from
    lr_warmup_style: str = "linear"  # linear | log (DeepSpeed WarmupLR's default)
    lr_decay_iters: int | None = num(None, ge=1)  # default train_iters
    lr_decay_style: str = "cosine"  # cosine | linear | constant


# --tokenizer-type values (Megatron's names); megazero/data/tokenizer_types.py builds them
TOKENIZER_TYPES = ("SentencePieceTokenizer", "HuggingFaceTokenizer")


@dataclass(frozen=True)
class DataConfig:
    data_path: str | None = None  # indexed-dataset prefix; None = default stdlib corpus
    # a sentencepiece .model, or (HuggingFaceTokenizer) a tokenizer.json or a folder holding one
    tokenizer_model: str | None = None
    tokenizer_type: str = "SentencePieceTokenizer"
    split: str = "969,30,1"
    # tokenizer vocab for the default corpus (None: 4096)
    default_vocab_size: int | None = num(None, ge=1, flag="--vocab-size")
    cache_dir: str | None = None
    num_workers: int = num(0, ge=0)

    def check_tokenizer(self) -> None:
        """--tokenizer-type is a known kind; a Hugging Face tokenizer needs its file (the default corpus
        trains a sentencepiece model)."""
        if self.tokenizer_type not in TOKENIZER_TYPES:
            raise ConfigError(f"--tokenizer-type must be one of {', '.join(TOKENIZER_TYPES)}, got "
                              f"{self.tokenizer_type!r}")
        if self.tokenizer_type == "HuggingFaceTokenizer" and self.tokenizer_model is None:
            raise ConfigError("--tokenizer-type HuggingFaceTokenizer needs --tokenizer-model (its tokenizer.json or "
                              "folder) and --data-path (a dataset preprocessed with it); the default corpus "
                              "trains a sentencepiece tokenizer")


@dataclass(frozen=True)
class TrainingConfig:
    # Any two of micro / accumulation / global imply the third (global = micro x accumulation x dp).
    # micro None is only valid when global and accumulation are both given (a ds_config.json case).
    micro_batch_size: int | None = num(8, ge=1)
    global_batch_size: int | None = num(None, ge=1)  # default micro x dp x pp (no accumulation without pipelining)
    gradient_accumulation_steps: int | None = num(None, ge=1)
    train_iters: int = num(300, ge=1)
    seed: int = num(1234, ge=0, le=SEED_MAX)
    log_interval: int = num(10, ge=1)
    eval_interval: int = num(100, ge=1)
    eval_iters: int = num(10, ge=0)
    deterministic: bool = False


@dataclass(frozen=True)
class LoggingConfig:
    output_dir: str | None = None  # default output/run-<timestamp>
    tensorboard_dir: str | None = None  # default <output_dir>/tensorboard
    no_tensorboard: bool = False
    no_csv: bool = False  # skip training_metrics.csv / validation_metrics.csv
    timeline_out: str | None = None  # JSON of the last training step's pipeline timeline
    log_memory: bool = False  # per-rank bytes in parameters, gradients, optimizer state
    log_comm: bool = False  # per-rank bytes moved by each collective per step
    wall_clock_breakdown: bool = False  # per-phase step times (forward-backward, grad sync, optimizer)


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoints (megazero/checkpoint/, docs/checkpoints.md); Megatron's flag names."""

    save: str | None = None  # folder of iter_N checkpoints + `latest`
    load: str | None = None  # resume from its `latest` (missing or empty folder: start from scratch)
    save_interval: int | None = num(None, ge=1)  # iterations between saves (the end of the run always saves)
    keep_last: int | None = num(None, ge=1)  # prune older committed checkpoints after each save
    exit_interval: int | None = num(None, ge=1)  # stop (after saving) when iteration % N == 0
    exit_duration_in_mins: float | None = num(None, gt=0.0)  # stop (after saving) once the run has lasted this long
    no_load_optim: bool = False  # load weights only: fresh Adam state
    no_load_rng: bool = False
    finetune: bool = False  # weights only, iteration and data position from 0


@dataclass(frozen=True)
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    activation: ActivationConfig = field(default_factory=ActivationConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

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
        """Ranks holding distinct samples: world // (tp x cp x pp). The cp ranks of one data-parallel
        replica split each sample's sequence, so they count once in the batch (Megatron's rule)."""
        p = self.parallel
        return world_size // (p.tensor_model_parallel_size * p.context_parallel_size * p.pipeline_model_parallel_size)

    def batch_sizes(self, world_size: int) -> tuple[int, int, int]:
        """(micro, accumulation steps, global) with global = micro x accumulation x dp.

        Any two given imply the third; all three given must agree (ConfigError with the numbers).
        With only micro given, accumulation defaults to pp (one microbatch per pipeline stage: the
        fewest that fill the pipeline, and a valid count for the interleaved schedule), i.e. 1 without
        pipelining."""
        t, dp = self.training, self.data_parallel_size(world_size)
        micro, accum, gbs = t.micro_batch_size, t.gradient_accumulation_steps, t.global_batch_size
        p = self.parallel
        # with cp the data-parallel size is not world / (tp x pp): say where the number comes from
        dps = f"data-parallel size {dp}" + (
            f" (world {world_size} / (tp {p.tensor_model_parallel_size} x cp {p.context_parallel_size} x pp "
            f"{p.pipeline_model_parallel_size}): context-parallel ranks share samples)"
            if p.context_parallel_size > 1 else "")
        for name, value in (("micro batch size", micro), ("gradient accumulation steps", accum),
                            ("global batch size", gbs)):
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, got {value}")
        if micro is None:
            if gbs is None or accum is None:
                raise ConfigError("give the micro batch size, or both the global batch size and the gradient "
                                  "accumulation steps")
            if gbs % (accum * dp):
                raise ConfigError(
                    f"global batch size {gbs} is not divisible by gradient accumulation steps {accum} x {dps} = "
                    f"{accum * dp}, so no micro batch size fits")
            micro = gbs // (accum * dp)
        if gbs is None:
            gbs = micro * dp * (accum or self.parallel.pipeline_model_parallel_size)
        if accum is None:
            if gbs % (micro * dp):
                raise ConfigError(
                    f"--global-batch-size {gbs} is not divisible by --micro-batch-size {micro} x {dps} = "
                    f"{micro * dp}; use a multiple of {micro * dp}")
            accum = gbs // (micro * dp)
        if micro * accum * dp != gbs:
            raise ConfigError(
                f"batch sizes disagree: global batch {gbs} != micro batch {micro} x gradient accumulation {accum} x "
                f"{dps} = {micro * accum * dp}")
        return micro, accum, gbs

    def micro_batch_size(self, world_size: int) -> int:
        return self.batch_sizes(world_size)[0]

    def global_batch_size(self, world_size: int) -> int:
        return self.batch_sizes(world_size)[2]

    def virtual_pipeline_size(self, num_layers: int | None = None) -> int:
        p = self.parallel
        if p.num_layers_per_virtual_pipeline_stage:
            return (num_layers or self.model.num_layers) // (
                p.pipeline_model_parallel_size * p.num_layers_per_virtual_pipeline_stage)
        return p.virtual_pipeline_model_parallel_size or 1

    def num_microbatches(self, world_size: int) -> int:
        return self.batch_sizes(world_size)[1]

    def resolved(self, world_size: int) -> "RunConfig":
        """This config with the batch sizes made explicit (what runs and what config.json records)."""
        micro, accum, gbs = self.batch_sizes(world_size)
        return self.replace(training={"micro_batch_size": micro, "gradient_accumulation_steps": accum,
                                      "global_batch_size": gbs})

    # ----- validation ----------------------------------------------------------------------------
    def check_fields(self) -> None:
        """Every numeric field within the range its dataclass declares (num(...)), every float finite;
        ConfigError naming the flag. Runs first in validation.validate(), and in cli.parse_args per flag given."""
        for section in dataclasses.fields(self):
            values = getattr(self, section.name)
            for f in dataclasses.fields(values):
                value = getattr(values, f.name)
                problem = field_requirement(f, value)
                if problem:
                    raise ConfigError(f"{field_flag(f)} {problem}, got {show_value(value)}")

    def check_checkpoint(self) -> None:
        c = self.checkpoint
        if (c.save_interval or c.keep_last) and not c.save:
            raise ConfigError("--save-interval / --keep-last need --save DIR")
        used = [f for f, on in (("--finetune", c.finetune), ("--no-load-optim", c.no_load_optim),
                                ("--no-load-rng", c.no_load_rng)) if on]
        if used and not c.load:
            raise ConfigError(f"{used[0]} changes what --load restores, and there is no --load; add --load "
                              f"CHECKPOINT or drop {used[0]}")
        check_folder("--save", c.save)

    def check_precision_and_zero(self) -> None:
        pr, z = self.precision, self.zero
        if pr.params_dtype not in ("fp32", "bf16", "fp16"):
            raise ConfigError(f"params dtype must be fp32, bf16 or fp16, got {pr.params_dtype!r}")
        if pr.min_loss_scale > pr.initial_loss_scale:
            raise ConfigError(f"--min-loss-scale {pr.min_loss_scale:g} exceeds --initial-loss-scale "
                              f"{pr.initial_loss_scale:g}; lower --min-loss-scale or raise --initial-loss-scale")
        if z.grad_reduce_dtype not in ("fp32", "model"):
            raise ConfigError(f"--grad-reduce-dtype must be fp32 or model, got {z.grad_reduce_dtype!r}")
        self.check_offload()
        if self.optimizer.optimizer_type not in ("adamw", "adam_l2", "sgd"):
            raise ConfigError(f"optimizer must be adamw, adam_l2 or sgd, got {self.optimizer.optimizer_type!r}")
        if self.optimizer.lr_warmup_style not in ("linear", "log"):
            raise ConfigError(f"warmup style must be linear or log, got {self.optimizer.lr_warmup_style!r}")

    def check_offload(self) -> None:
        import os
        import tempfile

        z = self.zero
        if z.offload_optimizer not in ("none", "cpu", "nvme"):
            raise ConfigError(f"--offload-optimizer must be none, cpu or nvme, got {z.offload_optimizer!r}")
        if z.offload_param not in ("none", "cpu"):
            raise ConfigError(f"--offload-param must be none or cpu, got {z.offload_param!r} (parameters are "
                              f"offloaded to host memory only; use --offload-optimizer nvme for the optimizer state)")
        if z.offload_optimizer != "none" and z.stage == 0:
            raise ConfigError(f"--offload-optimizer {z.offload_optimizer} needs --zero-stage 1, 2 or 3 (at stage 0 "
                              f"every data-parallel rank would step the whole model on its CPU)")
        if z.offload_param != "none" and z.stage != 3:
            raise ConfigError(f"--offload-param {z.offload_param} needs --zero-stage 3 (only stage 3 shards the "
                              f"parameters); got --zero-stage {z.stage}")
        if z.offload_optimizer == "nvme":
            path = z.offload_nvme_path
            if not path:
                raise ConfigError("--offload-optimizer nvme needs --offload-nvme-path DIR (a folder on a fast disk)")
            if not os.path.isdir(path):
                raise ConfigError(f"--offload-nvme-path {path}: not an existing folder; create it or choose another")
            try:
                with tempfile.TemporaryFile(dir=path):
                    pass
            except OSError as err:
                raise ConfigError(f"--offload-nvme-path {path}: cannot write there ({err.strerror or err}); "
                                  f"choose a writable folder") from None
        elif z.offload_nvme_path:
            raise ConfigError(f"--offload-nvme-path is only used with --offload-optimizer nvme (got "
                              f"--offload-optimizer {z.offload_optimizer}); drop it or add --offload-optimizer nvme")
