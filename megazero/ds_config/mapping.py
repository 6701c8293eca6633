"""What each DeepSpeed key means for RunConfig: the per-section mappings (docs/ds_config.md's key table).

One function per block of the file (batch sizes, fp16/bf16, zero_optimization, monitors, communication;
optimizer.py has the optimizer and scheduler blocks), each turning the checked keys into `Merge.set`
(the file states a field), `Merge.default` (DeepSpeed's default for an omitted key), `Merge.forbid`
(a flag the file rules out) or a one-line ConfigError for a value megazero cannot honour.
`apply_mappings` runs them all, in dependency order.
"""

from __future__ import annotations

from pathlib import Path

from megazero.ds_config.merge import Merge
from megazero.ds_config.optimizer import optimizer, scheduler
from megazero.ds_config.schema import AUTO, fmt, given, only
from megazero.errors import ConfigError

# communication_data_type spellings (DeepSpeed lower-cases the value) -> the dtype they name.
_COMM_DTYPES = {"fp32": "fp32", "float32": "fp32", "fp16": "fp16", "float16": "fp16", "bf16": "bf16",
                "bfloat16": "bf16"}


def _batch(ds: dict, m: Merge) -> None:
    keys = {"train_batch_size": "training.global_batch_size",
            "train_micro_batch_size_per_gpu": "training.micro_batch_size",
            "gradient_accumulation_steps": "training.gradient_accumulation_steps"}
    for key, target in keys.items():
        v = ds.get(key)
        if given(v):
            m.set(target, v, f"{key} {v}")  # ranges: the RunConfig field's (Merge.set)
    gbs, micro, accum = (ds.get(k) for k in keys)
    if given(gbs) and not given(micro):
        if given(accum):
            m.default("training.micro_batch_size", None)  # global and accumulation given: derive micro
        elif micro is None and accum is None:  # only train_batch_size: DeepSpeed uses accumulation 1
            if "micro_batch_size" not in m.cli.get("training", {}):
                m.default("training.micro_batch_size", None)
                m.default("training.gradient_accumulation_steps", 1)


def _precision(ds: dict, m: Merge) -> None:
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
            only(m.fname, where, ds[block][key], (False,), why)
    if on16 is False:
        return  # DeepSpeed ignores the settings of a disabled fp16 block
    v = fp16.get("loss_scale")
    if given(v):
        if v < 0:
            raise ConfigError(f"{m.fname}: fp16.loss_scale must be 0 (dynamic) or > 0 (static), got {fmt(v)}")
        m.set("precision.loss_scale", None if v == 0 else float(v), f"fp16.loss_scale {fmt(v)}")
    v = fp16.get("initial_scale_power")
    if given(v):
        if not 0 <= v <= 64:
            raise ConfigError(f"{m.fname}: fp16.initial_scale_power must be in [0, 64], got {v}")
        m.set("precision.initial_loss_scale", 2.0**v, f"fp16.initial_scale_power {v} (2**{v} = {2**v})")
    for key in ("loss_scale_window", "hysteresis", "min_loss_scale"):
        v = fp16.get(key)
        if given(v):
            m.set(f"precision.{key}", float(v) if key == "min_loss_scale" else v, f"fp16.{key} {fmt(v)}")


def _zero(ds: dict, m: Merge) -> None:
    z, f = ds.get("zero_optimization", {}), m.fname
    v = z.get("stage")
    if given(v):
        if v not in (0, 1, 2, 3):
            raise ConfigError(f"{f}: zero_optimization.stage must be 0, 1, 2 or 3, got {v}")
        m.set("zero.stage", v, f"zero_optimization.stage {v}")
    # sub_group_size: the NVMe offload's read/step/write unit. allgather_bucket_size: accepted, no effect:
    # parameters are gathered per gradient bucket (reduce_bucket_size).
    for key, target in (("reduce_bucket_size", "zero.reduce_bucket_size"),
                        ("sub_group_size", "zero.offload_sub_group_size")):
        if given(z.get(key)):
            m.set(target, z[key], f"zero_optimization.{key} {fmt(z[key])}")
    v = z.get("allgather_bucket_size")
    if given(v) and v < 1:
        raise ConfigError(f"{f}: zero_optimization.allgather_bucket_size {fmt(v)} must be >= 1")
    if given(z.get("overlap_comm")):
        m.set("zero.overlap_comm", z["overlap_comm"], f"zero_optimization.overlap_comm {fmt(z['overlap_comm'])}")
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
            raise ConfigError(f"{f}: {where}.device must be \"none\", \"cpu\" or \"nvme\", got {fmt(device)}")
        m.set(target, device, f"{where}.device {fmt(device)}")
        path = z[block].get("nvme_path")
        if device == "nvme" and given(path):
            m.set("zero.offload_nvme_path", path, f"{where}.nvme_path {fmt(path)}")
        if "ratio" in z[block]:
            only(f, f"{where}.ratio", z[block]["ratio"], (1, 1.0), "megazero offloads all or nothing")
    if "load_from_fp32_weights" in z:
        only(f, "zero_optimization.load_from_fp32_weights", z["load_from_fp32_weights"], (True,),
              "megazero always restores the fp32 master weights from the checkpoint")
    if "zero_hpz_partition_size" in z:
        only(f, "zero_optimization.zero_hpz_partition_size", z["zero_hpz_partition_size"], (1,),
              "ZeRO++ hierarchical partitioning is not built")
    for key in ("zero_quantized_weights", "zero_quantized_gradients"):
        if key in z:
            only(f, f"zero_optimization.{key}", z[key], (False,), "ZeRO++ quantized communication is not built")


