"""ds_config.json -> RunConfig: schema, mapping, "auto", flag/file precedence and one-line errors.

Pure and fast: no processes. The fixtures in tests/unit/ds_configs/ follow the keys and structure of
DeepSpeed's documented ZeRO-2 / ZeRO-3 (ZeRO-Infinity) examples and of the common "auto" style.
"""

import json
import re
from pathlib import Path

import pytest

from megazero.cli import parse_args
from megazero.config import RunConfig
from megazero.ds_config import SCHEDULER_PARAMS, SCHEMA, apply_ds_config
from megazero.errors import ConfigError
from megazero.validation import validate

FIXTURES = Path(__file__).parent / "ds_configs"
DOC = Path(__file__).resolve().parents[2] / "docs" / "ds_config.md"


def write(tmp_path, obj, name="ds_config.json") -> Path:
    path = tmp_path / name
    path.write_text(json.dumps(obj) if not isinstance(obj, str) else obj)
    return path


def load(tmp_path, obj, cli=None, **kw) -> RunConfig:
    return apply_ds_config(write(tmp_path, obj), cli_sections=cli, **kw)


def error(tmp_path, obj, cli=None) -> str:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, obj, cli)
    msg = str(e.value)
    assert "\n" not in msg, msg
    return msg


# ----- the documented examples -------------------------------------------------------------------
def test_zero2_example_loads_and_validates():
    cfg = apply_ds_config(FIXTURES / "zero2.json")
    assert cfg.zero.stage == 2 and cfg.zero.overlap_comm is True
    assert cfg.zero.reduce_bucket_size == 500_000_000  # 5e8 -> int
    assert isinstance(cfg.zero.reduce_bucket_size, int)
    assert cfg.precision.params_dtype == "fp16" and cfg.precision.loss_scale is None  # loss_scale 0: dynamic
    assert cfg.precision.initial_loss_scale == 2.0**12 and cfg.precision.loss_scale_window == 500
    assert cfg.optimizer.optimizer_type == "adamw" and cfg.optimizer.lr == 3e-4
    assert (cfg.optimizer.adam_beta1, cfg.optimizer.adam_beta2, cfg.optimizer.weight_decay) == (0.9, 0.95, 0.01)
    assert cfg.optimizer.clip_grad == 0.5 and cfg.training.log_interval == 5
    assert cfg.optimizer.lr_decay_style == "constant" and cfg.optimizer.lr_warmup_iters == 100
    assert cfg.optimizer.lr_warmup_style == "log"  # DeepSpeed's default warmup_type
    validate(cfg, 2)
    assert cfg.batch_sizes(2) == (8, 2, 32)


def test_zero3_example_loads_and_validates():
    cfg = apply_ds_config(FIXTURES / "zero3.json")
    assert cfg.zero.stage == 3 and cfg.zero.reduce_bucket_size == 10**7
    assert cfg.zero.offload_optimizer == cfg.zero.offload_param == "none"
    assert cfg.precision.params_dtype == "bf16"
    assert cfg.optimizer.adam_beta2 == 0.999 and cfg.optimizer.lr_decay_style == "cosine"
    assert cfg.optimizer.min_lr == pytest.approx(0.05 * 2e-4)
    assert cfg.optimizer.lr_warmup_init == pytest.approx(0.1 * 2e-4)
    validate(cfg, 2)
    assert cfg.batch_sizes(2) == (4, 4, 32)


def test_zero3_offload_example_maps_offload_and_validates():
    cfg = apply_ds_config(FIXTURES / "zero3_offload.json")
    assert cfg.zero.offload_optimizer == "cpu" and cfg.zero.offload_param == "cpu"
    validate(cfg, 2)


