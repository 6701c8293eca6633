"""DeepSpeed `ds_config.json` -> RunConfig (DESIGN.md principle 7: one typed config, validated once).

`apply_ds_config(path, cli_sections)` reads the file once, checks every key against a schema (unknown
keys are refused with the nearest valid key; DeepSpeed itself ignores them silently), maps each key
onto a RunConfig field, and merges with the command-line flags. docs/ds_config.md has the full table.

Three layers, lowest first:
  1. `base` (RunConfig defaults);
  2. DeepSpeed's documented default for a key the file leaves out, only where that default changes
     the math (optimizer and scheduler parameters, batch-size derivation) -- a flag overrides it;
  3. values the file states, and the flags the user gave. These must agree: a field set by both to
     different values is a one-line ConfigError naming both. `"auto"` in the file means "the flag
     if given, else megazero's default".
Cross-field checks (batch sizes vs world size, offload not built yet, ...) stay in
RunConfig.validate, which the caller runs once the world size is known.
"""

from __future__ import annotations

import difflib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megazero.config import RunConfig
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
    "optimizer": {"type": STR, "params": {"lr": NUM, "betas": _Leaf("betas"), "eps": NUM, "weight_decay": NUM,
                                          "adam_w_mode": BOOL, "torch_adam": BOOL, "bias_correction": BOOL}},
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
    "tensorboard": _MONITOR, "csv_monitor": _MONITOR,
    "wandb": {"enabled": BOOL, "group": STR_OR_NULL, "team": STR_OR_NULL, "project": STR_OR_NULL},
    "comms_logger": {"enabled": BOOL, "verbose": BOOL, "prof_all": BOOL, "debug": BOOL,
                     "prof_ops": _Leaf("strings")},
}
# DeepSpeed keys megazero knows and refuses (a clearer message than "unknown key").
REFUSED = {
    "amp": "NVIDIA Apex AMP is not supported; use \"fp16\" or \"bf16\"",
    "torch_autocast": "megazero casts the whole model; use \"bf16\" or \"fp16\"",
    "activation_checkpointing": "activation recomputation is not built in megazero yet",
    "pipeline": "megazero runs its own pipeline schedule; use --pipeline-model-parallel-size",
    "tensor_parallel": "use --tensor-model-parallel-size",
    "aio": "NVMe offload is not built in megazero yet",
    "flops_profiler": "megazero reports throughput and MFU itself",
    "comet": "megazero logs to TensorBoard and CSV only",
    "autotuning": "no autotuner in megazero", "elasticity": "no elastic training in megazero",
    "sparse_attention": "megazero's attention is dense", "compression_training": "not supported",
    "data_efficiency": "not supported", "curriculum_learning": "not supported",
    "hybrid_engine": "not supported", "checkpoint": "megazero checkpoints are always topology-independent",
}
_DS_DEFAULTS_ADAM = {"lr": 1e-3, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8, "weight_decay": 0.0}


# ----- loading and checking ----------------------------------------------------------------------
def _fmt(v: Any) -> str:
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


def _load(path: Path) -> dict:
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
        raise ConfigError(f"{fname}: {where} must be {expected} (or \"auto\"), got {_fmt(value)}")
    return value


def _unknown(fname: str, where: str, key: str, valid: list[str]) -> ConfigError:
    match = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    if match:
        hint = f"did you mean {json.dumps(match[0])}?"
    elif len(valid) <= 12:
        hint = f"valid keys here: {', '.join(sorted(valid))}"
    else:
        hint = "docs/ds_config.md lists the accepted keys"
    return ConfigError(f"{fname}: unknown key {json.dumps(where)}; {hint}")


def _check(fname: str, obj: Any, schema: dict, prefix: str = "") -> dict:
    """A copy of obj with every key known and every leaf of the right type, else ConfigError."""
    if not isinstance(obj, dict):
        raise ConfigError(f"{fname}: {prefix.rstrip('.')} must be a JSON object {{...}}, got {_fmt(obj)}")
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
            kind = obj.get("type")  # an unsupported type is refused by _scheduler, before params are read
            out[key] = _check(fname, value, SCHEDULER_PARAMS[kind], where + ".") if kind in SCHEDULER_PARAMS \
                else value
        elif isinstance(sub, dict):
            out[key] = _check(fname, value, sub, where + ".")
        else:
            out[key] = _leaf(fname, where, value, sub)
    return out


