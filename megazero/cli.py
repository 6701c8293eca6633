"""Megatron-LM-style command-line flags -> RunConfig.

Every flag names its config field as `dest="section.field"`; unset flags are absent from the parsed
namespace (argparse.SUPPRESS), so the dataclass defaults in config.py are the only defaults.
Settings whose features are not built (e.g. DeepSpeed keys through --deepspeed-config) are refused
with a clear message at validation, never silently ignored.

Every flag is checked as the user spelled it, while parsing (`_Checked` actions): a number outside
the range its config field declares (config.num) or a non-finite float is refused, and so is a
second setting of the same field, under another name, that disagrees with the first: an alias (`--tp 2
--tensor-model-parallel-size 1`) or mutually exclusive switches (`--bf16 --fp16`). The same flag
given again overrides, as in argparse (`$COMMON_ARGS --lr 1e-4`).
Usage errors are one `error: ...` line (rank 0), like every other bad input.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import defaultdict

from megazero.config import RunConfig, field_requirement, show_value
from megazero.errors import ConfigError, exit_with_error

_GIVEN = "_megazero_given"  # namespace attribute: dest -> (option string as typed, value)


def _config_fields() -> dict[str, dataclasses.Field]:
    """"section.field" -> the dataclass field a flag's dest names."""
    return {f"{s.name}.{f.name}": f for s in dataclasses.fields(RunConfig)
            for f in dataclasses.fields(s.default_factory)}


_FIELDS = _config_fields()


def _shown(option: str, action: argparse.Action, value) -> str:
    return option if action.nargs == 0 else f"{option} {show_value(value)}"


class _Checked:
    """Mixin for argparse's store actions: the value in its field's declared range, and no second
    setting of the same dest that disagrees with the first (aliases, --bf16 vs --fp16, repeats)."""

    def __call__(self, parser, namespace, values, option_string=None):
        value = self.const if self.nargs == 0 else values
        field = _FIELDS.get(self.dest)
        problem = field_requirement(field, value) if field is not None else None
        if problem:
            raise ConfigError(f"{option_string} {problem}, got {show_value(value)}")
        given = namespace.__dict__.setdefault(_GIVEN, {})
        if self.dest in given:
            first_option, first_action, first = given[self.dest]
            # The same flag again overrides (argparse's rule, and the `$COMMON_ARGS --lr 1e-4` idiom); a
            # different spelling of the same setting (an alias, the other of two switches) contradicts.
            if first != value and first_option != option_string:
                a, b = _shown(first_option, first_action, first), _shown(option_string, self, value)
                what = self.dest.split(".")[-1].replace("_", " ")
                raise ConfigError(f"{a} and {b} contradict each other (both set the {what}); give only one of them")
        given[self.dest] = (option_string, self, value)
        super().__call__(parser, namespace, values, option_string)


class _Store(_Checked, argparse._StoreAction):
    pass


class _StoreConst(_Checked, argparse._StoreConstAction):
    pass


class _StoreTrue(_Checked, argparse._StoreTrueAction):
    pass


class _StoreFalse(_Checked, argparse._StoreFalseAction):
    pass


class _OneRankParser(argparse.ArgumentParser):
    """argparse whose usage errors are one `error: ...` line printed by rank 0 only (every rank still
    exits 2), with flags checked as they are parsed (_Checked)."""

    def __init__(self, *args, rank: int = 0, **kwargs):
        super().__init__(*args, **kwargs)
        self._rank = rank
        for name, cls in ((None, _Store), ("store", _Store), ("store_const", _StoreConst),
                          ("store_true", _StoreTrue), ("store_false", _StoreFalse)):
            self.register("action", name, cls)

    def error(self, message: str):
        exit_with_error(f"error: {message} (see --help)", self._rank)


