"""The command-line flags: one table that the parser (cli.py) and the ds_config messages
(ds_config/merge.py, to name a setting as the user would type it) both read.

Each flag is `flag(*names, dest="section.field", **argparse keywords)`: the first name is the canonical
spelling, the others aliases (`--tp`); `dest` names the RunConfig field it sets. Imports nothing of
megazero, so every layer above config can read it (docs/architecture.md, "Imports flow one way").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Flag:
    names: tuple[str, ...]
    dest: str
    kwargs: dict[str, Any]

    @property
    def is_switch(self) -> bool:
        """Takes no value (argparse nargs == 0): --bf16, --no-tensorboard."""
        return self.kwargs.get("action") in ("store_const", "store_true", "store_false")

    @property
    def const(self) -> Any:
        """The value a switch stores."""
        return {"store_true": True, "store_false": False}.get(self.kwargs.get("action"), self.kwargs.get("const"))


def flag(*names: str, dest: str, **kwargs: Any) -> Flag:
    return Flag(names, dest, kwargs)


# (argument group title, flags), in --help order
FLAG_GROUPS: list[tuple[str, list[Flag]]] = [
    ('parallelism', [
        flag("--tensor-model-parallel-size", "--tp", dest="parallel.tensor_model_parallel_size", type=int,
             help="tensor-parallel size (default 1)"),
        flag("--pipeline-model-parallel-size", "--pp", dest="parallel.pipeline_model_parallel_size",
             type=int, help="pipeline-parallel size (default 1)"),
        flag("--context-parallel-size", "--cp", dest="parallel.context_parallel_size", type=int,
             help="context-parallel size: each sample's sequence is split across this many ranks, which share "
                  "samples (data-parallel size = world / (tp x cp x pp); default 1)"),
        flag("--cp-comm-type", dest="parallel.cp_comm_type", choices=["p2p", "a2a", "a2a+p2p"],
             help="context-parallel attention: p2p (ring attention, default) or a2a (all-to-all, "
                  "DeepSpeed-Ulysses; heads per tensor-parallel rank divisible by cp); a2a+p2p is not built"),
        flag("--virtual-pipeline-model-parallel-size", "--vp", dest="parallel.virtual_pipeline_model_parallel_size",
             type=int, help="model chunks per pipeline stage: interleaved 1F1B when > 1 (default 1)"),
        flag("--num-layers-per-virtual-pipeline-stage", dest="parallel.num_layers_per_virtual_pipeline_stage",
             type=int, help="Megatron's way to ask for interleaving: layers per model chunk"),
        flag("--decoder-first-pipeline-num-layers", dest="parallel.decoder_first_pipeline_num_layers",
             type=int, help="layers on the first (virtual) pipeline stage (default: even split)"),
        flag("--decoder-last-pipeline-num-layers", dest="parallel.decoder_last_pipeline_num_layers",
             type=int, help="layers on the last (virtual) pipeline stage (default: even split)"),
    ]),
    ('activation memory (docs/activation-memory.md)', [
        flag("--sequence-parallel", dest="activation.sequence_parallel", action="store_true",
             help="shard the norm and dropout activations along the sequence across tensor-parallel ranks (tp > 1)"),
        flag("--recompute-granularity", dest="activation.recompute_granularity", choices=["full", "selective"],
             help="recompute in backward: selective (core attention, MLP activation) or full (layers from their input)"),
        flag("--recompute-activations", dest="activation.recompute_granularity", action="store_const",
             const="selective", help="same as --recompute-granularity selective"),
        flag("--checkpoint-activations", dest="activation.recompute_granularity", action="store_const",
             const="full", help="older Megatron spelling of --recompute-granularity full (method uniform, 1 layer)"),
        flag("--recompute-method", dest="activation.recompute_method", choices=["uniform", "block"],
             help="full: uniform (checkpoint every --recompute-num-layers layers; default) or block (only the first "
                  "--recompute-num-layers layers of each pipeline chunk)"),
        flag("--recompute-num-layers", dest="activation.recompute_num_layers", type=int,
             help="full: layers per checkpoint (uniform) or layers recomputed per chunk (block); default 1"),
        flag("--distribute-saved-activations", dest="activation.distribute_saved_activations", action="store_true",
             help="full: keep each checkpointed layer input split across tensor-parallel ranks (DeepSpeed "
                  "partition_activations)"),
        flag("--cpu-offload-activations", dest="activation.cpu_offload_activations", action="store_true",
             help="full: keep checkpointed layer inputs in host memory (DeepSpeed cpu_checkpointing)"),
    ]),
    ('ZeRO and mixed precision', [
        flag("--zero-stage", dest="zero.stage", type=int, choices=[0, 1, 2, 3],
             help="0: all-reduce grads; 1: shard optimizer state; 2: + gradients; 3: + parameters (default 0)"),
        flag("--ddp-bucket-size", "--reduce-bucket-size", dest="zero.reduce_bucket_size", type=int,
             help="gradient bucket size in elements (default 6.25M)"),
        flag("--grad-reduce-dtype", dest="zero.grad_reduce_dtype", choices=["fp32", "model"],
             help="accumulate and reduce gradients in fp32 (default) or in the model dtype (bf16/fp16)"),
        flag("--no-overlap-comm", dest="zero.overlap_comm", action="store_false",
             help="reduce gradients after backward instead of during it"),
        flag("--bf16", dest="precision.params_dtype", action="store_const", const="bf16",
             help="bf16 parameters and activations, fp32 master weights"),
        flag("--fp16", dest="precision.params_dtype", action="store_const", const="fp16",
             help="fp16 parameters and activations, fp32 master weights, loss scaling"),
        flag("--loss-scale", dest="precision.loss_scale", type=float, help="static loss scale (fp16)"),
        flag("--initial-loss-scale", dest="precision.initial_loss_scale", type=float,
             help="dynamic loss scale start (default 65536)"),
        flag("--loss-scale-window", dest="precision.loss_scale_window", type=int, help="default 1000"),
        flag("--hysteresis", dest="precision.hysteresis", type=int, help="default 2"),
        flag("--min-loss-scale", dest="precision.min_loss_scale", type=float, help="default 1"),
        flag("--max-consecutive-skipped-steps", dest="precision.max_consecutive_skipped_steps", type=int,
             help="stop after this many non-finite-gradient steps in a row (default 50)"),
        flag("--distributed-backend", dest="parallel.distributed_backend", choices=["nccl", "gloo"],
             help="default: nccl when CUDA is available, else gloo"),
        flag("--distributed-timeout-minutes", dest="parallel.distributed_timeout_minutes", type=float,
             help="a collective or pipeline transfer waiting longer than this ends the job with one message "
                  "naming it and the ranks that did not arrive, exit code 3 (default 10; fractions allowed, "
                  "e.g. 0.25)"),
        flag("--offload-optimizer", dest="zero.offload_optimizer", choices=["none", "cpu", "nvme"],
             help="keep fp32 master weights and Adam state in host memory (cpu) or in "
             "files under --offload-nvme-path (nvme), stepped by the CPU Adam; needs --zero-stage >= 1"),
        flag("--offload-nvme-path", dest="zero.offload_nvme_path",
             help="folder for --offload-optimizer nvme state files (removed at the end of the run)"),
        flag("--offload-param", dest="zero.offload_param", choices=["none", "cpu"],
             help="keep ZeRO-3 parameter shards in host memory, copied to the device per unit"),
        flag("--offload-sub-group-size", dest="zero.offload_sub_group_size", type=int,
             help="elements per NVMe offload read/step/write round (host RAM holds two; default 1e8)"),
    ]),
    ('checkpoints', [
        flag("--save", dest="checkpoint.save", help="folder to save checkpoints into (iter_N + latest)"),
        flag("--load", dest="checkpoint.load",
             help="resume from this folder's latest checkpoint (or one iter_N folder); an empty or missing "
                  "folder starts from scratch"),
        flag("--save-interval", dest="checkpoint.save_interval", type=int,
             help="iterations between checkpoints (the end of the run and SIGTERM always save)"),
        flag("--keep-last", dest="checkpoint.keep_last", type=int,
             help="keep only the newest N checkpoints (older ones removed after a new one is committed)"),
        flag("--exit-interval", dest="checkpoint.exit_interval", type=int,
             help="save and exit when the iteration is a multiple of N"),
        flag("--exit-duration-in-mins", dest="checkpoint.exit_duration_in_mins", type=float,
             help="save and exit once the run has lasted this many minutes"),
        flag("--no-load-optim", dest="checkpoint.no_load_optim", action="store_true",
             help="load weights and counters but not the optimizer state"),
        flag("--no-load-rng", dest="checkpoint.no_load_rng", action="store_true",
             help="do not restore the RNG streams"),
        flag("--finetune", dest="checkpoint.finetune", action="store_true",
             help="load weights only; iteration, data position and optimizer start fresh"),
    ]),
    ('model', [
        flag("--model-size", dest="model.model_size",
             help="a preset shape (gpt2 ... gpt2-xl, llama-tiny, llama3.2-1b ... llama3.1-405b; docs/models.md "
                  "lists them) that the other model flags override"),
        flag("--num-layers", dest="model.num_layers", type=int, help="default 4"),
        flag("--hidden-size", dest="model.hidden_size", type=int, help="default 256"),
        flag("--num-attention-heads", dest="model.num_attention_heads", type=int, help="default 4"),
        flag("--ffn-hidden-size", dest="model.ffn_hidden_size", type=int, help="default 4 x hidden"),
        flag("--seq-length", dest="model.seq_length", type=int, help="default 128"),
        flag("--max-position-embeddings", dest="model.max_position_embeddings", type=int,
             help="default: seq length"),
        flag("--make-vocab-size-divisible-by", dest="model.make_vocab_size_divisible_by", type=int,
             help="pad the vocab to a multiple of this x tp (default 128)"),
        flag("--hidden-dropout", dest="model.hidden_dropout", type=float, help="default 0.1"),
        flag("--attention-dropout", dest="model.attention_dropout", type=float, help="default 0.1"),
        flag("--init-method-std", dest="model.init_method_std", type=float, help="default 0.02"),
        flag("--norm-epsilon", "--layernorm-epsilon", dest="model.layernorm_epsilon", type=float,
             help="LayerNorm / RMSNorm epsilon (default 1e-5)"),
        flag("--no-fused-kernels", dest="model.fused_kernels", action="store_false",
             help="use the pure-PyTorch reference ops instead of the fused CUDA kernels"),
    ]),
    ('model parts (Llama family; defaults: GPT-2)', [
        flag("--normalization", dest="model.normalization", choices=["LayerNorm", "RMSNorm"],
             help="default LayerNorm"),
        flag("--position-embedding-type", dest="model.position_embedding_type",
             choices=["learned_absolute", "rope", "none"], help="default learned_absolute"),
        flag("--rotary-base", dest="model.rotary_base", type=float, help="rope theta (default 10000)"),
        flag("--rotary-percent", dest="model.rotary_percent", type=float,
             help="fraction of each head's dims that rope rotates (default 1.0)"),
        flag("--use-rope-scaling", dest="model.use_rope_scaling", action="store_true",
             help="Llama 3.1 rope frequency scaling"),
        flag("--rope-scaling-factor", dest="model.rope_scaling_factor", type=float,
             help="its factor (default 8; giving it implies --use-rope-scaling)"),
        flag("--rope-low-freq-factor", dest="model.rope_low_freq_factor", type=float,
             help="rope scaling: wavelengths above original / this are divided by the factor (default 1)"),
        flag("--rope-high-freq-factor", dest="model.rope_high_freq_factor", type=float,
             help="rope scaling: wavelengths below original / this are kept (default 4)"),
        flag("--rope-original-max-positions", dest="model.rope_original_max_positions", type=int,
             help="rope scaling: the context the frequencies were trained for (default 8192)"),
        flag("--swiglu", dest="model.swiglu", action="store_true",
             help="SwiGLU MLP (default ffn: 2/3 of 4 x hidden, a multiple of 64)"),
        flag("--group-query-attention", dest="model.group_query_attention", action="store_true",
             help="grouped-query attention with --num-query-groups key/value heads"),
        flag("--num-query-groups", dest="model.num_query_groups", type=int, help="default 1 (with GQA)"),
        flag("--kv-channels", dest="model.kv_channels", type=int, help="head dim (default hidden / heads)"),
        flag("--untie-embeddings-and-output-weights", dest="model.untie_embeddings_and_output_weights",
             action="store_true", help="an output layer of its own instead of the word embedding"),
        flag("--disable-bias-linear", dest="model.add_bias_linear", action="store_false",
             help="no biases in the linear layers"),
        flag("--add-qkv-bias", dest="model.add_qkv_bias", action="store_true",
             help="a QKV bias even with --disable-bias-linear (Qwen2)"),
        flag("--qk-layernorm", dest="model.qk_layernorm", action="store_true",
             help="normalise queries and keys per head"),
        flag("--attention-backend", dest="model.attention_backend",
             choices=["auto", "sdpa", "fused", "unfused", "flash", "local"],
             help="auto (default): sdpa; fused: megatron_kernels' softmax (CUDA); unfused: the plain reference "
                  "(Megatron's flash and local mean sdpa and unfused)"),
    ]),
    ('training', [
        flag("--micro-batch-size", dest="training.micro_batch_size", type=int, help="default 8"),
        flag("--global-batch-size", dest="training.global_batch_size", type=int,
             help="default: micro batch x data-parallel size x pipeline size (one microbatch per stage)"),
        flag("--gradient-accumulation-steps", dest="training.gradient_accumulation_steps", type=int,
             help="microbatches per step (default: global / (micro x dp))"),
        flag("--train-iters", dest="training.train_iters", type=int, help="default 300"),
        flag("--seed", dest="training.seed", type=int, help="default 1234"),
        flag("--log-interval", dest="training.log_interval", type=int, help="default 10"),
        flag("--eval-interval", dest="training.eval_interval", type=int, help="default 100"),
        flag("--eval-iters", dest="training.eval_iters", type=int, help="default 10"),
        flag("--deterministic", dest="training.deterministic", action="store_true",
             help="torch.use_deterministic_algorithms(True)"),
    ]),
    ('optimizer', [
        flag("--lr", dest="optimizer.lr", type=float, help="peak learning rate (default 6e-4)"),
        flag("--min-lr", dest="optimizer.min_lr", type=float, help="default 6e-5"),
        flag("--weight-decay", dest="optimizer.weight_decay", type=float, help="default 0.1"),
        flag("--adam-beta1", dest="optimizer.adam_beta1", type=float, help="default 0.9"),
        flag("--adam-beta2", dest="optimizer.adam_beta2", type=float, help="default 0.95"),
        flag("--adam-eps", dest="optimizer.adam_eps", type=float, help="default 1e-8"),
        flag("--sgd-momentum", dest="optimizer.sgd_momentum", type=float,
             help="momentum factor of --optimizer sgd (default 0.9)"),
        flag("--clip-grad", dest="optimizer.clip_grad", type=float, help="global grad-norm clip (default 1.0; 0 = off)"),
        flag("--optimizer", dest="optimizer.optimizer_type", choices=["adam", "adamw", "sgd"],
             type=str.lower, help="adam, adamw: AdamW (decoupled weight decay), as in Megatron; sgd: SGD with "
                                  "--sgd-momentum, weight decay added to the gradient as in torch.optim.SGD "
                                  "(default adam)"),
        flag("--lr-warmup-iters", dest="optimizer.lr_warmup_iters", type=int, help="default 20"),
        flag("--lr-warmup-init", dest="optimizer.lr_warmup_init", type=float, help="default 0"),
        flag("--lr-decay-iters", dest="optimizer.lr_decay_iters", type=int, help="default: train iters"),
        flag("--lr-decay-style", dest="optimizer.lr_decay_style", choices=["cosine", "linear", "constant"],
             help="default cosine"),
    ]),
    ('data', [
        flag("--data-path", dest="data.data_path",
             help="prefix of a .bin/.idx dataset from tools/preprocess_data.py (default: stdlib corpus)"),
        flag("--tokenizer-model", dest="data.tokenizer_model",
             help="the tokenizer --data-path was made with: a sentencepiece .model, or for HuggingFaceTokenizer "
                  "a tokenizer.json or its folder"),
        flag("--tokenizer-type", dest="data.tokenizer_type", choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"],
             help="default SentencePieceTokenizer"),
        flag("--split", dest="data.split", help="train,valid,test weights (default 969,30,1)"),
        flag("--vocab-size", dest="data.default_vocab_size", type=int,
             help="tokenizer vocab for the default corpus (default 4096)"),
        flag("--data-cache-dir", dest="data.cache_dir",
             help="where the default corpus is cached (default $MEGAZERO_CACHE or ~/.cache/megazero)"),
        flag("--num-workers", dest="data.num_workers", type=int, help="data-loader workers (default 0)"),
    ]),
    ('logging', [
        flag("--output-dir", dest="logging.output_dir", help="run directory (default output/run-<time>)"),
        flag("--tensorboard-dir", dest="logging.tensorboard_dir", help="default <output-dir>/tensorboard"),
        flag("--no-tensorboard", dest="logging.no_tensorboard", action="store_true"),
        flag("--wall-clock-breakdown", dest="logging.wall_clock_breakdown", action="store_true",
             help="time forward-backward, gradient sync and optimizer per step (console + TensorBoard)"),
        flag("--no-csv", dest="logging.no_csv", action="store_true",
             help="do not write training_metrics.csv / validation_metrics.csv"),
        flag("--log-memory", dest="logging.log_memory", action="store_true",
             help="per-rank bytes in parameters, gradients and optimizer state, and saved for backward "
                  "(activations: per layer, per microbatch, the step's peak)"),
        flag("--log-comm", dest="logging.log_comm", action="store_true",
             help="per-rank bytes moved by each collective per step"),
        flag("--timeline-out", dest="logging.timeline_out",
             help="record the last training step's per-rank pipeline timeline to this JSON file "
                  "(draw it with tools/plot_schedule.py --timeline FILE)"),
        flag("--deepspeed-config", "--deepspeed_config", dest="_ds.config",
             help="a DeepSpeed ds_config.json (batch sizes, fp16/bf16, optimizer, scheduler, zero_optimization, ...)"),
    ]),
]


def spelled(section: str, field: str, value: Any, fmt=str) -> str:
    """How the user would set `section.field` to `value` on the command line, e.g. `--micro-batch-size 4`
    or `--bf16` (`fmt` shows the value)."""
    flags = [f for _, group in FLAG_GROUPS for f in group if f.dest == f"{section}.{field}"]
    for f in flags:
        if f.is_switch and f.const == value:
            return f.names[0]
    for f in flags:
        if not f.is_switch:
            names = [n for n in f.names if n.lstrip("-").replace("-", "_") == field]
            return f"{(names or f.names)[0]} {fmt(value)}"
    return f"--{field.replace('_', '-')} {fmt(value)}"