def _logging(ds: dict, m: Merge) -> None:
    f = m.fname
    for block, off_field in (("tensorboard", "logging.no_tensorboard"), ("csv_monitor", "logging.no_csv")):
        if block not in ds:
            continue  # megazero's default (both on) stays
        b = ds[block]
        enabled = b.get("enabled")
        if enabled is None:
            m.default(off_field, True)  # DeepSpeed's default: disabled
        elif enabled != AUTO:
            m.set(off_field, not enabled, f"{block}.enabled {fmt(enabled)}")
        out = b.get("output_path")
        if given(out) and enabled is not False:
            job = b.get("job_name")
            path = str(Path(out) / (job if given(job) else "DeepSpeedJobName"))
            if block == "tensorboard":
                m.set("logging.tensorboard_dir", path, f"tensorboard.output_path/job_name {fmt(path)}")
            elif m.base.logging.output_dir is None:  # CSVs live in the run directory: only if nothing names one
                m.default("logging.output_dir", path)
    if "wandb" in ds:
        only(f, "wandb.enabled", ds["wandb"].get("enabled", False), (False,),
              "megazero logs to TensorBoard and CSV only")
    if "comms_logger" in ds:
        v = ds["comms_logger"].get("enabled")
        if given(v):
            m.set("logging.log_comm", v, f"comms_logger.enabled {fmt(v)}")
    for key, target in (("wall_clock_breakdown", "logging.wall_clock_breakdown"),
                        ("memory_breakdown", "logging.log_memory"), ("steps_per_print", "training.log_interval"),
                        ("gradient_clipping", "optimizer.clip_grad")):
        v = ds.get(key)
        if given(v):
            m.set(target, float(v) if key == "gradient_clipping" else v, f"{key} {fmt(v)}")




def _activation_checkpointing(ds: dict, m: Merge) -> None:
    """DeepSpeed configures how checkpointed layer inputs are kept; the model code decides what is
    checkpointed. Here: partition_activations / cpu_checkpointing turn on full recomputation (uniform,
    1 layer per checkpoint) unless the flags choose it, since they only apply to it; with tp 1
    partition_activations has nothing to split across and is ignored, as DeepSpeed does at mp 1."""
    if "activation_checkpointing" not in ds:
        return
    a, f = ds["activation_checkpointing"], m.fname
    where = "activation_checkpointing"
    if m.value("parallel.tensor_model_parallel_size") == 1:  # DeepSpeed ignores partitioning at mp 1
        a = {k: v for k, v in a.items() if k != "partition_activations"}
    for key, target in (("partition_activations", "activation.distribute_saved_activations"),
                        ("cpu_checkpointing", "activation.cpu_offload_activations"),
                        ("synchronize_checkpoint_boundary", "activation.synchronize_checkpoint_boundary")):
        v = a.get(key)
        if given(v):
            m.set(target, v, f"{where}.{key} {fmt(v)}")
    if a.get("partition_activations") is True or a.get("cpu_checkpointing") is True:
        m.default("activation.recompute_granularity", "full")
    if "contiguous_memory_optimization" in a:
        only(f, f"{where}.contiguous_memory_optimization", a["contiguous_memory_optimization"], (False,),
             "each checkpointed input stays its own tensor in the caching allocator (DeepSpeed's contiguous "
             "buffer, a fragmentation workaround, is not built)")
    v = a.get("number_checkpoints")  # DeepSpeed sizes the contiguous buffer with it: nothing to size here
    if given(v) and (v != int(v) or v < 1):
        raise ConfigError(f"{f}: {where}.number_checkpoints must be a whole number >= 1 (or null), got {fmt(v)}")
    if "profile" in a:
        only(f, f"{where}.profile", a["profile"], (False,),
             "per-checkpoint timing is not built; --wall-clock-breakdown times forward-backward as a whole")


def _communication(ds: dict, m: Merge) -> None:
    f = m.fname
    if "prescale_gradients" in ds:
        only(f, "prescale_gradients", ds["prescale_gradients"], (False,),
              "megazero averages gradients after the reduction")
    if "gradient_predivide_factor" in ds:
        only(f, "gradient_predivide_factor", ds["gradient_predivide_factor"], (1, 1.0),
              "megazero averages gradients after the reduction")
    v = ds.get("communication_data_type")
    if not given(v):
        return  # null: megazero's default (fp32) or --grad-reduce-dtype; "auto": the same
    dtype = _COMM_DTYPES.get(v.lower())
    if dtype == "fp32":
        m.set("zero.grad_reduce_dtype", "fp32", f"communication_data_type {fmt(v)}")
        return
    model = m.value("precision.params_dtype")  # the flag (--fp16/--bf16), else the fp16/bf16 block
    if dtype != model:
        raise ConfigError(f"{f}: communication_data_type {fmt(v)} is not supported with model dtype {model}: "
                          f"megazero reduces gradients in fp32 or in the model dtype; use \"fp32\""
                          + (f" or \"{model}\"" if model != "fp32" else ""))
    m.set("zero.grad_reduce_dtype", "model", f"communication_data_type {fmt(v)} (the model dtype)")


def apply_mappings(ds: dict, m: Merge) -> None:
    """Every block of the checked file `ds` into `m`, in dependency order."""
    _batch(ds, m)
    _precision(ds, m)  # before communication: communication_data_type must match the model dtype
    optimizer(ds, m)  # before the scheduler: WarmupCosineLR's ratios apply to the resolved lr
    scheduler(ds, m)
    _zero(ds, m)
    _logging(ds, m)
    _activation_checkpointing(ds, m)
    _communication(ds, m)