# ----- merging file values with flags ------------------------------------------------------------
def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _flag(section: str, field: str, value: Any) -> str:
    """How the user spelled a flag on the command line, e.g. `--micro-batch-size 4` or `--bf16`."""
    from megazero.cli import build_parser  # cli imports this module lazily; import it lazily in turn

    actions = [a for a in build_parser()._actions if a.dest == f"{section}.{field}"]
    for action in actions:
        if action.nargs == 0 and action.const == value:
            return action.option_strings[0]
    for action in actions:
        if action.nargs != 0:
            names = [o for o in action.option_strings if o.lstrip("-").replace("-", "_") == field]
            return f"{(names or action.option_strings)[0]} {_fmt(value)}"
    return f"--{field.replace('_', '-')} {_fmt(value)}"


class _Merge:
    """Collects (section, field) values from the file and checks them against the flags."""

    def __init__(self, fname: str, base: RunConfig, cli: dict[str, dict]):
        self.fname, self.base, self.cli = fname, base, cli
        self.file: dict[tuple[str, str], tuple[Any, str]] = {}  # value and the key that set it
        self.defaults: dict[tuple[str, str], Any] = {}  # DeepSpeed defaults of omitted keys
        self.forbidden: list[tuple[tuple[str, str], Any, str]] = []

    def set(self, target: str, value: Any, source: str) -> None:
        section, field = target.split(".")
        old = self.file.get((section, field))
        if old is not None and not _same(old[0], value):
            raise ConfigError(f"{self.fname}: {old[1]} and {source} both set {target} and disagree; make them equal")
        self.file[(section, field)] = (value, source)

    def default(self, target: str, value: Any) -> None:
        section, field = target.split(".")
        self.defaults.setdefault((section, field), value)

    def forbid(self, target: str, value: Any, source: str) -> None:
        section, field = target.split(".")
        self.forbidden.append(((section, field), value, source))

    def value(self, target: str) -> Any:
        """The field as it will resolve: flag, else file, else omitted-key default, else base."""
        section, field = target.split(".")
        if field in self.cli.get(section, {}):
            return self.cli[section][field]
        if (section, field) in self.file:
            return self.file[(section, field)][0]
        if (section, field) in self.defaults:
            return self.defaults[(section, field)]
        return getattr(getattr(self.base, section), field)

    def result(self) -> RunConfig:
        for (section, field), (value, source) in self.file.items():
            if field in self.cli.get(section, {}) and not _same(self.cli[section][field], value):
                raise ConfigError(
                    f"{_flag(section, field, self.cli[section][field])} disagrees with {self.fname} {source}; give "
                    f"the value once (flag or file), or write \"auto\" in the file to take the flag")
        for (section, field), value, source in self.forbidden:
            if field in self.cli.get(section, {}) and _same(self.cli[section][field], value):
                raise ConfigError(f"{_flag(section, field, value)} disagrees with {self.fname} {source}; "
                                  f"remove one of them")
        sections: dict[str, dict] = {}
        for (section, field), value in self.defaults.items():
            if field not in self.cli.get(section, {}) and (section, field) not in self.file:
                sections.setdefault(section, {})[field] = value
        for (section, field), (value, _) in self.file.items():
            sections.setdefault(section, {})[field] = value
        return self.base.replace(**sections).replace(**self.cli)


# ----- the mapping, block by block ---------------------------------------------------------------
def _given(v: Any) -> bool:
    return v is not None and v != AUTO


def _only(fname: str, where: str, value: Any, allowed: tuple, why: str) -> None:
    if value != AUTO and value not in allowed:
        raise ConfigError(f"{fname}: {where} {_fmt(value)} is not supported: {why}")


