"""The on-disk checkpoint format: topology-independent, checksummed, committed atomically.

    SAVE/latest                       "iter_0000100\\n" (replaced by rename, after the commit)
    SAVE/iter_0000100/index.json      what is where: tensors, files + sha256, trainer state, config
    SAVE/iter_0000100/rank00003.safetensors   the pieces rank 3 owned when it saved

Every stored tensor has a *global* identity "kind/name": kind is `model` (values in the model dtype),
`master` (fp32 master weights; omitted when the model is fp32: the values are the masters), or one
of the per-parameter state tensors the run's update rule declares (optim/update_rules.py; Adam:
`exp_avg`, `exp_avg_sq`; SGD: `momentum_buffer`; the index's state.optimizer lists them); name is the
layout-independent parameter name
(`layers.7.mlp.dense_h_to_4h.weight`: layer numbers are global). The index gives each tensor's global
(logical, unpadded) shape and its *pieces*: a piece is a flat range [lo, hi) of the row-major
flattening of a rectangular *region* of the global tensor (start/stop per dim). That is exactly what a
rank owns under tp x ZeRO: the region is its tensor-parallel slice, the flat range its ZeRO fragment,
so saving needs no communication and any layout reads the regions it needs (`CheckpointReader.read`).
Regions may reach past the logical shape (vocabulary padding rows, always zero); readers clip.

Why safetensors + JSON rather than torch.distributed.checkpoint: the files are plain, memory-mappable
and readable without torch.distributed (tools, Hugging Face export), the index is human-readable,
loading reads exactly the slices a rank needs, and the format is ours to keep stable (a version
number; documented in docs/checkpoints.md).

Commit protocol (`commit`): ranks write into `iter_N.partial/` (each fsyncs its file), rank 0 writes
index.json, fsyncs, renames the folder to `iter_N`, fsyncs SAVE, then replaces `latest` by
rename. A crash at any moment leaves the previous checkpoint and a `latest` naming a complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megazero.errors import ConfigError
from megazero.fileio import atomic_open

FORMAT_NAME, FORMAT_VERSION = "megazero-checkpoint", 1
INDEX, LATEST = "index.json", "latest"
LOCK = ".megazero-save.lock"  # held by rank 0 of the run saving into the folder (checkpoint/lock.py)
PARAM_KINDS = ("model", "master")  # every checkpoint's; the optimizer's state kinds follow (optimizer_of)
ADAM_STATE = ("exp_avg", "exp_avg_sq")  # what checkpoints written before state.optimizer existed hold


class CheckpointError(ConfigError):
    """A checkpoint that cannot be used as asked (one line naming the file and the problem)."""


def optimizer_of(index: dict) -> dict:
    """The optimizer whose state a checkpoint holds: {"type": update rule name or None (no state, e.g. a
    Hugging Face import), "state": [declared state names]}. Checkpoints from before the field: the
    configured Adam variant with its two moments."""
    saved = index.get("state", {}).get("optimizer")
    if saved is not None:
        return saved
    return {"type": index.get("config", {}).get("optimizer", {}).get("optimizer_type", "adamw"),
            "state": list(ADAM_STATE)}


def kinds_of(index: dict) -> list[str]:
    """The tensor kinds a checkpoint may hold, in display order: model, master, the optimizer's state."""
    return [*PARAM_KINDS, *optimizer_of(index)["state"]]


# how a run selects each update rule, for the refusal's hint
_SELECT = {"adamw": "--optimizer adam", "sgd": "--optimizer sgd",
           "adam_l2": "a ds_config optimizer of type Adam with adam_w_mode false"}


def check_optimizer_state(index: dict, mine: dict, where: Path) -> None:
    """A checkpoint's optimizer state must be this run's update rule's ({"type", "state"}: the rule's
    identity): another rule's is a one-line CheckpointError naming both and the way out."""
    saved = optimizer_of(index)
    if (saved["type"], list(saved["state"])) == (mine["type"], list(mine["state"])):
        return

    def shown(o: dict) -> str:
        return f"{o['type']} ({', '.join(o['state']) or 'no state'})"
    if saved["type"] == mine["type"]:  # e.g. SGD without momentum keeps no buffer
        hint = "resume with the settings it was saved with (--sgd-momentum 0 keeps no momentum buffer)"
    else:
        hint = f"resume with {_SELECT.get(saved['type'], 'the optimizer it was saved with')}"
    raise CheckpointError(f"{where}: the checkpoint holds the state of optimizer {shown(saved)}, this run uses "
                          f"{shown(mine)}; {hint}, or pass --no-load-optim to load the weights and start "
                          f"{mine['type']} from fresh state")