def test_nvme_offload_path_and_sub_group_size_map(tmp_path):
    nvme = tmp_path / "nvme"
    nvme.mkdir()
    cfg = load(tmp_path, {"zero_optimization": {"stage": 2, "sub_group_size": 10**8, "offload_optimizer": {
        "device": "nvme", "nvme_path": str(nvme), "pin_memory": True, "buffer_count": 4, "fast_init": False}},
        "aio": {"block_size": 1048576, "queue_depth": 8, "single_submit": False, "overlap_events": True}})
    assert (cfg.zero.offload_optimizer, cfg.zero.offload_nvme_path) == ("nvme", str(nvme))
    assert cfg.zero.offload_sub_group_size == 10**8
    validate(cfg, 2)  # nvme at stage 2 is nvme (DeepSpeed would silently use cpu)
    missing = load(tmp_path, {"zero_optimization": {"stage": 3, "offload_optimizer": {
        "device": "nvme", "nvme_path": "/no/such/nvme"}}})
    with pytest.raises(ConfigError, match="--offload-nvme-path /no/such/nvme: not an existing folder"):
        validate(missing, 2)
    param_nvme = load(tmp_path, {"zero_optimization": {"stage": 3, "offload_param": {"device": "nvme"}}})
    with pytest.raises(ConfigError, match="--offload-param must be none or cpu"):
        validate(param_nvme, 2)
    assert "needs \"device\"" in error(tmp_path, {"zero_optimization": {"offload_param": {"pin_memory": True}}})


def test_auto_example_takes_defaults_or_flags():
    path = FIXTURES / "auto.json"
    cfg = apply_ds_config(path)
    default = RunConfig()
    assert cfg.training == default.training and cfg.precision.params_dtype == "fp32"
    assert (cfg.optimizer.lr, cfg.optimizer.weight_decay, cfg.optimizer.lr_warmup_iters) == \
        (default.optimizer.lr, default.optimizer.weight_decay, default.optimizer.lr_warmup_iters)
    assert cfg.optimizer.lr_decay_style == "linear"
    cfg = parse_args(["--deepspeed-config", str(path), "--micro-batch-size", "4", "--bf16", "--lr", "1e-4",
                      "--lr-warmup-iters", "7", "--clip-grad", "0.3"])
    assert cfg.training.micro_batch_size == 4 and cfg.precision.params_dtype == "bf16"
    assert (cfg.optimizer.lr, cfg.optimizer.lr_warmup_iters, cfg.optimizer.clip_grad) == (1e-4, 7, 0.3)


# ----- batch sizes ---------------------------------------------------------------------------------
@pytest.mark.parametrize("gbs,micro,accum", [(32, 16, 1), (32, 8, 2)])
def test_batch_sizes_accepted_on_two_ranks(tmp_path, gbs, micro, accum):
    cfg = load(tmp_path, {"train_batch_size": gbs, "train_micro_batch_size_per_gpu": micro,
                          "gradient_accumulation_steps": accum})
    validate(cfg, 2)
    assert cfg.batch_sizes(2) == (micro, accum, gbs)


@pytest.mark.parametrize("gbs,micro,accum", [(33, 17, 2), (32, 18, 1)])
def test_batch_sizes_rejected_with_the_numbers(tmp_path, gbs, micro, accum):
    cfg = load(tmp_path, {"train_batch_size": gbs, "train_micro_batch_size_per_gpu": micro,
                          "gradient_accumulation_steps": accum})
    with pytest.raises(ConfigError) as e:
        validate(cfg, 2)
    msg = str(e.value)
    assert all(str(n) in msg for n in (gbs, micro, accum, micro * accum * 2)), msg


def test_any_two_batch_keys_imply_the_third(tmp_path):
    cfg = load(tmp_path, {"train_batch_size": 32, "gradient_accumulation_steps": 2})
    assert cfg.training.micro_batch_size is None and cfg.batch_sizes(2) == (8, 2, 32)
    cfg = load(tmp_path, {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 4})
    assert cfg.batch_sizes(2) == (4, 4, 32)
    cfg = load(tmp_path, {"train_batch_size": 32})  # DeepSpeed: accumulation 1, micro = 32 / dp
    assert cfg.batch_sizes(2) == (16, 1, 32)
    cfg = load(tmp_path, {"train_batch_size": 32}, {"training": {"micro_batch_size": 4}})
    assert cfg.batch_sizes(2) == (4, 4, 32)
    cfg = load(tmp_path, {"train_batch_size": 30, "gradient_accumulation_steps": 2})
    with pytest.raises(ConfigError, match="global batch size 30 is not divisible by gradient accumulation steps 2"):
        validate(cfg, 2)
    assert "train_batch_size 0 must be >= 1" in error(tmp_path, {"train_batch_size": 0})