def _batch(ds: dict, m: _Merge) -> None:
    keys = {"train_batch_size": "training.global_batch_size",
            "train_micro_batch_size_per_gpu": "training.micro_batch_size",
            "gradient_accumulation_steps": "training.gradient_accumulation_steps"}
    for key, target in keys.items():
        v = ds.get(key)
        if _given(v):
            if v < 1:
                raise ConfigError(f"{m.fname}: {key} must be >= 1, got {v}")
            m.set(target, v, f"{key} {v}")
    gbs, micro, accum = (ds.get(k) for k in keys)
    if _given(gbs) and not _given(micro):
        if _given(accum):
            m.default("training.micro_batch_size", None)  # global and accumulation given: derive micro
        elif micro is None and accum is None:  # only train_batch_size: DeepSpeed uses accumulation 1
            if "micro_batch_size" not in m.cli.get("training", {}):
                m.default("training.micro_batch_size", None)
                m.default("training.gradient_accumulation_steps", 1)


def _precision(ds: dict, m: _Merge) -> None:
    fp16, bf16 = ds.get("fp16", {}), ds.get("bf16", {})
    on16, onbf = fp16.get("enabled"), bf16.get("enabled")
    if on16 is True and onbf is True:
        raise ConfigError(f"{m.fname}: fp16.enabled and bf16.enabled are both true; enable one")
    for block, on in (("fp16", on16), ("bf16", onbf)):
        if on is True:
            m.set("precision.params_dtype", block, f"{block}.enabled true")
        elif on is False:
            m.forbid("precision.params_dtype", block, f"{block}.enabled false")
    if True not in (on16, onbf) and False in (on16, onbf) and AUTO not in (on16, onbf):
        m.default("precision.params_dtype", "fp32")  # mixed precision explicitly off: DeepSpeed trains fp32
    fp32_only = {"bf16.bf16_master_weights_and_grads": "master weights and gradients are always fp32",
                 "bf16.bf16_optimizer_states": "optimizer state is always fp32",
                 "fp16.fp16_master_weights_and_grads": "master weights and gradients are always fp32",
                 "fp16.consecutive_hysteresis": "megazero restores the hysteresis budget only when the scale "
                                                "grows (DeepSpeed's false)"}
    for where, why in fp32_only.items():
        block, key = where.split(".")
        if key in ds.get(block, {}) and ds[block].get("enabled") is not False:
            _only(m.fname, where, ds[block][key], (False,), why)
    if on16 is False:
        return  # DeepSpeed ignores the settings of a disabled fp16 block
    v = fp16.get("loss_scale")
    if _given(v):
        if v < 0:
            raise ConfigError(f"{m.fname}: fp16.loss_scale must be 0 (dynamic) or > 0 (static), got {_fmt(v)}")
        m.set("precision.loss_scale", None if v == 0 else float(v), f"fp16.loss_scale {_fmt(v)}")
    v = fp16.get("initial_scale_power")
    if _given(v):
        if not 0 <= v <= 64:
            raise ConfigError(f"{m.fname}: fp16.initial_scale_power must be in [0, 64], got {v}")
        m.set("precision.initial_loss_scale", 2.0**v, f"fp16.initial_scale_power {v} (2**{v} = {2**v})")
    for key in ("loss_scale_window", "hysteresis", "min_loss_scale"):
        v = fp16.get(key)
        if _given(v):
            m.set(f"precision.{key}", float(v) if key == "min_loss_scale" else v, f"fp16.{key} {_fmt(v)}")


