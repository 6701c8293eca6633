"""ds_config.json -> RunConfig: schema, mapping, "auto", flag/file precedence and one-line errors.

Pure and fast: no processes. The fixtures in tests/unit/ds_configs/ follow the keys and structure of
DeepSpeed's documented ZeRO-2 / ZeRO-3 (ZeRO-Infinity) examples and of the common "auto" style.
"""

import inspect
import json
import math
import re
from pathlib import Path

import pytest

from megazero.cli import parse_args
from megazero.config import RunConfig
from megazero.ds_config import SCHEDULER_PARAMS, SCHEMA, apply_ds_config
from megazero.errors import ConfigError
from megazero.optim.lr_schedule import LRSchedule
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


# ----- optimizer -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind,w_mode,expected", [
    ("Adam", None, "adamw"), ("Adam", True, "adamw"), ("Adam", False, "adam_l2"), ("AdamW", None, "adamw"),
    ("adamw", True, "adamw"), ("ADAM", False, "adam_l2")])
def test_optimizer_type(tmp_path, kind, w_mode, expected):
    params = {"lr": 1e-4, "torch_adam": True} | ({} if w_mode is None else {"adam_w_mode": w_mode})
    cfg = load(tmp_path, {"optimizer": {"type": kind, "params": params}})
    assert cfg.optimizer.optimizer_type == expected
    validate(cfg, 1)


def test_optimizer_refusals_and_deepspeed_defaults(tmp_path):
    assert "AdamW with params.adam_w_mode false is contradictory" in error(
        tmp_path, {"optimizer": {"type": "AdamW", "params": {"adam_w_mode": False}}})
    assert "supports Adam, AdamW and SGD" in error(tmp_path, {"optimizer": {"type": "Lamb", "params": {}}})
    # Omitted params take DeepSpeed's (FusedAdam's) defaults; flags still override them.
    o = load(tmp_path, {"optimizer": {"type": "Adam"}}).optimizer
    assert (o.lr, o.adam_beta1, o.adam_beta2, o.adam_eps, o.weight_decay) == (1e-3, 0.9, 0.999, 1e-8, 0.0)
    o = load(tmp_path, {"optimizer": {"type": "Adam"}}, {"optimizer": {"weight_decay": 0.1}}).optimizer
    assert o.weight_decay == 0.1


@pytest.mark.parametrize("kind", ["SGD", "sgd"])
def test_sgd_type_and_params(tmp_path, kind):
    """{"type": "SGD"} is torch.optim.SGD(params, **optimizer.params) in DeepSpeed (not one of its own types)."""
    params = {"lr": 0.1, "momentum": 0.8, "weight_decay": 1e-4, "dampening": 0, "nesterov": False, "maximize": False}
    cfg = load(tmp_path, {"optimizer": {"type": kind, "params": params}})
    o = cfg.optimizer
    assert (o.optimizer_type, o.lr, o.sgd_momentum, o.weight_decay) == ("sgd", 0.1, 0.8, 1e-4)
    validate(cfg, 1)


