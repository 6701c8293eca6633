"""Merging the file's values with the command-line flags: the precedence rules.

Three layers, lowest first:
  1. `base` (RunConfig defaults);
  2. DeepSpeed's documented default for a key the file leaves out, only where that default changes
     the math (optimizer and scheduler parameters, batch-size derivation) -- a flag overrides it;
  3. values the file states (each within the range its RunConfig field declares), and the flags the user gave. These must agree: a field set by both to
     different values is a one-line ConfigError naming both (and the flag as the user spelled it).
     `"auto"` in the file means "the flag if given, else megazero's default".
`Merge` collects the file's (section, field) values as mapping.py produces them and builds the RunConfig.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from megazero.config import RunConfig, field_requirement
from megazero.ds_config.schema import fmt
from megazero.errors import ConfigError
from megazero.flags import spelled


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) \
            and not isinstance(b, bool):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


def _flag(section: str, field: str, value: Any) -> str:
    """How the user spelled a flag on the command line, e.g. `--micro-batch-size 4` or `--bf16`."""
    return spelled(section, field, value, fmt)


class Merge:
    """Collects (section, field) values from the file and checks them against the flags."""

    def __init__(self, fname: str, base: RunConfig, cli: dict[str, dict]):
        self.fname, self.base, self.cli = fname, base, cli
        self.file: dict[tuple[str, str], tuple[Any, str]] = {}  # value and the key that set it
        self.defaults: dict[tuple[str, str], Any] = {}  # DeepSpeed defaults of omitted keys
        self.forbidden: list[tuple[tuple[str, str], Any, str]] = []

    def set(self, target: str, value: Any, source: str) -> None:
        section, field = target.split(".")
        declared = {f.name: f for f in dataclasses.fields(getattr(self.base, section))}[field]
        problem = field_requirement(declared, value)  # the field's declared range (config.num), finite
        if problem:
            raise ConfigError(f"{self.fname}: {source} {problem}")
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
