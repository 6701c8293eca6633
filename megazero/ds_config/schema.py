"""The accepted DeepSpeed keys and the file itself: reading, JSON types, unknown and refused keys.

Owns `SCHEMA` (every key megazero accepts, with its JSON type), `SCHEDULER_PARAMS` and
`OPTIMIZER_PARAMS` (the params of each supported scheduler and optimizer type), `REFUSED` (DeepSpeed
sections megazero knows and refuses, with the reason), `load` (the file -> a dict, one-line errors for a
missing file, bad JSON or duplicate keys), `check` (every key known, every leaf of the right type;
unknown keys name the nearest valid one), and the value-level helpers the mappings share (`fmt` for
messages, `given`, `only` for keys megazero accepts with one value only, `optimizer_family` and
`check_optimizer_keys`). What a key *means* for RunConfig lives in mapping.py and optimizer.py.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megazero.errors import ConfigError

AUTO = "auto"


# ----- schema: every accepted key ----------------------------------------------------------------
@dataclass(frozen=True)
class _Leaf:
    kind: str  # int | number | bool | str | betas | strings
    nullable: bool = False


INT, NUM, BOOL, STR = _Leaf("int"), _Leaf("number"), _Leaf("bool"), _Leaf("str")
STR_OR_NULL, NUM_OR_NULL = _Leaf("str", nullable=True), _Leaf("number", nullable=True)
_EXPECTED = {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string",
             "betas": "a list of two numbers [beta1, beta2]", "strings": "a list of strings"}

_WARMUP = {"warmup_num_steps": INT, "warmup_type": STR, "last_batch_iteration": INT}
SCHEDULER_PARAMS: dict[str, dict] = {
    "WarmupLR": {"warmup_min_lr": NUM, "warmup_max_lr": NUM, **_WARMUP},
    "WarmupDecayLR": {"warmup_min_lr": NUM, "warmup_max_lr": NUM, "total_num_steps": INT, **_WARMUP},
    "WarmupCosineLR": {"warmup_min_ratio": NUM, "cos_min_ratio": NUM, "total_num_steps": INT, **_WARMUP},
}
# optimizer.params per optimizer (Adam and AdamW share DeepSpeed's Adam keys; SGD takes torch.optim.SGD's).
OPTIMIZER_PARAMS: dict[str, dict] = {
    "Adam": {"lr": NUM, "betas": _Leaf("betas"), "eps": NUM, "weight_decay": NUM, "adam_w_mode": BOOL,
             "torch_adam": BOOL, "bias_correction": BOOL},
    "SGD": {"lr": NUM, "momentum": NUM, "dampening": NUM, "weight_decay": NUM, "nesterov": BOOL, "maximize": BOOL},
}
_MONITOR = {"enabled": BOOL, "output_path": STR_OR_NULL, "job_name": STR}
SCHEMA: dict[str, Any] = {
    "train_batch_size": INT, "train_micro_batch_size_per_gpu": INT, "gradient_accumulation_steps": INT,
    "gradient_clipping": NUM, "steps_per_print": INT, "wall_clock_breakdown": BOOL, "memory_breakdown": BOOL,
    "prescale_gradients": BOOL, "gradient_predivide_factor": NUM, "communication_data_type": STR_OR_NULL,
    "zero_allow_untested_optimizer": BOOL, "zero_force_ds_cpu_optimizer": BOOL,
    "fp16": {"enabled": BOOL, "auto_cast": BOOL, "loss_scale": NUM, "initial_scale_power": INT,
             "loss_scale_window": INT, "hysteresis": INT, "consecutive_hysteresis": BOOL, "min_loss_scale": NUM,
             "fp16_master_weights_and_grads": BOOL},
    "bf16": {"enabled": BOOL, "bf16_master_weights_and_grads": BOOL, "bf16_optimizer_states": BOOL},
    # params checked against the named type's keys; with "auto" (or an unsupported type) against every optimizer's
    "optimizer": {"type": STR, "params": OPTIMIZER_PARAMS["Adam"] | OPTIMIZER_PARAMS["SGD"]},
    "scheduler": {"type": STR, "params": SCHEDULER_PARAMS},  # params checked against the named type
    "zero_optimization": {
        "stage": INT, "reduce_bucket_size": INT, "allgather_bucket_size": INT, "overlap_comm": BOOL,
        "contiguous_gradients": BOOL, "reduce_scatter": BOOL, "allgather_partitions": BOOL,
        "round_robin_gradients": BOOL, "cpu_offload": BOOL, "sub_group_size": INT,
        "offload_optimizer": {"device": STR, "nvme_path": STR_OR_NULL, "pin_memory": BOOL, "buffer_count": INT,
                              "fast_init": BOOL, "ratio": NUM},
        "offload_param": {"device": STR, "nvme_path": STR_OR_NULL, "pin_memory": BOOL, "buffer_count": INT,
                          "buffer_size": INT, "max_in_cpu": INT},
        "stage3_max_live_parameters": INT, "stage3_max_reuse_distance": INT, "stage3_prefetch_bucket_size": INT,
        "stage3_param_persistence_threshold": INT, "stage3_gather_16bit_weights_on_model_save": BOOL,
        "stage3_gather_fp16_weights_on_model_save": BOOL, "elastic_checkpoint": BOOL,
        "ignore_unused_parameters": BOOL, "load_from_fp32_weights": BOOL, "zero_hpz_partition_size": INT,
        "zero_quantized_weights": BOOL, "zero_quantized_gradients": BOOL},
    # DeepSpeed's libaio tuning: accepted, no effect (megazero's NVMe offload does its own IO: zero/offload.py)
    "aio": {"block_size": INT, "queue_depth": INT, "thread_count": INT, "intra_op_parallelism": INT,
            "single_submit": BOOL, "overlap_events": BOOL, "use_gds": BOOL},
    # DeepSpeed's activation checkpointing: how checkpointed layer inputs are kept (mapping.py)
    "activation_checkpointing": {"partition_activations": BOOL, "cpu_checkpointing": BOOL,
                                 "contiguous_memory_optimization": BOOL, "number_checkpoints": NUM_OR_NULL,
                                 "synchronize_checkpoint_boundary": BOOL, "profile": BOOL},
    "tensorboard": _MONITOR, "csv_monitor": _MONITOR,
    "wandb": {"enabled": BOOL, "group": STR_OR_NULL, "team": STR_OR_NULL, "project": STR_OR_NULL},
    "comms_logger": {"enabled": BOOL, "verbose": BOOL, "prof_all": BOOL, "debug": BOOL,
                     "prof_ops": _Leaf("strings")},
}
# DeepSpeed keys megazero knows and refuses (a clearer message than "unknown key").
REFUSED = {
    "amp": "NVIDIA Apex AMP is not supported; use \"fp16\" or \"bf16\"",
    "torch_autocast": "megazero casts the whole model; use \"bf16\" or \"fp16\"",
    "pipeline": "megazero runs its own pipeline schedule; use --pipeline-model-parallel-size",
    "tensor_parallel": "use --tensor-model-parallel-size",
    "flops_profiler": "megazero reports throughput and MFU itself",
    "comet": "megazero logs to TensorBoard and CSV only",
    "autotuning": "no autotuner in megazero", "elasticity": "no elastic training in megazero",
    "sparse_attention": "megazero's attention is dense", "compression_training": "not supported",
    "data_efficiency": "not supported", "curriculum_learning": "not supported",
    "hybrid_engine": "not supported", "checkpoint": "megazero checkpoints are always topology-independent",
}


# ----- loading and checking ----------------------------------------------------------------------
def fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None or isinstance(v, (str, list)):
        return json.dumps(v)
    if isinstance(v, float):
        return f"{v:.10g}"
    return str(v)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise ConfigError(f"duplicate key {json.dumps(key)}")
        seen[key] = value
    return seen


def load(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"--deepspeed-config {path}: file not found (or not a file)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), object_pairs_hook=_no_duplicates)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path.name}: invalid JSON at line {e.lineno}:{e.colno}: {e.msg}") from None
    except ConfigError as e:
        raise ConfigError(f"{path.name}: {e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path.name}: not UTF-8 text ({e.reason})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: the top level must be a JSON object {{...}}, got {type(data).__name__}")
    if "bfloat16" in data:  # DeepSpeed's alias for "bf16"
        if "bf16" in data:
            raise ConfigError(f"{path.name}: give \"bf16\" or its alias \"bfloat16\", not both")
        data["bf16"] = data.pop("bfloat16")
    return data


def _leaf(fname: str, where: str, value: Any, leaf: _Leaf) -> Any:
    """The value with its JSON type checked (integral floats such as 5e8 accepted as integers)."""
    if value == AUTO or (value is None and leaf.nullable):
        return value
    k, ok = leaf.kind, False
    if k == "bool":
        ok = isinstance(value, bool)
    elif isinstance(value, bool):
        ok = False
    elif k == "int":
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        ok = isinstance(value, int)
    elif k == "number":
        ok = isinstance(value, (int, float)) and math.isfinite(value)
    elif k == "str":
        ok = isinstance(value, str)
    elif k == "betas":
        ok = (isinstance(value, list) and len(value) == 2
              and all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in value))
    elif k == "strings":
        ok = isinstance(value, list) and all(isinstance(s, str) for s in value)
    if not ok:
        expected = _EXPECTED[k] + (" or null" if leaf.nullable else "")
        raise ConfigError(f"{fname}: {where} must be {expected} (or \"auto\"), got {fmt(value)}")
    return value


def nearest(key: str, valid: list[str]) -> str | None:
    """The valid name closest to a misspelt one, if any is close."""
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    return match[0] if match else None


def _unknown(fname: str, where: str, key: str, valid: list[str]) -> ConfigError:
    match = nearest(key, valid)
    if match:
        hint = f"did you mean {json.dumps(match)}?"
    elif len(valid) <= 12:
        hint = f"valid keys here: {', '.join(sorted(valid))}"
    else:
        hint = "docs/ds_config.md lists the accepted keys"
    return ConfigError(f"{fname}: unknown key {json.dumps(where)}; {hint}")


def check(fname: str, obj: Any, schema: dict, prefix: str = "") -> dict:
    """A copy of obj with every key known and every leaf of the right type, else ConfigError."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{fname}: {prefix.rstrip('.')} must be a JSON object {{...}}, got {fmt(obj)}")
    out = {}
    for key, value in obj.items():
        where = prefix + key
        if not prefix and key in REFUSED:
            raise ConfigError(f"{fname}: {json.dumps(key)} is not supported by megazero ({REFUSED[key]}); remove it")
        if where == "optimizer.params.max_grad_norm":
            raise ConfigError(f"{fname}: optimizer.params.max_grad_norm is not an optimizer setting; use the "
                              f"top-level \"gradient_clipping\" (DeepSpeed refuses it too)")
        if not prefix and key == "seed":
            raise ConfigError(f"{fname}: \"seed\" is not a DeepSpeed setting; use --seed")
        if key not in schema:
            raise _unknown(fname, where, key, list(schema))
        sub = schema[key]
        if where == "scheduler.params":
            kind = obj.get("type")  # an unsupported type is refused by optimizer.scheduler
            out[key] = check(fname, value, SCHEDULER_PARAMS[kind], where + ".") if kind in SCHEDULER_PARAMS \
                else value
        elif where == "optimizer.params" and (family := optimizer_family(obj.get("type"))):
            check_optimizer_keys(fname, value, family, f"optimizer.type {fmt(obj['type'])}")
            out[key] = check(fname, value, OPTIMIZER_PARAMS[family], where + ".")
        elif isinstance(sub, dict):
            out[key] = check(fname, value, sub, where + ".")
        else:
            out[key] = _leaf(fname, where, value, sub)
    return out