# ----- unknown keys and types ----------------------------------------------------------------------
@pytest.mark.parametrize("obj,where,suggestion", [
    ({"train_batch_sise": 8}, "train_batch_sise", "train_batch_size"),
    ({"zero_optimization": {"reduce_bucket_sise": 5}}, "zero_optimization.reduce_bucket_sise", "reduce_bucket_size"),
    ({"zero_optimization": {"offload_param": {"device": "cpu", "pin_memmory": True}}},
     "zero_optimization.offload_param.pin_memmory", "pin_memory"),
    ({"fp16": {"enabled": True, "initial_scale_pow": 8}}, "fp16.initial_scale_pow", "initial_scale_power"),
    ({"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_step": 9}}}, "scheduler.params.total_num_step",
     "total_num_steps"),
])
def test_unknown_key_names_path_and_nearest_key(tmp_path, obj, where, suggestion):
    msg = error(tmp_path, obj)
    assert msg == f'ds_config.json: unknown key "{where}"; did you mean "{suggestion}"?'


def test_unknown_key_without_a_close_match_and_refused_keys(tmp_path):
    assert "not a DeepSpeed setting; use --seed" in error(tmp_path, {"seed": 1})
    assert "docs/ds_config.md lists the accepted keys" in error(tmp_path, {"qqqqqq": 1})
    assert 'unknown key "scheduler.params.warmup_max_lr"' in error(
        tmp_path, {"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_max_lr": 1e-3}}})
    assert '"amp" is not supported' in error(tmp_path, {"amp": {"enabled": True}})
    assert "gradient_clipping" in error(tmp_path, {"optimizer": {"type": "Adam", "params": {"max_grad_norm": 1}}})


@pytest.mark.parametrize("obj,expected", [
    ({"zero_optimization": {"stage": "two"}}, 'zero_optimization.stage must be an integer (or "auto"), got "two"'),
    ({"zero_optimization": {"stage": 2.5}}, "zero_optimization.stage must be an integer"),
    ({"fp16": {"enabled": "yes"}}, "fp16.enabled must be true or false"),
    ({"train_micro_batch_size_per_gpu": True}, "train_micro_batch_size_per_gpu must be an integer"),
    ({"optimizer": {"type": "Adam", "params": {"betas": [0.9]}}}, "optimizer.params.betas must be a list of two"),
    ({"gradient_clipping": "1.0"}, "gradient_clipping must be a number"),
    ({"fp16": True}, "fp16 must be a JSON object"),
    ({"tensorboard": {"output_path": 3}}, "tensorboard.output_path must be a string or null"),
])
def test_wrong_types_name_key_and_type(tmp_path, obj, expected):
    assert expected in error(tmp_path, obj)


def test_file_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        apply_ds_config(tmp_path / "missing.json")
    assert re.search(r"invalid JSON at line 3:\d+", error(tmp_path, '{\n  "train_batch_size": 8\n  "x": 1\n}'))
    assert "top level must be a JSON object" in error(tmp_path, "[1, 2]")
    assert 'duplicate key "train_batch_size"' in error(tmp_path, '{"train_batch_size": 8, "train_batch_size": 16}')


# ----- "auto" and flag/file precedence -------------------------------------------------------------
def test_auto_takes_the_flag_else_the_default(tmp_path):
    obj = {"train_micro_batch_size_per_gpu": "auto", "zero_optimization": {"stage": "auto"}}
    cfg = load(tmp_path, obj)
    assert cfg.training.micro_batch_size == RunConfig().training.micro_batch_size and cfg.zero.stage == 0
    cfg = load(tmp_path, obj, {"training": {"micro_batch_size": 4}, "zero": {"stage": 2}})
    assert cfg.training.micro_batch_size == 4 and cfg.zero.stage == 2


def test_flag_and_file_must_agree(tmp_path):
    msg = error(tmp_path, {"train_micro_batch_size_per_gpu": 8}, {"training": {"micro_batch_size": 4}})
    assert msg.startswith("--micro-batch-size 4 disagrees with ds_config.json train_micro_batch_size_per_gpu 8;")
    assert '"auto"' in msg
    cfg = load(tmp_path, {"train_micro_batch_size_per_gpu": 8}, {"training": {"micro_batch_size": 8}})
    assert cfg.training.micro_batch_size == 8  # agreeing is fine
    assert error(tmp_path, {"bf16": {"enabled": True}}, {"precision": {"params_dtype": "fp16"}}).startswith(
        "--fp16 disagrees with ds_config.json bf16.enabled true")
    assert error(tmp_path, {"fp16": {"enabled": False}}, {"precision": {"params_dtype": "fp16"}}).startswith(
        "--fp16 disagrees with ds_config.json fp16.enabled false")
    assert error(tmp_path, {"zero_optimization": {"reduce_bucket_size": 5e8}},
                 {"zero": {"reduce_bucket_size": 1000}}).startswith("--reduce-bucket-size 1000 disagrees")
    assert error(tmp_path, {"zero_optimization": {"overlap_comm": True}},
                 {"zero": {"overlap_comm": False}}).startswith("--no-overlap-comm disagrees")