def _optimizer(ds: dict, m: _Merge) -> None:
    if "optimizer" not in ds:
        return
    opt = ds["optimizer"]
    params = opt.get("params", {})
    kind = opt.get("type")
    if kind is None:
        raise ConfigError(f"{m.fname}: optimizer needs a \"type\" (Adam or AdamW)")
    w_mode = params.get("adam_w_mode")
    if kind != AUTO:
        if kind.lower() not in ("adam", "adamw"):
            raise ConfigError(f"{m.fname}: optimizer.type {_fmt(kind)} is not supported; megazero supports Adam and "
                              f"AdamW (case-insensitive)")
        if kind.lower() == "adamw" and w_mode is False:
            raise ConfigError(f"{m.fname}: optimizer.type AdamW with params.adam_w_mode false is contradictory "
                              f"(DeepSpeed silently uses AdamW); for Adam with L2 decay use type Adam")
        l2 = kind.lower() == "adam" and w_mode is False
        src = f"optimizer.type {_fmt(kind)}" + (" with params.adam_w_mode false" if l2 else "")
        m.set("optimizer.optimizer_type", "adam_l2" if l2 else "adamw", src)
    if "bias_correction" in params:
        _only(m.fname, "optimizer.params.bias_correction", params["bias_correction"], (True,),
              "megazero's Adam always corrects the moment bias")
    # Omitted params take DeepSpeed's (FusedAdam's) defaults; "auto" takes the flag or megazero's default.
    for key, targets in (("lr", ("lr",)), ("betas", ("adam_beta1", "adam_beta2")), ("eps", ("adam_eps",)),
                         ("weight_decay", ("weight_decay",))):
        v = params.get(key)
        if v is None:
            for target in targets:
                m.default(f"optimizer.{target}", _DS_DEFAULTS_ADAM[target])
            continue
        if v == AUTO:
            continue
        values = [float(b) for b in v] if key == "betas" else [float(v)]
        if key == "betas" and not all(0 <= b < 1 for b in values):
            raise ConfigError(f"{m.fname}: optimizer.params.betas must be in [0, 1), got {_fmt(v)}")
        if key != "betas" and (values[0] < 0 or (key == "lr" and values[0] == 0)):
            raise ConfigError(f"{m.fname}: optimizer.params.{key} must be {'> 0' if key == 'lr' else '>= 0'}, "
                              f"got {_fmt(v)}")
        for target, value in zip(targets, values):
            m.set(f"optimizer.{target}", value, f"optimizer.params.{key} {_fmt(v)}")


def _scheduler(ds: dict, m: _Merge) -> None:
    if "scheduler" not in ds:
        return  # the schedule comes from the flags (Megatron-DeepSpeed style), not a constant lr
    sched = ds["scheduler"]
    kind, p = sched.get("type"), sched.get("params", {})
    if kind is None:
        raise ConfigError(f"{m.fname}: scheduler needs a \"type\" ({', '.join(SCHEDULER_PARAMS)})")
    if kind not in SCHEDULER_PARAMS:
        close = difflib.get_close_matches(str(kind), list(SCHEDULER_PARAMS), n=1, cutoff=0.6)
        hint = f" (did you mean {json.dumps(close[0])}?)" if close else ""
        raise ConfigError(f"{m.fname}: scheduler.type {_fmt(kind)} is not supported; megazero maps "
                          f"{', '.join(SCHEDULER_PARAMS)}{hint}")
    f = m.fname
    if "last_batch_iteration" in p:
        _only(f, "scheduler.params.last_batch_iteration", p["last_batch_iteration"], (-1,),
              "megazero resumes the schedule from the checkpoint's iteration")
    style = p.get("warmup_type")
    if style is None:
        m.default("optimizer.lr_warmup_style", "log")  # DeepSpeed's default
    elif style != AUTO:
        if style not in ("log", "linear"):
            raise ConfigError(f"{f}: scheduler.params.warmup_type must be \"log\" or \"linear\", got {_fmt(style)}")
        m.set("optimizer.lr_warmup_style", style, f"scheduler.params.warmup_type {_fmt(style)}")
    steps = p.get("warmup_num_steps")
    if steps is None:
        m.default("optimizer.lr_warmup_iters", 1000)
    elif steps != AUTO:
        if steps < 1:
            raise ConfigError(f"{f}: scheduler.params.warmup_num_steps must be >= 1, got {steps} (DeepSpeed "
                              f"refuses 0 too; for no warmup drop the scheduler block and pass --lr-warmup-iters 0)")
        m.set("optimizer.lr_warmup_iters", max(2, steps), f"scheduler.params.warmup_num_steps {steps}"
              + (" (DeepSpeed warms up over at least 2 steps)" if steps < 2 else ""))
    total = p.get("total_num_steps")
    if _given(total):
        if total < 1:
            raise ConfigError(f"{f}: scheduler.params.total_num_steps must be >= 1, got {total}")
        m.set("optimizer.lr_decay_iters", total, f"scheduler.params.total_num_steps {total}")
    decay = {"WarmupLR": "constant", "WarmupDecayLR": "linear", "WarmupCosineLR": "cosine"}[kind]
    m.set("optimizer.lr_decay_style", decay, f"scheduler.type {kind}")
    if kind == "WarmupCosineLR":  # ratios of the optimizer's lr
        lr = m.value("optimizer.lr")
        for key, target, ds_default in (("warmup_min_ratio", "lr_warmup_init", 0.0),
                                        ("cos_min_ratio", "min_lr", 1e-4)):
            r = p.get(key)
            if r == AUTO:
                continue
            if r is None:
                m.default(f"optimizer.{target}", ds_default * lr)
                continue
            if not 0 <= r <= 1:
                raise ConfigError(f"{f}: scheduler.params.{key} must be in [0, 1], got {_fmt(r)}")
            m.set(f"optimizer.{target}", r * lr, f"scheduler.params.{key} {_fmt(r)} x lr {_fmt(lr)} = {_fmt(r * lr)}")
        return
    v = p.get("warmup_max_lr")
    if _given(v):
        if v <= 0:
            raise ConfigError(f"{f}: scheduler.params.warmup_max_lr must be > 0, got {_fmt(v)}")
        m.set("optimizer.lr", float(v), f"scheduler.params.warmup_max_lr {_fmt(v)}")
    v = p.get("warmup_min_lr")
    # WarmupDecayLR decays back to warmup_min_lr; WarmupLR never decays (min_lr unused, kept <= lr).
    targets = ["optimizer.lr_warmup_init", "optimizer.min_lr"]
    if _given(v):
        if v < 0:
            raise ConfigError(f"{f}: scheduler.params.warmup_min_lr must be >= 0, got {_fmt(v)}")
        for target in targets if kind == "WarmupDecayLR" else targets[:1]:
            m.set(target, float(v), f"scheduler.params.warmup_min_lr {_fmt(v)}")
        if kind == "WarmupLR":
            m.default("optimizer.min_lr", float(v))
    elif v is None:
        for target in targets:
            m.default(target, 0.0)