def optimizer_family(kind: Any) -> str | None:
    """The OPTIMIZER_PARAMS entry an optimizer.type names, None for "auto" and unsupported types.
    Case-insensitive: DeepSpeed lowercases its own types (Adam, AdamW); for SGD it looks up the exact
    torch.optim class name "SGD", and megazero accepts any case."""
    return {"adam": "Adam", "adamw": "Adam", "sgd": "SGD"}.get(kind.lower()) if isinstance(kind, str) else None


def check_optimizer_keys(fname: str, params: Any, family: str, source: str) -> None:
    """Refuse another optimizer's key in optimizer.params (betas under SGD: torch.optim.SGD would raise
    TypeError on it); misspelt keys are left to `check`, which names the nearest valid one."""
    for key in params if isinstance(params, dict) else ():
        owner = next((f for f, keys in OPTIMIZER_PARAMS.items() if key in keys), None)
        if key not in OPTIMIZER_PARAMS[family] and owner:
            raise ConfigError(f"{fname}: optimizer.params.{key} is an {owner} setting; {family} ({source}) takes "
                              f"{', '.join(OPTIMIZER_PARAMS[family])}; remove it")


def given(v: Any) -> bool:
    """A value the file states (not null, not "auto")."""
    return v is not None and v != AUTO


def only(fname: str, where: str, value: Any, allowed: tuple, why: str) -> None:
    """Refuse a stated value outside `allowed` (keys megazero accepts with one value only)."""
    if value != AUTO and value not in allowed:
        raise ConfigError(f"{fname}: {where} {fmt(value)} is not supported: {why}")
