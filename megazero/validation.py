"""Cross-section checks of a RunConfig that need the grid, pipeline-partition or data-split math
(DESIGN.md principle 7): `validate(cfg, world_size)` runs every check once, on every rank, before any
process group exists, raising ConfigError (one line with the fix).

It lives above topology, pipeline_parallel and data so that config.py stays a leaf (imports flow one
way); the checks that need only the dataclasses are RunConfig methods, called here in order.
"""

from __future__ import annotations

import math
from pathlib import Path

from megazero.config import RunConfig, check_folder
from megazero.data.gpt_dataset import parse_split
from megazero.errors import ConfigError
from megazero.model.parts import check_parts
from megazero.pipeline_parallel.partition import layers_of_config
from megazero.pipeline_parallel.schedules import validate_schedule
from megazero.topology import GridShape


def validate(cfg: RunConfig, world_size: int) -> None:
    """Every cross-field check, before any process group exists. Raises ConfigError (one line)."""
    m, p, o = cfg.model, cfg.parallel, cfg.optimizer
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    cfg.check_fields()  # every number in its declared range, every float finite
    GridShape(world_size=world_size, tp=tp, pp=pp, cp=p.context_parallel_size)  # world divisible by tp x cp x pp
    cfg.check_precision_and_zero()
    check_parts(m)  # norm / position / attention names, query groups, head dim
    if m.num_attention_heads % tp:
        raise ConfigError(
            f"--num-attention-heads {m.num_attention_heads} is not divisible by tensor-parallel size {tp}; "
            f"choose heads that are a multiple of {tp} or a smaller --tp"
        )
    groups = m.query_groups
    if (groups >= tp and groups % tp) or (groups < tp and tp % groups):
        raise ConfigError(f"--num-query-groups {groups} and tensor-parallel size {tp}: one must divide the other "
                          f"(each rank holds whole key/value groups, or a group is shared by tp / groups ranks)")
    if m.ffn_size % tp:
        default = "" if m.ffn_hidden_size else (
            f" (the {'--swiglu default, 2/3 of 4 x hidden in multiples of 64' if m.swiglu else 'default, 4 x hidden'}"
            f"); give an --ffn-hidden-size divisible by {tp}")
        raise ConfigError(f"--ffn-hidden-size {m.ffn_size} is not divisible by tensor-parallel size {tp}{default}")
    if m.seq_length > m.max_positions:
        raise ConfigError(
            f"--seq-length {m.seq_length} exceeds --max-position-embeddings {m.max_positions}; "
            f"raise --max-position-embeddings or lower --seq-length"
        )
    cfg.activation.check(tp, m.seq_length)
    _check_context_parallel(cfg)
    cfg.batch_sizes(world_size)
    _check_pipeline(cfg, world_size)
    if o.lr_decay_style not in ("cosine", "linear", "constant"):
        raise ConfigError(f"--lr-decay-style must be cosine, linear or constant, got {o.lr_decay_style!r}")
    if o.min_lr > o.lr:
        raise ConfigError(f"--min-lr {o.min_lr:g} exceeds --lr {o.lr:g}; the schedule decays from --lr down to "
                          f"--min-lr, so lower --min-lr or raise --lr")
    _check_data_and_outputs(cfg)
    cfg.check_checkpoint()


CP_COMM_TYPES = ("p2p", "a2a", "a2a+p2p")  # Megatron's --cp-comm-type choices