def test_sgd_omitted_params_take_torch_defaults_and_flags_override_them(tmp_path):
    o = load(tmp_path, {"optimizer": {"type": "SGD"}}).optimizer
    assert (o.optimizer_type, o.lr, o.sgd_momentum, o.weight_decay) == ("sgd", 1e-3, 0.0, 0.0)  # not Megatron's 0.9
    path = write(tmp_path, {"optimizer": {"type": "SGD", "params": {"lr": 0.1}}})
    o = parse_args(["--deepspeed-config", str(path), "--sgd-momentum", "0.5", "--optimizer", "sgd"]).optimizer
    assert (o.lr, o.sgd_momentum) == (0.1, 0.5)
    # "auto" takes the flag, else megazero's defaults (Megatron's momentum 0.9)
    auto = {"optimizer": {"type": "SGD", "params": {"lr": "auto", "momentum": "auto", "weight_decay": "auto"}}}
    o = load(tmp_path, auto).optimizer
    assert (o.lr, o.sgd_momentum, o.weight_decay) == (6e-4, 0.9, 0.1)
    assert load(tmp_path, auto, {"optimizer": {"sgd_momentum": 0.5}}).optimizer.sgd_momentum == 0.5
    # a value the file states and a flag that differs disagree, as for every key
    path = write(tmp_path, {"optimizer": {"type": "SGD", "params": {"momentum": 0.9}}})
    with pytest.raises(ConfigError, match="--sgd-momentum 0.5 disagrees with ds_config.json optimizer.params.momentum"):
        parse_args(["--deepspeed-config", str(path), "--sgd-momentum", "0.5"])
    with pytest.raises(ConfigError, match='--optimizer "adamw" disagrees with ds_config.json optimizer.type "SGD"'):
        parse_args(["--deepspeed-config", str(path), "--optimizer", "adam"])


def test_type_auto_takes_the_optimizer_flag(tmp_path):
    obj = {"optimizer": {"type": "auto", "params": {"momentum": 0.8}}}
    o = load(tmp_path, obj, {"optimizer": {"optimizer_type": "sgd"}}).optimizer
    assert (o.optimizer_type, o.sgd_momentum) == ("sgd", 0.8)
    assert error(tmp_path, obj).startswith(  # without --optimizer sgd the optimizer is AdamW
        'ds_config.json: optimizer.params.momentum is an SGD setting; Adam (optimizer.type "auto": --optimizer, '
        'else adamw) takes lr, betas, eps, weight_decay,')


@pytest.mark.parametrize("params,expected", [
    ({"dampening": 0.1}, "optimizer.params.dampening 0.1 is not supported: megazero's SGD does not implement "
                         "dampening"),
    ({"nesterov": True}, "optimizer.params.nesterov true is not supported: megazero's SGD does not implement nesterov"),
    ({"maximize": True}, "optimizer.params.maximize true is not supported: megazero's SGD does not implement maximize"),
    ({"betas": [0.9, 0.99]}, 'optimizer.params.betas is an Adam setting; SGD (optimizer.type "SGD") takes lr, '
                             'momentum, dampening, weight_decay, nesterov, maximize; remove it'),
    ({"eps": 1e-8}, "optimizer.params.eps is an Adam setting"),
    ({"adam_w_mode": True}, "optimizer.params.adam_w_mode is an Adam setting"),
    ({"momentun": 0.9}, 'unknown key "optimizer.params.momentun"; did you mean "momentum"?'),
    ({"max_grad_norm": 1.0}, "use the top-level \"gradient_clipping\""),
    ({"momentum": -0.5}, "optimizer.params.momentum -0.5 must be >= 0"),
    ({"nesterov": "yes"}, "optimizer.params.nesterov must be true or false"),
])
def test_sgd_refusals(tmp_path, params, expected):
    msg = error(tmp_path, {"optimizer": {"type": "SGD", "params": params}})
    assert msg.startswith("ds_config.json: ") and expected in msg, msg


def test_sgd_key_under_adam_is_refused(tmp_path):
    assert error(tmp_path, {"optimizer": {"type": "AdamW", "params": {"momentum": 0.9}}}) == (
        'ds_config.json: optimizer.params.momentum is an SGD setting; Adam (optimizer.type "AdamW") takes lr, betas, '
        'eps, weight_decay, adam_w_mode, torch_adam, bias_correction; remove it')


