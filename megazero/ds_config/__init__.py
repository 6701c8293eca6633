"""DeepSpeed `ds_config.json` -> RunConfig (DESIGN.md principle 7: one typed config, validated once).

`apply_ds_config(path, cli_sections)` reads the file once, checks every key against a schema (unknown
keys are refused with the nearest valid key; DeepSpeed itself ignores them silently), maps each key
onto a RunConfig field, and merges with the command-line flags. docs/ds_config.md has the full table.

  schema.py     the accepted keys, loading the file, JSON type checks, unknown/refused keys;
  merge.py      flag/file/default precedence (`Merge`), disagreements as one-line errors;
  mapping.py    batch sizes, fp16/bf16, zero_optimization, monitors, communication -> RunConfig fields;
  optimizer.py  the optimizer and scheduler blocks -> OptimizerConfig.
Cross-field checks (batch sizes vs world size, offload stage and NVMe path, ...) stay in
RunConfig.validate, which the caller runs once the world size is known.
"""

from __future__ import annotations

from pathlib import Path

from megazero.config import RunConfig
from megazero.ds_config.mapping import apply_mappings
from megazero.ds_config.merge import Merge
from megazero.ds_config.schema import (
    AUTO,
    REFUSED,
    SCHEDULER_PARAMS,
    SCHEMA,
    check,
    load,
)

__all__ = ["AUTO", "REFUSED", "SCHEDULER_PARAMS", "SCHEMA", "apply_ds_config"]


def apply_ds_config(path: str | Path, cli_sections: dict[str, dict] | None = None,
                    base: RunConfig | None = None) -> RunConfig:
    """RunConfig from a DeepSpeed config file and the flags the user gave (`{section: {field: value}}`).

    Raises ConfigError (one line) for a missing/invalid file, an unknown key (with the nearest valid
    one), a wrong type, a refused setting, or a flag that disagrees with the file. Cross-field checks
    that need the world size are left to RunConfig.validate."""
    path = Path(path)
    ds = check(path.name, load(path), SCHEMA)
    m = Merge(path.name, base or RunConfig(), {k: dict(v) for k, v in (cli_sections or {}).items()})
    apply_mappings(ds, m)
    return m.result()