def _zero(ds: dict, m: _Merge) -> None:
    z, f = ds.get("zero_optimization", {}), m.fname
    v = z.get("stage")
    if _given(v):
        if v not in (0, 1, 2, 3):
            raise ConfigError(f"{f}: zero_optimization.stage must be 0, 1, 2 or 3, got {v}")
        m.set("zero.stage", v, f"zero_optimization.stage {v}")
    for key in ("reduce_bucket_size", "allgather_bucket_size", "sub_group_size"):
        v = z.get(key)
        if _given(v):
            if v < 1:
                raise ConfigError(f"{f}: zero_optimization.{key} must be >= 1 element, got {v}")
            m.set(f"zero.{key}", v, f"zero_optimization.{key} {_fmt(v)}")
    if _given(z.get("overlap_comm")):
        m.set("zero.overlap_comm", z["overlap_comm"], f"zero_optimization.overlap_comm {_fmt(z['overlap_comm'])}")
    if z.get("cpu_offload") is True:  # DeepSpeed's deprecated spelling of offload_optimizer.device cpu
        m.set("zero.offload_optimizer", "cpu", "zero_optimization.cpu_offload true")
    for block, target in (("offload_optimizer", "zero.offload_optimizer"), ("offload_param", "zero.offload_param")):
        if block not in z:
            continue
        where = f"zero_optimization.{block}"
        device = z[block].get("device")
        if device is None:
            raise ConfigError(f"{f}: {where} needs \"device\": \"none\", \"cpu\" or \"nvme\"")
        if device == AUTO:
            continue
        if device not in ("none", "cpu", "nvme"):
            raise ConfigError(f"{f}: {where}.device must be \"none\", \"cpu\" or \"nvme\", got {_fmt(device)}")
        m.set(target, device, f"{where}.device {_fmt(device)}")
        path = z[block].get("nvme_path")
        if device == "nvme" and _given(path):
            m.set("zero.offload_nvme_path", path, f"{where}.nvme_path {_fmt(path)}")
        if "ratio" in z[block]:
            _only(f, f"{where}.ratio", z[block]["ratio"], (1, 1.0), "megazero offloads all or nothing")
    if "load_from_fp32_weights" in z:
        _only(f, "zero_optimization.load_from_fp32_weights", z["load_from_fp32_weights"], (True,),
              "megazero always restores the fp32 master weights from the checkpoint")
    if "zero_hpz_partition_size" in z:
        _only(f, "zero_optimization.zero_hpz_partition_size", z["zero_hpz_partition_size"], (1,),
              "ZeRO++ hierarchical partitioning is not built")
    for key in ("zero_quantized_weights", "zero_quantized_gradients"):
        if key in z:
            _only(f, f"zero_optimization.{key}", z[key], (False,), "ZeRO++ quantized communication is not built")