def test_two_keys_of_the_file_that_disagree(tmp_path):
    msg = error(tmp_path, {"optimizer": {"type": "Adam", "params": {"lr": 1e-3}},
                           "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 6e-4}}})
    assert "optimizer.params.lr 0.001 and scheduler.params.warmup_max_lr 0.0006 both set optimizer.lr" in msg


def test_parse_args_with_underscore_spelling(tmp_path):
    path = write(tmp_path, {"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1}})
    for spelling in ("--deepspeed_config", "--deepspeed-config"):
        cfg = parse_args([spelling, str(path)])
        assert cfg.training.micro_batch_size == 4 and cfg.zero.stage == 1
    assert parse_args(["--deepspeed_config", str(path), "--tp", "2"]).parallel.tensor_model_parallel_size == 2
    with pytest.raises(ConfigError, match="--zero-stage 2 disagrees with ds_config.json zero_optimization.stage 1"):
        parse_args(["--deepspeed_config", str(path), "--zero-stage", "2"])


# ----- precision -----------------------------------------------------------------------------------
def test_fp16_loss_scale_mapping(tmp_path):
    cfg = load(tmp_path, {"fp16": {"enabled": True, "loss_scale": 0, "initial_scale_power": 10, "hysteresis": 3,
                                   "min_loss_scale": 2}})
    p = cfg.precision
    assert (p.params_dtype, p.loss_scale, p.initial_loss_scale, p.hysteresis, p.min_loss_scale) == \
        ("fp16", None, 1024.0, 3, 2.0)
    assert load(tmp_path, {"fp16": {"enabled": True, "loss_scale": 128}}).precision.loss_scale == 128.0
    assert load(tmp_path, {"fp16": {"enabled": True, "auto_cast": True}}).precision.params_dtype == "fp16"
    # A disabled fp16 block's settings are ignored, as in DeepSpeed.
    p = load(tmp_path, {"fp16": {"enabled": False, "loss_scale": 64, "consecutive_hysteresis": True}}).precision
    assert (p.loss_scale, p.params_dtype) == (None, "fp32")
    assert "consecutive_hysteresis true is not supported" in error(
        tmp_path, {"fp16": {"enabled": True, "consecutive_hysteresis": True}})
    assert "fp16.loss_scale must be 0" in error(tmp_path, {"fp16": {"enabled": True, "loss_scale": -1}})


def test_bf16_mapping_and_both_enabled(tmp_path):
    assert load(tmp_path, {"bf16": {"enabled": True}}).precision.params_dtype == "bf16"
    assert load(tmp_path, {"bfloat16": {"enabled": True}}).precision.params_dtype == "bf16"
    assert load(tmp_path, {"bf16": {"enabled": False}}, {"precision": {"params_dtype": "fp16"}}).precision \
        .params_dtype == "fp16"
    assert "both true" in error(tmp_path, {"fp16": {"enabled": True}, "bf16": {"enabled": True}})
    assert "always fp32" in error(tmp_path, {"bf16": {"enabled": True, "bf16_master_weights_and_grads": True}})


# ----- logging, monitors and communication keys ---------------------------------------------------
def test_monitors(tmp_path):
    lg = load(tmp_path, {"tensorboard": {"enabled": False}, "csv_monitor": {"enabled": False}}).logging
    assert lg.no_tensorboard and lg.no_csv
    lg = load(tmp_path, {"tensorboard": {"enabled": True, "output_path": "out/ds_logs", "job_name": "gpt"},
                         "csv_monitor": {"enabled": True, "output_path": "out/csv", "job_name": "gpt"},
                         "comms_logger": {"enabled": True, "verbose": False, "prof_all": True, "debug": False},
                         "wandb": {"enabled": False, "project": "x"}, "wall_clock_breakdown": True,
                         "memory_breakdown": True}).logging
    assert not lg.no_tensorboard and lg.tensorboard_dir == str(Path("out/ds_logs/gpt"))
    assert not lg.no_csv and lg.output_dir == str(Path("out/csv/gpt"))
    assert lg.log_comm and lg.wall_clock_breakdown and lg.log_memory
    # csv_monitor.output_path names the run directory only when nothing else does.
    lg = load(tmp_path, {"csv_monitor": {"enabled": True, "output_path": "out/csv"}},
              {"logging": {"output_dir": "runs/a"}}).logging
    assert lg.output_dir == "runs/a"
    assert "wandb.enabled true is not supported" in error(tmp_path, {"wandb": {"enabled": True}})
    assert error(tmp_path, {"tensorboard": {"enabled": True}}, {"logging": {"no_tensorboard": True}}).startswith(
        "--no-tensorboard disagrees with ds_config.json tensorboard.enabled true")


@pytest.mark.parametrize("obj,ok", [
    ({"prescale_gradients": False, "gradient_predivide_factor": 1.0, "communication_data_type": None,
      "zero_allow_untested_optimizer": True, "zero_force_ds_cpu_optimizer": False}, True),
    ({"communication_data_type": "fp32"}, True),
    ({"prescale_gradients": True}, False), ({"gradient_predivide_factor": 2.0}, False),
    ({"communication_data_type": "fp16"}, False),
    ({"zero_optimization": {"zero_quantized_weights": True}}, False),
    ({"zero_optimization": {"stage": 4}}, False),
    ({"zero_optimization": {"reduce_scatter": False, "allgather_partitions": False, "contiguous_gradients": False,
                            "round_robin_gradients": True, "elastic_checkpoint": True,
                            "stage3_gather_fp16_weights_on_model_save": True, "cpu_offload": False}}, True),
])
def test_accepted_and_refused_values(tmp_path, obj, ok):
    if ok:
        validate(load(tmp_path, obj), 1)
    else:
        assert "not supported" in error(tmp_path, obj) or "must be" in error(tmp_path, obj)


@pytest.mark.parametrize("comm,precision,expected", [
    (None, {}, "fp32"), ("auto", {}, "fp32"), ("fp32", {}, "fp32"), ("float32", {"bf16": {"enabled": True}}, "fp32"),
    ("FP32", {}, "fp32"), ("bf16", {"bf16": {"enabled": True}}, "model"),
    ("bfloat16", {"bfloat16": {"enabled": True}}, "model"), ("fp16", {"fp16": {"enabled": True}}, "model"),
    ("float16", {"fp16": {"enabled": True}}, "model"), ("BF16", {"bf16": {"enabled": True}}, "model"),
])
def test_communication_data_type_maps_to_grad_reduce_dtype(tmp_path, comm, precision, expected):
    cfg = load(tmp_path, {"communication_data_type": comm} | precision)
    assert cfg.zero.grad_reduce_dtype == expected
    validate(cfg, 1)


def test_communication_data_type_with_flags(tmp_path):
    # The model dtype may come from --bf16 / --fp16; null and "auto" leave --grad-reduce-dtype alone.
    path = write(tmp_path, {"communication_data_type": "bf16"})
    assert parse_args(["--deepspeed-config", str(path), "--bf16"]).zero.grad_reduce_dtype == "model"
    cfg = parse_args(["--deepspeed-config", str(path), "--bf16", "--grad-reduce-dtype", "model"])
    assert cfg.zero.grad_reduce_dtype == "model"
    for comm in (None, "auto"):
        assert load(tmp_path, {"communication_data_type": comm},
                    {"zero": {"grad_reduce_dtype": "model"}}).zero.grad_reduce_dtype == "model"
    # A flag that disagrees with the file is an error, as for every other field.
    assert error(tmp_path, {"communication_data_type": "bf16", "bf16": {"enabled": True}},
                 {"zero": {"grad_reduce_dtype": "fp32"}}).startswith(
        '--grad-reduce-dtype "fp32" disagrees with ds_config.json communication_data_type "bf16"')
    assert error(tmp_path, {"communication_data_type": "fp32"}, {"zero": {"grad_reduce_dtype": "model"}}).startswith(
        '--grad-reduce-dtype "model" disagrees with ds_config.json communication_data_type "fp32"')


@pytest.mark.parametrize("comm,precision,cli,model", [
    ("fp16", {"bf16": {"enabled": True}}, None, "bf16"), ("bf16", {"fp16": {"enabled": True}}, None, "fp16"),
    ("bf16", {}, None, "fp32"), ("fp16", {"bf16": {"enabled": False}}, None, "fp32"),
    ("bf16", {}, {"precision": {"params_dtype": "fp16"}}, "fp16"), ("int8", {"bf16": {"enabled": True}}, None, "bf16"),
])
def test_communication_data_type_other_than_fp32_or_the_model_dtype(tmp_path, comm, precision, cli, model):
    msg = error(tmp_path, {"communication_data_type": comm} | precision, cli)
    assert msg.startswith(f'ds_config.json: communication_data_type "{comm}" is not supported with model dtype '
                          f'{model}: megazero reduces gradients in fp32 or in the model dtype'), msg


def test_every_accepted_key_is_documented():
    doc = DOC.read_text()

    def paths(schema, prefix=""):
        for key, sub in schema.items():
            if prefix == "scheduler." and key == "params":
                for kind, params in SCHEDULER_PARAMS.items():
                    yield from (f"scheduler.params.{k}" for k in params)
            elif isinstance(sub, dict):
                yield from paths(sub, prefix + key + ".")
            else:
                yield prefix + key

    missing = sorted({p for p in paths(SCHEMA) if f"`{p}`" not in doc})
    assert not missing, f"docs/ds_config.md lacks {missing}"


# ----- activation_checkpointing --------------------------------------------------------------------
def test_activation_checkpointing_maps_to_full_recomputation_settings(tmp_path):
    obj = {"activation_checkpointing": {"partition_activations": True, "cpu_checkpointing": True,
                                        "contiguous_memory_optimization": False, "number_checkpoints": 4,
                                        "synchronize_checkpoint_boundary": True, "profile": False}}
    act = load(tmp_path, obj, {"parallel": {"tensor_model_parallel_size": 2}}).activation
    assert (act.recompute_granularity, act.method, act.layers_per_checkpoint) == ("full", "uniform", 1)
    assert act.distribute_saved_activations and act.cpu_offload_activations and act.synchronize_checkpoint_boundary
    # the flags choose the granularity and method; the section only says how the inputs are kept
    act = load(tmp_path, {"activation_checkpointing": {"cpu_checkpointing": True}},
               {"activation": {"recompute_granularity": "full", "recompute_method": "block",
                               "recompute_num_layers": 2}}).activation
    assert (act.method, act.layers_per_checkpoint, act.cpu_offload_activations) == ("block", 2, True)
    # all off: nothing is recomputed
    act = load(tmp_path, {"activation_checkpointing": {"partition_activations": False}}).activation
    assert act.recompute_granularity is None and not act.distribute_saved_activations


@pytest.mark.parametrize("obj,expected", [
    ({"contiguous_memory_optimization": True}, "contiguous_memory_optimization true is not supported: each"),
    ({"profile": True}, "activation_checkpointing.profile true is not supported"),
    ({"number_checkpoints": 0}, "number_checkpoints must be a whole number >= 1"),
    ({"number_checkpoints": 2.5}, "number_checkpoints must be a whole number >= 1"),
    ({"partition_activation": True}, 'did you mean "partition_activations"'),
])
def test_activation_checkpointing_refusals(tmp_path, obj, expected):
    assert expected in error(tmp_path, {"activation_checkpointing": obj})


def test_activation_checkpointing_against_the_flags(tmp_path):
    # cpu_checkpointing applies to full recomputation; the flags asked for selective: one line
    cfg = load(tmp_path, {"activation_checkpointing": {"cpu_checkpointing": True}},
               {"activation": {"recompute_granularity": "selective"}})
    with pytest.raises(ConfigError, match=r"^--cpu-offload-activations \(cpu_checkpointing\) applies to full "
                                          r"recomputation .* this run has --recompute-granularity selective"):
        validate(cfg, 1)
    # partition_activations at tp 1 has nothing to split across: ignored, as DeepSpeed does at mp 1
    act = load(tmp_path, {"activation_checkpointing": {"partition_activations": True}}).activation
    assert act.recompute_granularity is None and not act.distribute_saved_activations
    # synchronize_checkpoint_boundary belongs to full recomputation too
    cfg = load(tmp_path, {"activation_checkpointing": {"synchronize_checkpoint_boundary": True}})
    with pytest.raises(ConfigError, match="^synchronize_checkpoint_boundary applies to full recomputation"):
        validate(cfg, 1)