def iteration_dirname(iteration: int) -> str:
    return f"iter_{iteration:07d}"


def rank_filename(rank: int) -> str:
    return f"rank{rank:05d}.safetensors"


@dataclass(frozen=True)
class Piece:
    """Elements [lo, hi) of region[start:stop] (row-major) of a global tensor, stored under `key`."""
    file: str
    key: str
    start: tuple[int, ...]
    stop: tuple[int, ...]
    lo: int
    hi: int

    def to_json(self) -> dict:
        return {"file": self.file, "key": self.key, "start": list(self.start), "stop": list(self.stop),
                "flat": [self.lo, self.hi]}

    @staticmethod
    def from_json(d: dict) -> "Piece":
        return Piece(d["file"], d["key"], tuple(d["start"]), tuple(d["stop"]), d["flat"][0], d["flat"][1])


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_rank_file(folder: Path, rank: int, tensors: dict[str, torch.Tensor]) -> dict:
    """Write one rank's pieces; fsync; return {"name", "sha256", "bytes"} for the index."""
    path = folder / rank_filename(rank)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path),
              metadata={"format": FORMAT_NAME})
    os.chmod(path, 0o644)  # safetensors creates 0600; checkpoints are read by tools and other users
    with open(path, "rb") as f:
        os.fsync(f.fileno())
    return {"name": path.name, "sha256": sha256_of(path), "bytes": path.stat().st_size}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def partial_dir(save: Path, iteration: int) -> Path:
    return save / (iteration_dirname(iteration) + ".partial")


def prepare_partial(save: Path, iteration: int) -> Path:
    """Rank 0, before anyone writes: a fresh `iter_N.partial/` (a stale one from a crash is removed)."""
    save.mkdir(parents=True, exist_ok=True)
    folder = partial_dir(save, iteration)
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir()
    return folder