def _logging(ds: dict, m: _Merge) -> None:
    f = m.fname
    for block, off_field in (("tensorboard", "logging.no_tensorboard"), ("csv_monitor", "logging.no_csv")):
        if block not in ds:
            continue  # megazero's default (both on) stays
        b = ds[block]
        enabled = b.get("enabled")
        if enabled is None:
            m.default(off_field, True)  # DeepSpeed's default: disabled
        elif enabled != AUTO:
            m.set(off_field, not enabled, f"{block}.enabled {_fmt(enabled)}")
        out = b.get("output_path")
        if _given(out) and enabled is not False:
            job = b.get("job_name")
            path = str(Path(out) / (job if _given(job) else "DeepSpeedJobName"))
            if block == "tensorboard":
                m.set("logging.tensorboard_dir", path, f"tensorboard.output_path/job_name {_fmt(path)}")
            elif m.base.logging.output_dir is None:  # CSVs live in the run directory: only if nothing names one
                m.default("logging.output_dir", path)
    if "wandb" in ds:
        _only(f, "wandb.enabled", ds["wandb"].get("enabled", False), (False,),
              "megazero logs to TensorBoard and CSV only")
    if "comms_logger" in ds:
        v = ds["comms_logger"].get("enabled")
        if _given(v):
            m.set("logging.log_comm", v, f"comms_logger.enabled {_fmt(v)}")
    for key, target in (("wall_clock_breakdown", "logging.wall_clock_breakdown"),
                        ("memory_breakdown", "logging.log_memory"), ("steps_per_print", "training.log_interval"),
                        ("gradient_clipping", "optimizer.clip_grad")):
        v = ds.get(key)
        if _given(v):
            if not isinstance(v, bool) and v < (1 if key == "steps_per_print" else 0):
                raise ConfigError(f"{f}: {key} must be >= {1 if key == 'steps_per_print' else 0}, got {_fmt(v)}")
            m.set(target, float(v) if key == "gradient_clipping" else v, f"{key} {_fmt(v)}")


def _communication(ds: dict, m: _Merge) -> None:
    f = m.fname
    if "prescale_gradients" in ds:
        _only(f, "prescale_gradients", ds["prescale_gradients"], (False,),
              "megazero averages gradients after the reduction (fp32 buffers)")
    if "gradient_predivide_factor" in ds:
        _only(f, "gradient_predivide_factor", ds["gradient_predivide_factor"], (1, 1.0),
              "megazero averages gradients after the reduction (fp32 buffers)")
    if "communication_data_type" in ds:
        _only(f, "communication_data_type", ds["communication_data_type"], (None, "fp32", "float32"),
              "megazero reduces gradients in fp32")


def apply_ds_config(path: str | Path, cli_sections: dict[str, dict] | None = None,
                    base: RunConfig | None = None) -> RunConfig:
    """RunConfig from a DeepSpeed config file and the flags the user gave (`{section: {field: value}}`).

    Raises ConfigError (one line) for a missing/invalid file, an unknown key (with the nearest valid
    one), a wrong type, a refused setting, or a flag that disagrees with the file. Cross-field checks
    that need the world size are left to RunConfig.validate."""
    path = Path(path)
    raw = _load(path)
    ds = _check(path.name, raw, SCHEMA)
    m = _Merge(path.name, base or RunConfig(), {k: dict(v) for k, v in (cli_sections or {}).items()})
    _batch(ds, m)
    _precision(ds, m)
    _optimizer(ds, m)  # before the scheduler: WarmupCosineLR's ratios apply to the resolved lr
    _scheduler(ds, m)
    _zero(ds, m)
    _logging(ds, m)
    _communication(ds, m)
    return m.result()
