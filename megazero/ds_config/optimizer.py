"""The `optimizer` and `scheduler` blocks -> OptimizerConfig (Adam/AdamW/SGD, DeepSpeed's lr schedules).

`optimizer` maps the Adam or SGD type and params, with the defaults of what DeepSpeed would construct
(FusedAdam, torch.optim.SGD) for omitted params; `scheduler` maps WarmupLR / WarmupDecayLR /
WarmupCosineLR onto megazero's warmup and decay fields (docs/ds_config.md derives the formulas). The
optimizer runs first: WarmupCosineLR's ratios are of the resolved lr.
"""

from __future__ import annotations

import json

from megazero.ds_config.merge import Merge
from megazero.ds_config.schema import (
    AUTO,
    SCHEDULER_PARAMS,
    check_optimizer_keys,
    fmt,
    given,
    nearest,
    only,
    optimizer_family,
)
from megazero.errors import ConfigError

# Omitted params take the defaults of what DeepSpeed would construct: its FusedAdam for Adam / AdamW, and
# for SGD (not one of DeepSpeed's own types) `torch.optim.SGD(params, **optimizer.params)`.
_DS_DEFAULTS = {"Adam": {"lr": 1e-3, "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8, "weight_decay": 0.0},
                "SGD": {"lr": 1e-3, "sgd_momentum": 0.0, "weight_decay": 0.0}}
# optimizer.params key -> the OptimizerConfig fields it sets
_PARAM_FIELDS = {"Adam": {"lr": ("lr",), "betas": ("adam_beta1", "adam_beta2"), "eps": ("adam_eps",),
                          "weight_decay": ("weight_decay",)},
                 "SGD": {"lr": ("lr",), "momentum": ("sgd_momentum",), "weight_decay": ("weight_decay",)}}
# torch.optim.SGD options megazero's SGD does not implement: accepted with their off value only.
_SGD_OFF = {"dampening": 0, "nesterov": False, "maximize": False}


def optimizer(ds: dict, m: Merge) -> None:
    if "optimizer" not in ds:
        return
    opt = ds["optimizer"]
    params = opt.get("params", {})
    kind = opt.get("type")
    if kind is None:
        raise ConfigError(f"{m.fname}: optimizer needs a \"type\" (Adam, AdamW or SGD)")
    w_mode = params.get("adam_w_mode")
    if kind == AUTO:  # the optimizer of --optimizer, else megazero's default (AdamW)
        family = "SGD" if m.value("optimizer.optimizer_type") == "sgd" else "Adam"
        check_optimizer_keys(m.fname, params, family, 'optimizer.type "auto": --optimizer, else adamw')
    else:
        family = optimizer_family(kind)
        if family is None:
            raise ConfigError(f"{m.fname}: optimizer.type {fmt(kind)} is not supported; megazero supports Adam, "
                              f"AdamW and SGD (case-insensitive)")
        if kind.lower() == "adamw" and w_mode is False:
            raise ConfigError(f"{m.fname}: optimizer.type AdamW with params.adam_w_mode false is contradictory "
                              f"(DeepSpeed silently uses AdamW); for Adam with L2 decay use type Adam")
        l2 = kind.lower() == "adam" and w_mode is False
        src = f"optimizer.type {fmt(kind)}" + (" with params.adam_w_mode false" if l2 else "")
        m.set("optimizer.optimizer_type", "sgd" if family == "SGD" else ("adam_l2" if l2 else "adamw"), src)
    if "bias_correction" in params:
        only(m.fname, "optimizer.params.bias_correction", params["bias_correction"], (True,),
              "megazero's Adam always corrects the moment bias")
    for key, off in _SGD_OFF.items():
        if key in params:
            only(m.fname, f"optimizer.params.{key}", params[key], (off,), f"megazero's SGD does not implement {key}")
    # Omitted params take DeepSpeed's (FusedAdam's, torch.optim.SGD's) defaults; "auto" takes the flag or
    # megazero's default.
    for key, targets in _PARAM_FIELDS[family].items():
        v = params.get(key)
        if v is None:
            for target in targets:
                m.default(f"optimizer.{target}", _DS_DEFAULTS[family][target])
            continue
        if v == AUTO:
            continue
        values = [float(b) for b in v] if key == "betas" else [float(v)]
        for target, value in zip(targets, values):  # ranges: the RunConfig field's (Merge.set)
            m.set(f"optimizer.{target}", value, f"optimizer.params.{key} {fmt(v)}")


def scheduler(ds: dict, m: Merge) -> None:
    if "scheduler" not in ds:
        return  # the schedule comes from the flags (Megatron-DeepSpeed style), not a constant lr
    sched = ds["scheduler"]
    kind, p = sched.get("type"), sched.get("params", {})
    if kind is None:
        raise ConfigError(f"{m.fname}: scheduler needs a \"type\" ({', '.join(SCHEDULER_PARAMS)})")
    if kind not in SCHEDULER_PARAMS:
        close = nearest(str(kind), list(SCHEDULER_PARAMS))
        hint = f" (did you mean {json.dumps(close)}?)" if close else ""
        raise ConfigError(f"{m.fname}: scheduler.type {fmt(kind)} is not supported; megazero maps "
                          f"{', '.join(SCHEDULER_PARAMS)}{hint}")
    f = m.fname
    if "last_batch_iteration" in p:
        only(f, "scheduler.params.last_batch_iteration", p["last_batch_iteration"], (-1,),
              "megazero resumes the schedule from the checkpoint's iteration")
    style = p.get("warmup_type")
    if style is None:
        m.default("optimizer.lr_warmup_style", "log")  # DeepSpeed's default
    elif style != AUTO:
        if style not in ("log", "linear"):
            raise ConfigError(f"{f}: scheduler.params.warmup_type must be \"log\" or \"linear\", got {fmt(style)}")
        m.set("optimizer.lr_warmup_style", style, f"scheduler.params.warmup_type {fmt(style)}")
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
    if given(total):
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
                raise ConfigError(f"{f}: scheduler.params.{key} must be in [0, 1], got {fmt(r)}")
            m.set(f"optimizer.{target}", r * lr, f"scheduler.params.{key} {fmt(r)} x lr {fmt(lr)} = {fmt(r * lr)}")
        return
    v = p.get("warmup_max_lr")
    if given(v):
        m.set("optimizer.lr", float(v), f"scheduler.params.warmup_max_lr {fmt(v)}")
    v = p.get("warmup_min_lr")
    # WarmupDecayLR decays back to warmup_min_lr; WarmupLR never decays (min_lr unused, kept <= lr).
    targets = ["optimizer.lr_warmup_init", "optimizer.min_lr"]
    if given(v):
        for target in targets if kind == "WarmupDecayLR" else targets[:1]:
            m.set(target, float(v), f"scheduler.params.warmup_min_lr {fmt(v)}")
        if kind == "WarmupLR":
            m.default("optimizer.min_lr", float(v))
    elif v is None:
        for target in targets:
            m.default(target, 0.0)