def commit(save: Path, iteration: int, index: dict, keep_last: int | None) -> Path:
    """Rank 0, after every rank's file is written: index, rename into place, then `latest`, then prune."""
    folder = partial_dir(save, iteration)
    with atomic_open(folder / INDEX, "w") as f:
        json.dump(index, f, indent=1, sort_keys=True)
    _fsync_dir(folder)
    final = save / iteration_dirname(iteration)
    old = None
    if final.exists():  # saving the same iteration again (e.g. after a resume): swap, then drop the old
        old = save / (final.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(folder, final)
    _fsync_dir(save)
    with atomic_open(save / LATEST, "w") as f:
        f.write(final.name + "\n")
    _fsync_dir(save)
    if old is not None:
        shutil.rmtree(old)
    if keep_last:
        committed = sorted(p for p in save.glob("iter_???????") if p.is_dir())
        for stale in committed[:-keep_last]:
            if stale != final:
                shutil.rmtree(stale)
    return final


_NAME = re.compile(r"iter_\d{7}")


def read_latest(save: Path) -> str:
    """The checkpoint name `SAVE/latest` holds ("iter_0000100"); a one-line CheckpointError for anything
    else (binary garbage, a path, several lines)."""
    latest = save / LATEST
    try:
        raw = latest.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{latest}: unreadable ({err.strerror or err})") from None
    text = raw.decode("ascii", errors="replace").strip()
    if not _NAME.fullmatch(text):
        shown = repr(raw[:40]) + ("..." if len(raw) > 40 else "")
        raise CheckpointError(f"{latest}: corrupted: it must hold one checkpoint name like iter_0000100, but holds "
                              f"{shown}; write the name of a complete iter_* folder into it, or name that folder "
                              f"itself instead")
    return text


def committed_checkpoints(save: Path) -> list[Path]:
    """`iter_N` folders of SAVE whose index.json exists (renamed into place by a commit), oldest first."""
    return sorted(p for p in save.glob("iter_???????") if _NAME.fullmatch(p.name) and (p / INDEX).is_file())


def interrupted_saves(save: Path) -> list[Path]:
    """`iter_N.partial` folders: saves that never reached their commit (never loaded, safe to remove)."""
    return sorted(p for p in save.glob("iter_???????.partial") if p.is_dir())


def _leftover(p: Path) -> bool:
    """What a save folder may hold besides checkpoints: the run lock, interrupted saves, a checkpoint
    swapped out by a re-save of its iteration (`.old`), temp files of an atomic write."""
    return (p.name == LOCK or (p.name.startswith("." + LATEST + ".") and p.name.endswith(".tmp"))
            or (p.is_dir() and p.name.startswith("iter_") and p.suffix in (".partial", ".old")))


def find_checkpoint(path: str | Path) -> tuple[Path | None, str | None]:
    """--load resolution: (the committed checkpoint folder to resume from, or None to start from
    scratch; a note to log, or None). Rules (docs/checkpoints.md):

    - a missing folder, or one holding nothing but leftovers (the run lock, interrupted `.partial`
      saves), has no checkpoint: start from scratch;
    - an `iter_N` folder (it has index.json) is that checkpoint;
    - otherwise `latest` names the checkpoint, which must be complete;
    - no `latest` but complete `iter_N` folders (a first save interrupted between its rename and
      writing `latest`, or folders copied without it): the newest of them;
    - anything else (a file, a folder of other things, a corrupted `latest`) is a one-line error."""
    path = Path(path)
    if not path.exists():
        return None, f"no checkpoint in {path}: starting from scratch"
    if not path.is_dir():
        raise CheckpointError(f"--load {path}: is a file, not a checkpoint folder; pass the --save folder of a run "
                              f"(or one of its iter_* folders), or a missing or empty folder to start from scratch")
    if (path / INDEX).is_file():
        return path, None
    if (path / LATEST).exists():
        name = read_latest(path)
        folder = path / name
        if (folder / INDEX).is_file():
            return folder, None
        swapped = path / (name + ".old")  # a re-save of the same iteration died between its two renames
        if (swapped / INDEX).is_file():
            return swapped, f"{path}: '{LATEST}' names {name}, found as {swapped.name} (a re-save of that iteration " \
                            f"was interrupted): resuming from it"
        raise CheckpointError(f"--load {path}: '{LATEST}' names {name}, which is missing or incomplete ({folder / INDEX} "
                              f"not found)")
    committed = committed_checkpoints(path)
    if committed:
        return committed[-1], (f"{path} has no '{LATEST}' file (a first save interrupted before writing it, or "
                               f"folders copied without it): resuming from the newest complete checkpoint "
                               f"{committed[-1].name}")
    others = [p.name for p in path.iterdir() if not _leftover(p)]
    if others:
        raise CheckpointError(f"--load {path}: not a checkpoint folder (no '{LATEST}' and no {INDEX}; it holds "
                              f"{', '.join(sorted(others)[:3])}{', ...' if len(others) > 3 else ''}); pass the --save "
                              f"folder of a run, or a missing or empty folder to start from scratch")
    partials = interrupted_saves(path)
    if partials:
        return None, (f"no checkpoint in {path}, only the interrupted save {', '.join(p.name for p in partials)} "
                      f"(never committed): starting from scratch")
    return None, f"no checkpoint in {path}: starting from scratch"


def resolve_checkpoint(path: str | Path) -> Path:
    """The committed checkpoint folder --load PATH names (find_checkpoint); an error when there is none."""
    folder, _ = find_checkpoint(path)
    if folder is None:
        path = Path(path)
        raise CheckpointError(f"--load {path}: " + ("no such folder" if not path.exists() else
                                                      f"not a checkpoint folder (empty, or only interrupted saves: "
                                                      f"no '{LATEST}' and no {INDEX})"))
    return folder


def remove_interrupted_saves(save: Path) -> list[Path]:
    """Rank 0, holding the save lock: delete `iter_N.partial` folders (saves that never committed)."""
    removed = interrupted_saves(save)
    for p in removed:
        shutil.rmtree(p, ignore_errors=True)
    return removed


RESUME_KEYS = (("iteration", int), ("layout", dict), ("config", dict), ("state", dict))


def read_index(folder: Path, resume: bool = False) -> dict:
    """A checkpoint's index.json, checked: format, version, the tables every reader uses, and with
    `resume` what a training run resumes from (iteration, layout, config, trainer state)."""
    try:
        index = json.loads((folder / INDEX).read_text())
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{folder / INDEX}: unreadable checkpoint index ({err})") from None
    if not isinstance(index, dict):
        raise CheckpointError(f"{folder / INDEX}: not a {FORMAT_NAME} index (a JSON {type(index).__name__})")
    if index.get("format") != FORMAT_NAME or index.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder / INDEX}: not a {FORMAT_NAME} v{FORMAT_VERSION} index "
                              f"(format {index.get('format')!r}, version {index.get('version')!r})")
    bad = [key for key, kind in (*(RESUME_KEYS if resume else ()), ("tensors", dict), ("files", dict))
           if not isinstance(index.get(key), kind)]
    if bad:
        raise CheckpointError(f"{folder / INDEX}: malformed checkpoint index (missing or bad {', '.join(bad)})")
    return index