def _check_context_parallel(cfg: RunConfig) -> None:
    """--context-parallel-size / --cp-comm-type against the model (the tp x cp x pp grid: GridShape)."""
    m, p, seq = cfg.model, cfg.parallel, cfg.model.seq_length
    cp, tp, kind = p.context_parallel_size, p.tensor_model_parallel_size, p.cp_comm_type
    if kind not in CP_COMM_TYPES:
        raise ConfigError(f"--cp-comm-type must be p2p or a2a, got {kind!r}")
    if kind == "a2a+p2p":
        raise ConfigError("--cp-comm-type a2a+p2p (Megatron's hierarchical all-to-all within nodes, ring across "
                          "them) is not built in megazero; use p2p (ring attention) or a2a (all-to-all)")
    if cp == 1:
        return
    if seq % (2 * cp):
        # causal load balancing: each cp rank holds chunks r and 2cp-1-r of 2cp equal chunks
        raise ConfigError(f"--context-parallel-size {cp} splits each sequence into 2 x {cp} = {2 * cp} equal chunks "
                          f"(two per rank, for an even causal workload): --seq-length {seq} must be a multiple of "
                          f"{2 * cp}")
    if cfg.activation.sequence_parallel and (seq // cp) % tp:
        raise ConfigError(f"--sequence-parallel with --context-parallel-size {cp}: each rank's {seq // cp} tokens "
                          f"(--seq-length {seq} / cp {cp}) are split across the {tp} tensor-parallel ranks, so "
                          f"--seq-length must be a multiple of {cp * math.lcm(2, tp)} (of cp x tp and of 2 x cp)")
    if m.attention_dropout > 0:
        raise ConfigError(f"--context-parallel-size {cp}: ring and all-to-all attention apply no attention dropout, "
                          f"and this run has --attention-dropout {m.attention_dropout:g}; add --attention-dropout 0")
    if kind == "a2a":
        from megazero.context_parallel.all_to_all import check_a2a_heads

        # the exchange splits the heads this tensor-parallel rank holds (a kv group shared by tp / groups
        # ranks is one local kv head on each)
        check_a2a_heads(m.num_attention_heads // tp, max(m.query_groups // tp, 1), cp)


def _check_pipeline(cfg: RunConfig, world_size: int) -> None:
    p, m = cfg.parallel, cfg.model
    pp = p.pipeline_model_parallel_size
    if p.virtual_pipeline_model_parallel_size and p.num_layers_per_virtual_pipeline_stage:
        raise ConfigError("give either --virtual-pipeline-model-parallel-size (--vp) or "
                          "--num-layers-per-virtual-pipeline-stage, not both")
    if p.num_layers_per_virtual_pipeline_stage is not None:
        n = p.num_layers_per_virtual_pipeline_stage
        if n < 1 or m.num_layers % (pp * n):
            raise ConfigError(f"--num-layers {m.num_layers} is not divisible by --pp {pp} x "
                              f"--num-layers-per-virtual-pipeline-stage {n}")
    if cfg.virtual_pipeline_size() < 1:
        raise ConfigError(f"virtual pipeline size must be >= 1, got {cfg.virtual_pipeline_size()}")
    counts = layers_of_config(cfg)  # layers per virtual stage; layer partition errors
    act = cfg.activation
    if act.method == "block" and act.layers_per_checkpoint > max(counts):
        raise ConfigError(f"--recompute-method block --recompute-num-layers {act.layers_per_checkpoint}: each "
                          f"pipeline chunk holds at most {max(counts)} layers; use --recompute-num-layers <= "
                          f"{max(counts)} (recompute every layer: --recompute-method uniform)")
    validate_schedule(pp, cfg.virtual_pipeline_size(), cfg.num_microbatches(world_size))

def _check_data_and_outputs(cfg: RunConfig) -> None:
    d, lc = cfg.data, cfg.logging
    parse_split(d.split)  # one-line DataError for a malformed --split
    if d.data_path is not None and (d.default_vocab_size is not None or d.cache_dir is not None):
        raise ConfigError("--vocab-size and --data-cache-dir apply only to the default corpus; drop them when "
                          "giving --data-path (the tokenizer's vocab comes from --tokenizer-model)")
    if lc.no_tensorboard and lc.tensorboard_dir:
        raise ConfigError("--tensorboard-dir with --no-tensorboard: drop one of them")
    for flag, folder in (("--output-dir", lc.output_dir), ("--tensorboard-dir", lc.tensorboard_dir),
                         ("--data-cache-dir", d.cache_dir)):
        check_folder(flag, folder)
    if lc.timeline_out and not Path(lc.timeline_out).resolve().parent.is_dir():
        raise ConfigError(f"--timeline-out {lc.timeline_out}: folder {Path(lc.timeline_out).resolve().parent} "
                          f"does not exist; create it or choose another path")
    if lc.timeline_out and Path(lc.timeline_out).is_dir():
        raise ConfigError(f"--timeline-out {lc.timeline_out}: is a folder; name a file, e.g. "
                          f"{Path(lc.timeline_out) / 'timeline.json'}")
    if lc.output_dir and (Path(lc.output_dir) / "training_metrics.csv").exists() and not cfg.checkpoint.load:
        raise ConfigError(f"--output-dir {lc.output_dir} already holds a run (training_metrics.csv); choose a new "
                          f"folder, or add --load CHECKPOINT to continue that run")
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
            raise ConfigError("--data-path needs --tokenizer-model (the tokenizer the data was made with)")
    d.check_tokenizer()
    if d.tokenizer_model is not None and not Path(d.tokenizer_model).exists():  # a Hugging Face one may be a folder
        raise ConfigError(f"--tokenizer-model {d.tokenizer_model}: file not found")
    if d.tokenizer_model is not None and d.data_path is None:
        raise ConfigError("--tokenizer-model without --data-path: pass the dataset made with that tokenizer too")