# ----- schedulers ----------------------------------------------------------------------------------
def deepspeed_lr(kind: str, t: int, *, lr: float, warmup: int, total: int = 0, warmup_type: str = "log",
                 min_lr: float = 0.0, warmup_min_ratio: float = 0.0, cos_min_ratio: float = 1e-4) -> float:
    """DeepSpeed's lr at its 0-based scheduler index t (deepspeed/runtime/lr_schedules.py, re-derived)."""
    w = max(2, warmup)
    rise = (math.log(t + 1) / math.log(w)) if warmup_type == "log" else t / w
    if kind == "WarmupCosineLR":
        if t < w:
            return lr * (warmup_min_ratio + rise * (1 - warmup_min_ratio))
        progress = min(1.0, (t - w + 1) / max(1, total - w))
        return lr * max(0.0, cos_min_ratio + (1 - cos_min_ratio) * (1 + math.cos(math.pi * progress)) / 2)
    if t < w:
        gamma = rise
    elif kind == "WarmupLR":
        gamma = 1.0
    else:
        gamma = max(0.0, (total - t) / max(1.0, total - w))
    return min_lr + (lr - min_lr) * gamma


def schedule(cfg: RunConfig, with_warmup: bool) -> LRSchedule:
    o = cfg.optimizer
    args = (o.lr, o.min_lr, o.lr_warmup_iters, o.lr_decay_iters or cfg.training.train_iters, o.lr_decay_style)
    if not with_warmup:
        return LRSchedule(*args)
    names = inspect.signature(LRSchedule).parameters
    if "warmup_init" not in names or "warmup_style" not in names:
        pytest.skip("TODO: LRSchedule has no warmup_init/warmup_style yet (lr_warmup_init and lr_warmup_style "
                    "are mapped but not applied); see docs/ds_config.md for the formulas")
    return LRSchedule(*args, warmup_init=o.lr_warmup_init, warmup_style=o.lr_warmup_style)


SCHEDULERS = {
    "WarmupLR": {"warmup_min_lr": 1e-5, "warmup_max_lr": 1e-3, "warmup_num_steps": 10},
    "WarmupDecayLR": {"warmup_min_lr": 1e-5, "warmup_max_lr": 1e-3, "warmup_num_steps": 10,
                      "total_num_steps": 50},
    "WarmupCosineLR": {"warmup_min_ratio": 0.1, "cos_min_ratio": 0.05, "warmup_num_steps": 10,
                       "total_num_steps": 50},
}


def scheduler_cfg(tmp_path, kind, warmup_type):
    obj = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}},
           "scheduler": {"type": kind, "params": SCHEDULERS[kind] | {"warmup_type": warmup_type}}}
    return load(tmp_path, obj)


def reference(kind, warmup_type):
    p = SCHEDULERS[kind]
    kw = dict(lr=1e-3, warmup=p["warmup_num_steps"], total=p.get("total_num_steps", 0), warmup_type=warmup_type)
    if kind == "WarmupCosineLR":
        kw |= dict(warmup_min_ratio=p["warmup_min_ratio"], cos_min_ratio=p["cos_min_ratio"])
    else:
        kw |= dict(min_lr=p["warmup_min_lr"])
    return lambda t: deepspeed_lr(kind, t, **kw)


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_scheduler_fields(tmp_path, kind):
    o = scheduler_cfg(tmp_path, kind, "log").optimizer
    assert (o.lr, o.lr_warmup_iters, o.lr_warmup_style) == (1e-3, 10, "log")
    assert o.lr_decay_style == {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}[kind]
    if kind == "WarmupCosineLR":
        assert (o.lr_warmup_init, o.min_lr, o.lr_decay_iters) == (pytest.approx(1e-4), pytest.approx(5e-5), 50)
    else:
        assert o.lr_warmup_init == 1e-5
    if kind == "WarmupDecayLR":  # DeepSpeed decays linearly back to warmup_min_lr, not to 0
        assert (o.min_lr, o.lr_decay_iters) == (1e-5, 50)
    cfg = scheduler_cfg(tmp_path, kind, "linear")
    assert cfg.optimizer.lr_warmup_style == "linear"
    validate(cfg, 1)