def check_file(folder: Path, name: str, meta: dict | None, verify: bool = True) -> None:
    """A checkpoint file is present with the size (and, if verify, the sha256) its index records."""
    path = folder / name
    if meta is None or not path.is_file():
        raise CheckpointError(f"{path}: missing checkpoint file")
    if path.stat().st_size != meta["bytes"]:
        raise CheckpointError(f"{path}: truncated or resized ({path.stat().st_size} bytes, index says "
                              f"{meta['bytes']})")
    if verify and sha256_of(path) != meta["sha256"]:
        raise CheckpointError(f"{path}: checksum mismatch (sha256 differs from {folder / INDEX}): the file is "
                              f"corrupted")


class CheckpointReader:
    """Reads regions of global tensors from a committed checkpoint, verifying each file's sha256
    the first time it is opened."""

    def __init__(self, folder: Path, verify: bool = True):
        self.folder, self.verify = Path(folder), verify
        self.index = read_index(self.folder)
        self.tensors = {name: {"shape": tuple(t["shape"]), "dtype": t["dtype"],
                               "pieces": [Piece.from_json(p) for p in t["pieces"]]}
                        for name, t in self.index["tensors"].items()}
        self._handles: dict[str, object] = {}
        self._cached: tuple | None = None  # (tensor name, region) -> assembled region

    def _file(self, name: str):
        if name not in self._handles:
            path = self.folder / name
            check_file(self.folder, name, self.index["files"].get(name), self.verify)
            try:
                self._handles[name] = safe_open(str(path), framework="pt")
            except Exception as err:  # safetensors raises its own error types for a bad header
                raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None
        return self._handles[name]

    def get(self, file: str, key: str) -> torch.Tensor:
        return self._file(file).get_tensor(key)

    def has(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return self.tensors[name]["shape"]

    def read(self, name: str, start: tuple[int, ...], stop: tuple[int, ...]) -> torch.Tensor:
        """Global tensor `name`'s region [start, stop) (clipped parts outside the stored logical shape
        come back as zeros), assembled from whichever pieces the saving layout wrote."""
        entry = self.tensors.get(name)
        if entry is None:
            raise CheckpointError(f"{self.folder / INDEX}: no tensor {name!r} in this checkpoint")
        dtype = getattr(torch, entry["dtype"])
        out = torch.zeros([b - a for a, b in zip(start, stop)], dtype=dtype)
        regions: dict[tuple, list[Piece]] = {}
        for p in entry["pieces"]:
            regions.setdefault((p.start, p.stop), []).append(p)
        for (r_start, r_stop), pieces in regions.items():
            lo = [max(a, b) for a, b in zip(start, r_start)]
            hi = [min(a, b, s) for a, b, s in zip(stop, r_stop, entry["shape"])]
            if any(a >= b for a, b in zip(lo, hi)):
                continue
            region = self._region(name, r_start, r_stop, pieces, dtype)
            src = region[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, r_start))]
            out[tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))] = src
        return out

    def _region(self, name, r_start, r_stop, pieces, dtype) -> torch.Tensor:
        key = (name, r_start, r_stop)
        if self._cached is not None and self._cached[0] == key:
            return self._cached[1]
        shape = [b - a for a, b in zip(r_start, r_stop)]
        numel = 1
        for s in shape:
            numel *= s
        flat = torch.empty(numel, dtype=dtype)
        covered = 0
        for p in sorted(pieces, key=lambda p: p.lo):
            flat[p.lo:p.hi] = self.get(p.file, p.key).reshape(-1)
            covered += p.hi - p.lo
        if covered != numel:
            raise CheckpointError(f"{self.folder / INDEX}: pieces of {name} region {list(r_start)}-{list(r_stop)} "
                                  f"cover {covered} of {numel} elements")
        region = flat.view(shape)
        self._cached = (key, region)
        return region