class OneLineParser(argparse.ArgumentParser):
    """For tools/: usage errors as the project's one-line `error: ...` and exit code 2."""

    def error(self, message: str):
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def run_tool(run, parser: argparse.ArgumentParser, argv=None) -> int:
    """A tool's main(): parse, run(args), and turn ConfigError / OSError into one `error: ...` line and
    exit code 2 (the project's bad-input contract)."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except (ConfigError, OSError) as e:
        sys.stderr.write(f"error: {' '.join(str(e).split())}\n")
        return 2
    return 0


def build_parser(rank: int = 0) -> argparse.ArgumentParser:
    p = _OneRankParser(
        prog="pretrain_gpt.py", rank=rank, argument_default=argparse.SUPPRESS,
        description=("Pretrain a GPT with tensor, pipeline (1F1B / interleaved) and data parallelism, "
                     "ZeRO stages 0-3 with CPU/NVMe offload, bf16/fp16 mixed precision and checkpoints "
                     "that load into any layout. Flags use Megatron-LM's names; --deepspeed-config takes a "
                     "DeepSpeed ds_config.json."),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)

    g = p.add_argument_group("parallelism")
    g.add_argument("--tensor-model-parallel-size", "--tp", dest="parallel.tensor_model_parallel_size", type=int,
                   help="tensor-parallel size (default 1)")
    g.add_argument("--pipeline-model-parallel-size", "--pp", dest="parallel.pipeline_model_parallel_size",
                   type=int, help="pipeline-parallel size (default 1)")
    g.add_argument("--virtual-pipeline-model-parallel-size", "--vp", dest="parallel.virtual_pipeline_model_parallel_size",
                   type=int, help="model chunks per pipeline stage: interleaved 1F1B when > 1 (default 1)")
    g.add_argument("--num-layers-per-virtual-pipeline-stage", dest="parallel.num_layers_per_virtual_pipeline_stage",
                   type=int, help="Megatron's way to ask for interleaving: layers per model chunk")
    g.add_argument("--decoder-first-pipeline-num-layers", dest="parallel.decoder_first_pipeline_num_layers",
                   type=int, help="layers on the first (virtual) pipeline stage (default: even split)")
    g.add_argument("--decoder-last-pipeline-num-layers", dest="parallel.decoder_last_pipeline_num_layers",
                   type=int, help="layers on the last (virtual) pipeline stage (default: even split)")
    g = p.add_argument_group("ZeRO and mixed precision")
    g.add_argument("--zero-stage", dest="zero.stage", type=int, choices=[0, 1, 2, 3],
                   help="0: all-reduce grads; 1: shard optimizer state; 2: + gradients; 3: + parameters (default 0)")
    g.add_argument("--ddp-bucket-size", "--reduce-bucket-size", dest="zero.reduce_bucket_size", type=int,
                   help="gradient bucket size in elements (default 6.25M)")
    g.add_argument("--grad-reduce-dtype", dest="zero.grad_reduce_dtype", choices=["fp32", "model"],
                   help="accumulate and reduce gradients in fp32 (default) or in the model dtype (bf16/fp16)")
    g.add_argument("--no-overlap-comm", dest="zero.overlap_comm", action="store_false",
                   help="reduce gradients after backward instead of during it")
    g.add_argument("--bf16", dest="precision.params_dtype", action="store_const", const="bf16",
                   help="bf16 parameters and activations, fp32 master weights")
    g.add_argument("--fp16", dest="precision.params_dtype", action="store_const", const="fp16",
                   help="fp16 parameters and activations, fp32 master weights, loss scaling")
    g.add_argument("--loss-scale", dest="precision.loss_scale", type=float, help="static loss scale (fp16)")
    g.add_argument("--initial-loss-scale", dest="precision.initial_loss_scale", type=float,
                   help="dynamic loss scale start (default 65536)")
    g.add_argument("--loss-scale-window", dest="precision.loss_scale_window", type=int, help="default 1000")
    g.add_argument("--hysteresis", dest="precision.hysteresis", type=int, help="default 2")
    g.add_argument("--min-loss-scale", dest="precision.min_loss_scale", type=float, help="default 1")
    g.add_argument("--max-consecutive-skipped-steps", dest="precision.max_consecutive_skipped_steps", type=int,
                   help="stop after this many non-finite-gradient steps in a row (default 50)")
    g.add_argument("--distributed-backend", dest="parallel.distributed_backend", choices=["nccl", "gloo"],
                   help="default: nccl when CUDA is available, else gloo")
    g.add_argument("--distributed-timeout-minutes", dest="parallel.distributed_timeout_minutes", type=float,
                   help="a collective or pipeline transfer waiting longer than this ends the job with one message "
                        "naming it and the ranks that did not arrive, exit code 3 (default 10; fractions allowed, "
                        "e.g. 0.25)")

    g.add_argument("--offload-optimizer", dest="zero.offload_optimizer", choices=["none", "cpu", "nvme"],
                   help="keep fp32 master weights and Adam state in host memory (cpu) or in "
                   "files under --offload-nvme-path (nvme), stepped by the CPU Adam; needs --zero-stage >= 1")
    g.add_argument("--offload-nvme-path", dest="zero.offload_nvme_path",
                   help="folder for --offload-optimizer nvme state files (removed at the end of the run)")
    g.add_argument("--offload-param", dest="zero.offload_param", choices=["none", "cpu"],
                   help="keep ZeRO-3 parameter shards in host memory, copied to the device per unit")
    g.add_argument("--offload-sub-group-size", dest="zero.offload_sub_group_size", type=int,
                   help="elements per NVMe offload read/step/write round (host RAM holds two; default 1e8)")
    g = p.add_argument_group("checkpoints")
    g.add_argument("--save", dest="checkpoint.save", help="folder to save checkpoints into (iter_N + latest)")
    g.add_argument("--load", dest="checkpoint.load",
                   help="resume from this folder's latest checkpoint (or one iter_N folder); an empty or missing "
                        "folder starts from scratch")
    g.add_argument("--save-interval", dest="checkpoint.save_interval", type=int,
                   help="iterations between checkpoints (the end of the run and SIGTERM always save)")
    g.add_argument("--keep-last", dest="checkpoint.keep_last", type=int,
                   help="keep only the newest N checkpoints (older ones removed after a new one is committed)")
    g.add_argument("--exit-interval", dest="checkpoint.exit_interval", type=int,
                   help="save and exit when the iteration is a multiple of N")
    g.add_argument("--exit-duration-in-mins", dest="checkpoint.exit_duration_in_mins", type=float,
                   help="save and exit once the run has lasted this many minutes")
    g.add_argument("--no-load-optim", dest="checkpoint.no_load_optim", action="store_true",
                   help="load weights and counters but not the optimizer state")
    g.add_argument("--no-load-rng", dest="checkpoint.no_load_rng", action="store_true",
                   help="do not restore the RNG streams")
    g.add_argument("--finetune", dest="checkpoint.finetune", action="store_true",
                   help="load weights only; iteration, data position and optimizer start fresh")
    g = p.add_argument_group("model")
    g.add_argument("--num-layers", dest="model.num_layers", type=int, help="default 4")
    g.add_argument("--hidden-size", dest="model.hidden_size", type=int, help="default 256")
    g.add_argument("--num-attention-heads", dest="model.num_attention_heads", type=int, help="default 4")
    g.add_argument("--ffn-hidden-size", dest="model.ffn_hidden_size", type=int, help="default 4 x hidden")
    g.add_argument("--seq-length", dest="model.seq_length", type=int, help="default 128")
    g.add_argument("--max-position-embeddings", dest="model.max_position_embeddings", type=int,
                   help="default: seq length")
    g.add_argument("--make-vocab-size-divisible-by", dest="model.make_vocab_size_divisible_by", type=int,
                   help="pad the vocab to a multiple of this x tp (default 128)")
    g.add_argument("--hidden-dropout", dest="model.hidden_dropout", type=float, help="default 0.1")
    g.add_argument("--attention-dropout", dest="model.attention_dropout", type=float, help="default 0.1")
    g.add_argument("--init-method-std", dest="model.init_method_std", type=float, help="default 0.02")
    g.add_argument("--layernorm-epsilon", dest="model.layernorm_epsilon", type=float, help="default 1e-5")
    g.add_argument("--no-fused-kernels", dest="model.fused_kernels", action="store_false",
                   help="use the pure-PyTorch reference ops instead of the fused CUDA kernels")

    g = p.add_argument_group("training")
    g.add_argument("--micro-batch-size", dest="training.micro_batch_size", type=int, help="default 8")
    g.add_argument("--global-batch-size", dest="training.global_batch_size", type=int,
                   help="default: micro batch x data-parallel size x pipeline size (one microbatch per stage)")
    g.add_argument("--gradient-accumulation-steps", dest="training.gradient_accumulation_steps", type=int,
                   help="microbatches per step (default: global / (micro x dp))")
    g.add_argument("--train-iters", dest="training.train_iters", type=int, help="default 300")
    g.add_argument("--seed", dest="training.seed", type=int, help="default 1234")
    g.add_argument("--log-interval", dest="training.log_interval", type=int, help="default 10")
    g.add_argument("--eval-interval", dest="training.eval_interval", type=int, help="default 100")
    g.add_argument("--eval-iters", dest="training.eval_iters", type=int, help="default 10")
    g.add_argument("--deterministic", dest="training.deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms(True)")

    g = p.add_argument_group("optimizer (AdamW)")
    g.add_argument("--lr", dest="optimizer.lr", type=float, help="peak learning rate (default 6e-4)")
    g.add_argument("--min-lr", dest="optimizer.min_lr", type=float, help="default 6e-5")
    g.add_argument("--weight-decay", dest="optimizer.weight_decay", type=float, help="default 0.1")
    g.add_argument("--adam-beta1", dest="optimizer.adam_beta1", type=float, help="default 0.9")
    g.add_argument("--adam-beta2", dest="optimizer.adam_beta2", type=float, help="default 0.95")
    g.add_argument("--adam-eps", dest="optimizer.adam_eps", type=float, help="default 1e-8")
    g.add_argument("--clip-grad", dest="optimizer.clip_grad", type=float, help="global grad-norm clip (default 1.0; 0 = off)")
    g.add_argument("--optimizer", dest="optimizer.optimizer_type", choices=["adam", "adamw"],
                   type=str.lower, help="both mean AdamW (decoupled weight decay), as in Megatron")
    g.add_argument("--lr-warmup-iters", dest="optimizer.lr_warmup_iters", type=int, help="default 20")
    g.add_argument("--lr-warmup-init", dest="optimizer.lr_warmup_init", type=float, help="default 0")
    g.add_argument("--lr-decay-iters", dest="optimizer.lr_decay_iters", type=int, help="default: train iters")
    g.add_argument("--lr-decay-style", dest="optimizer.lr_decay_style", choices=["cosine", "linear", "constant"],
                   help="default cosine")

    g = p.add_argument_group("data")
    g.add_argument("--data-path", dest="data.data_path",
                   help="prefix of a .bin/.idx dataset from tools/preprocess_data.py (default: stdlib corpus)")
    g.add_argument("--tokenizer-model", dest="data.tokenizer_model", help="sentencepiece model of --data-path")
    g.add_argument("--split", dest="data.split", help="train,valid,test weights (default 969,30,1)")
    g.add_argument("--vocab-size", dest="data.default_vocab_size", type=int,
                   help="tokenizer vocab for the default corpus (default 4096)")
    g.add_argument("--data-cache-dir", dest="data.cache_dir",
                   help="where the default corpus is cached (default $MEGAZERO_CACHE or ~/.cache/megazero)")
    g.add_argument("--num-workers", dest="data.num_workers", type=int, help="data-loader workers (default 0)")

    g = p.add_argument_group("logging")
    g.add_argument("--output-dir", dest="logging.output_dir", help="run directory (default output/run-<time>)")
    g.add_argument("--tensorboard-dir", dest="logging.tensorboard_dir", help="default <output-dir>/tensorboard")
    g.add_argument("--no-tensorboard", dest="logging.no_tensorboard", action="store_true")
    g.add_argument("--wall-clock-breakdown", dest="logging.wall_clock_breakdown", action="store_true",
                   help="time forward-backward, gradient sync and optimizer per step (console + TensorBoard)")
    g.add_argument("--no-csv", dest="logging.no_csv", action="store_true",
                   help="do not write training_metrics.csv / validation_metrics.csv")
    g.add_argument("--log-memory", dest="logging.log_memory", action="store_true",
                   help="per-rank bytes in parameters, gradients and optimizer state")
    g.add_argument("--log-comm", dest="logging.log_comm", action="store_true",
                   help="per-rank bytes moved by each collective per step")
    g.add_argument("--timeline-out", dest="logging.timeline_out",
                   help="record the last training step's per-rank pipeline timeline to this JSON file "
                        "(draw it with tools/plot_schedule.py --timeline FILE)")

    g.add_argument("--deepspeed-config", "--deepspeed_config", dest="_ds.config",
                   help="a DeepSpeed ds_config.json (batch sizes, fp16/bf16, optimizer, scheduler, zero_optimization, ...)")
    for action in p._actions:  # readable --help: "--num-layers NUM_LAYERS", not "MODEL.NUM_LAYERS"
        if action.option_strings and action.nargs is None and action.metavar is None and action.choices is None:
            action.metavar = action.dest.split(".")[-1].upper()
    return p




_LOSS_SCALE_FLAGS = ("precision.loss_scale", "precision.initial_loss_scale", "precision.loss_scale_window",
                     "precision.hysteresis", "precision.min_loss_scale")


def _check_loss_scale_flags(given: dict, cfg: RunConfig) -> None:
    """Loss-scale flags are fp16 settings, and a static --loss-scale excludes the dynamic ones."""
    used = [d for d in _LOSS_SCALE_FLAGS if d in given]
    if not used:
        return
    shown = _shown(*given[used[0]])
    if "precision.loss_scale" in given and len(used) > 1:
        dynamic = _shown(*given[used[1]])
        raise ConfigError(f"{_shown(*given['precision.loss_scale'])} (a static loss scale) and {dynamic} (dynamic "
                          f"loss scaling) contradict each other; give --loss-scale alone, or only the dynamic flags")
    if cfg.precision.params_dtype != "fp16":
        raise ConfigError(f"{shown} applies only to --fp16 training, and this run is {cfg.precision.params_dtype} "
                          f"(no loss scaling); add --fp16 or drop {given[used[0]][0]}")


def parse_args(argv: list[str] | None = None, rank: int = 0) -> RunConfig:
    ns = vars(build_parser(rank).parse_args(argv))
    given = ns.pop(_GIVEN, {})  # dest -> (option as typed, action, value)
    ds_config = ns.pop("_ds.config", None)
    sections: dict[str, dict] = defaultdict(dict)
    for dest, value in ns.items():
        section, name = dest.split(".", 1)
        sections[section][name] = value
    if "optimizer_type" in sections["optimizer"]:
        sections["optimizer"]["optimizer_type"] = "adamw"  # Megatron's --optimizer adam is AdamW
    if ds_config is not None:
        from megazero.ds_config import apply_ds_config

        cfg = apply_ds_config(ds_config, cli_sections=dict(sections))
    else:
        cfg = RunConfig().replace(**sections)
    _check_loss_scale_flags(given, cfg)
    cfg.check_fields()
    return cfg
