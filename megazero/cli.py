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
`--model-size NAME` expands a preset (megazero/presets.py) into the defaults the other flags apply over.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections import defaultdict

from megazero.config import RunConfig, field_requirement, show_value
from megazero.errors import ConfigError, exit_with_error
from megazero.flags import FLAG_GROUPS
from megazero.presets import canonical_name, preset

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

    for title, flags in FLAG_GROUPS:  # megazero/flags.py: the one table of flags
        g = p.add_argument_group(title)
        for f in flags:
            g.add_argument(*f.names, dest=f.dest, **f.kwargs)
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


# Flags for one optimizer's own hyperparameters: with the other optimizer they would change nothing.
_OPTIMIZER_OWN_FLAGS = {"optimizer.adam_beta1": "adam", "optimizer.adam_beta2": "adam", "optimizer.adam_eps": "adam",
                        "optimizer.sgd_momentum": "sgd"}


def _check_optimizer_flags(given: dict, cfg: RunConfig) -> None:
    """--adam-* apply to Adam only, --sgd-momentum to SGD only (the optimizer may come from the ds_config)."""
    kind = cfg.optimizer.optimizer_type
    for dest, owner in _OPTIMIZER_OWN_FLAGS.items():
        if dest in given and owner != ("sgd" if kind == "sgd" else "adam"):
            raise ConfigError(f"{_shown(*given[dest])} applies only to --optimizer {owner}, and this run's optimizer "
                              f"is {kind}; drop {given[dest][0]} or make the optimizer {owner}")


def _preset_base(model_size: str | None) -> RunConfig:
    """The defaults the flags apply over: RunConfig's, with --model-size's preset expanded into the model
    section (so any model flag given overrides the preset's value, and a ds_config merges over it too)."""
    if model_size is None:
        return RunConfig()
    name = canonical_name(model_size)
    return RunConfig().replace(model={**preset(name), "model_size": name})


def parse_args(argv: list[str] | None = None, rank: int = 0) -> RunConfig:
    ns = vars(build_parser(rank).parse_args(argv))
    given = ns.pop(_GIVEN, {})  # dest -> (option as typed, action, value)
    ds_config = ns.pop("_ds.config", None)
    sections: dict[str, dict] = defaultdict(dict)
    for dest, value in ns.items():
        section, name = dest.split(".", 1)
        sections[section][name] = value
    if sections["model"].get("attention_backend") in ("flash", "local"):  # Megatron's names for ours
        sections["model"]["attention_backend"] = {"flash": "sdpa", "local": "unfused"}[
            sections["model"]["attention_backend"]]
    if "rope_scaling_factor" in sections["model"]:  # a factor asks for the scaling (Megatron also wants the switch)
        sections["model"]["use_rope_scaling"] = True
    if "optimizer_type" in sections["optimizer"]:  # Megatron's --optimizer adam is AdamW
        kind = sections["optimizer"]["optimizer_type"]
        sections["optimizer"]["optimizer_type"] = {"adam": "adamw", "adamw": "adamw", "sgd": "sgd"}[kind]
    base = _preset_base(sections["model"].pop("model_size", None))
    if ds_config is not None:
        from megazero.ds_config import apply_ds_config

        cfg = apply_ds_config(ds_config, cli_sections=dict(sections), base=base)
    else:
        cfg = base.replace(**sections)
    _check_loss_scale_flags(given, cfg)
    _check_optimizer_flags(given, cfg)
    cfg.check_fields()
    return cfg