@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_scheduler_decay_matches_deepspeed(tmp_path, kind):
    """After warmup megazero's iteration i (1-based) equals DeepSpeed's index t = i for the linear decay
    and t = i - 1 for the cosine decay (DeepSpeed's own two schedules count from different origins)."""
    lr_at, ref = schedule(scheduler_cfg(tmp_path, kind, "log"), with_warmup=False).lr_at, reference(kind, "log")
    shift = 1 if kind == "WarmupCosineLR" else 0
    for i in range(11, 60):
        assert lr_at(i) == pytest.approx(ref(i - shift), rel=1e-12), i


@pytest.mark.parametrize("warmup_type", ["log", "linear"])
@pytest.mark.parametrize("kind", list(SCHEDULERS))
def test_scheduler_warmup_matches_deepspeed(tmp_path, kind, warmup_type):
    """Warmup at megazero iteration i (1-based) is DeepSpeed's index t = i for both styles, so the first
    step already moves: linear lr_init + (lr - lr_init) * i / w, log lr_init + (lr - lr_init) *
    min(1, ln(i + 1) / ln(w)). (DeepSpeed's WarmupCosineLR already decays at t = w, one index before
    megazero's cosine; its last warmup iteration is left out here, see the decay test.)"""
    lr_at = schedule(scheduler_cfg(tmp_path, kind, warmup_type), with_warmup=True).lr_at
    ref = reference(kind, warmup_type)
    w = SCHEDULERS[kind]["warmup_num_steps"]
    for i in range(1, w if kind == "WarmupCosineLR" else w + 1):
        assert lr_at(i) == pytest.approx(ref(i), rel=1e-12), i


def test_scheduler_defaults_and_refusals(tmp_path):
    # Omitted scheduler params take DeepSpeed's defaults; the peak lr is the optimizer's (here the flag's).
    o = load(tmp_path, {"scheduler": {"type": "WarmupLR"}}, {"optimizer": {"lr": 2e-4}}).optimizer
    assert (o.lr, o.lr_warmup_iters, o.lr_warmup_style, o.lr_warmup_init) == (2e-4, 1000, "log", 0.0)
    o = load(tmp_path, {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 1}}}).optimizer
    assert o.lr_warmup_iters == 2  # DeepSpeed warms up over at least 2 steps
    o = load(tmp_path, {"scheduler": {"type": "WarmupCosineLR", "params": {"total_num_steps": 9}}},
             {"optimizer": {"lr": 2e-4}}).optimizer
    assert o.min_lr == pytest.approx(1e-4 * 2e-4)  # DeepSpeed's default cos_min_ratio x the flag's lr
    msg = error(tmp_path, {"scheduler": {"type": "WarmupCosineLR", "params": {"cos_min_ratio": 0.5}}},
                {"optimizer": {"lr": 2e-4, "min_lr": 0.0}})
    assert msg.startswith("--min-lr 0 disagrees with ds_config.json scheduler.params.cos_min_ratio 0.5 x lr 0.0002")
    assert 'did you mean "WarmupLR"' in error(tmp_path, {"scheduler": {"type": "WarmupLr"}})
    assert "not supported" in error(tmp_path, {"scheduler": {"type": "OneCycle", "params": {"cycle_min_lr": 0}}})
    assert "warmup_num_steps must be >= 1" in error(
        tmp_path, {"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 0}}})
    assert "last_batch_iteration 5 is not supported" in error(
        tmp_path, {"scheduler": {"type": "WarmupLR", "params": {"last_batch_iteration": 5}}})
    assert 'warmup_type must be "log" or "linear"' in error(
        tmp_path, {"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "cosine"}}})


def test_no_scheduler_block_keeps_the_flag_schedule(tmp_path):
    o = load(tmp_path, {"optimizer": {"type": "Adam", "params": {"lr": 1e-4}}},
             {"optimizer": {"lr_decay_style": "linear", "lr_warmup_iters": 5}}).optimizer
    assert (o.lr, o.lr_decay_style, o.lr_warmup_iters, o.lr_warmup_style) == (1e-4, "linear", 5, "linear")


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
