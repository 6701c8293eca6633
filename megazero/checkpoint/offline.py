"""Writing a checkpoint offline exactly as a given (tp, pp, vp, dp, cp, ZeRO) layout would save it:
`plan_layout` lists every piece each rank of that layout owns (the trainer's own bucket code run on
meta tensors), `write_layout` writes them with the atomic commit of format.py. Used by
tools/convert_checkpoint.py (offline resharding, Hugging Face import). docs/checkpoint_tools.md.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from torch import nn

from megazero.checkpoint.format import (FORMAT_NAME, FORMAT_VERSION, PARAM_KINDS, CheckpointError, Piece, commit,
                                        partial_dir, prepare_partial, rank_filename, sha256_of, write_rank_file)
from megazero.checkpoint.api import build_gpt, single_process_group
from megazero.checkpoint.state import _logical_shape, _region, writes_fragment
from megazero.config import RunConfig
from megazero.model.parts import check_parts
from megazero.pipeline_parallel.partition import layers_of_config
from megazero.tensor_parallel.sharding import get_shard_spec, set_shard_spec

@dataclass(frozen=True)
class PlannedPiece:
    """One piece a rank of the planned layout saves: parameter `name`'s region [start, stop) (its TP
    slice) and flat range [lo, hi) of it (its ZeRO fragment); `shape` is the global logical shape."""
    rank: int
    name: str
    shape: tuple[int, ...]
    start: tuple[int, ...]
    stop: tuple[int, ...]
    lo: int
    hi: int


def validate_layout(cfg: RunConfig, dp: int) -> None:
    """The layout checks a run of `cfg` on tp x cp x pp x dp ranks would make (ConfigError, one line)."""
    from megazero.errors import ConfigError
    from megazero.topology import GridShape

    p, m = cfg.parallel, cfg.model
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp), ("vp", cfg.virtual_pipeline_size())):
        if value < 1:
            raise ConfigError(f"--target-{name} must be >= 1, got {value}")
    cp = p.context_parallel_size
    GridShape(tp * cp * pp * dp, tp=tp, pp=pp, cp=cp)
    check_parts(m)  # head dim, query groups, rope dims (as validation.validate)
    if m.num_attention_heads % tp:
        raise ConfigError(f"--target-tp {tp}: the model's {m.num_attention_heads} attention heads are not divisible "
                          f"by {tp}; choose a tp that divides {m.num_attention_heads}")
    groups = m.query_groups
    if (groups >= tp and groups % tp) or (groups < tp and tp % groups):
        raise ConfigError(f"--target-tp {tp}: the model's {groups} key/value groups and tp {tp}: one must divide "
                          f"the other (each rank holds whole groups, or a group is shared by tp / groups ranks)")
    if m.ffn_size % tp:
        raise ConfigError(f"--target-tp {tp}: the model's ffn hidden size {m.ffn_size} is not divisible by {tp}")
    if cfg.zero.stage not in (0, 1, 2, 3):
        raise ConfigError(f"--target-zero-stage must be 0, 1, 2 or 3, got {cfg.zero.stage}")
    layers_of_config(cfg)  # layers divisible by pp x vp (or the first/last stage counts)


def plan_layout(cfg: RunConfig, dp: int) -> list[PlannedPiece]:
    """Every piece a run of `cfg` on tp x cp x pp x dp ranks saves (state.save_checkpoint's rules), in
    rank order and, per rank, in its optimizer's fragment order: the same files, regions and flat ranges.
    ZeRO shards over dp x cp (cfg's context_parallel_size; the pieces themselves do not depend on it).

    Each pipeline rank's chunks are built at tp=1 on the meta device (no memory), then every parameter
    is swapped for a meta tensor of its target tp slice's shape, so the trainer's own ZeRO code
    (engine.build_layout) lays the buckets out."""
    from megazero.pipeline_parallel.partition import chunk_layer_ranges, virtual_stage
    from megazero.topology import Coords, GridShape, coords_to_rank, dp_cp_index
    from megazero.zero.engine import build_layout

    p = cfg.parallel
    tp, pp, vp, stage = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, cfg.virtual_pipeline_size(), \
        cfg.zero.stage
    cp = p.context_parallel_size
    grid = GridShape(tp * cp * pp * dp, tp=tp, pp=pp, cp=cp)
    counts, last = layers_of_config(cfg), pp * vp - 1
    padded = cfg.model.padded_vocab_size(tp)
    plan: dict[int, list[PlannedPiece]] = {}
    with single_process_group() as group:
        for pp_rank in range(pp):
            # as training/model_builder.build_model_chunks: virtual stage 0 embeds, the last one has the
            # (tied) output layer; with pp > 1 the word embedding's ShardSpec (copied to the meta
            # parameters below) gives it a ZeRO bucket of its own
            chunks = []
            for c, layers in enumerate(chunk_layer_ranges(pp_rank, pp, counts)):
                v = virtual_stage(pp_rank, c, pp)
                chunks.append(build_gpt(cfg.model, group, layer_range=layers, pre_process=v == 0,
                                        post_process=v == last, device="meta"))
            slots = [(module, pname, get_shard_spec(param), f"{prefix}.{pname}" if prefix else pname)
                     for chunk in chunks for prefix, module in chunk.named_modules()
                     for pname, param in module.named_parameters(recurse=False)]
            for tp_rank in range(tp):
                names = {}
                for module, pname, spec1, name in slots:
                    shape = list(spec1.global_shape)
                    if spec1.tp_dim is not None and spec1.logical_size is not None:
                        shape[spec1.tp_dim] = padded  # the vocabulary padded for this tp
                    spec = spec1 if spec1.tp_dim is None else dataclasses.replace(
                        spec1, global_shape=tuple(shape), tp_rank=tp_rank, tp_size=tp)
                    param = nn.Parameter(torch.empty(spec.local_shape, device="meta"))
                    set_shard_spec(param, spec)
                    setattr(module, pname, param)
                    names[id(param)] = name
                layout = build_layout(chunks, cfg.zero, dp * cp)  # ZeroEngine's: shards over dp x cp
                for coords in (Coords(tp=tp_rank, cp=c, dp=d, pp=pp_rank) for d in range(dp) for c in range(cp)):
                    rank, shard = coords_to_rank(coords, grid), dp_cp_index(coords, grid)
                    for f in layout.fragments_of_rank(shard, whole=stage == 0):
                        if not writes_fragment(f.param, tp_rank, shard, stage):
                            continue  # written by another rank
                        spec = get_shard_spec(f.param)
                        start, stop = _region(spec)
                        plan.setdefault(rank, []).append(PlannedPiece(rank, names[id(f.param)], _logical_shape(spec),
                                                                      start, stop, f.param_lo, f.param_hi))
    return [piece for rank in sorted(plan) for piece in plan[rank]]


def read_full_region(full: torch.Tensor, start: tuple[int, ...], stop: tuple[int, ...]) -> torch.Tensor:
    """Region [start, stop) of an in-memory global tensor; parts past its shape are zeros (as
    CheckpointReader.read)."""
    out = torch.zeros([b - a for a, b in zip(start, stop)], dtype=full.dtype)
    hi = [min(b, s) for b, s in zip(stop, full.shape)]
    if all(a < b for a, b in zip(start, hi)):
        out[tuple(slice(0, b - a) for a, b in zip(start, hi))] = full[tuple(slice(a, b) for a, b in zip(start, hi))]
    return out


def write_layout(save: Path, index: dict, plan: list[PlannedPiece], tensors: dict[str, tuple[list[int], str]],
                 read: Callable[[str, tuple, tuple], torch.Tensor],
                 rng: dict[int, dict[str, torch.Tensor]] | None = None,
                 extra_files: Iterable[Path] = (), bar=None) -> Path:
    """Write a committed checkpoint `save`/iter_N (N = index["iteration"]) holding the planned pieces.

    index: everything but "tensors" and "files" ("rng" too: the caller's entries for `rng`, whose keys
    are ranks and values that rank's extra tensors, e.g. its RNG streams). tensors: "kind/name" ->
    (logical shape, dtype name) of every tensor to write; every parameter of the plan must have its
    `model/` entry and every entry a planned parameter. read(kind/name, start, stop): that region.
    extra_files are copied into the folder (a tokenizer). bar: a progress bar (tqdm), advanced once
    per planned piece. Atomic: written into iter_N.partial and
    committed (format.commit); on any error the partial folder (and `save`, if this call created it)
    is removed."""
    planned = {p.name: p.shape for p in plan}
    stored = {n.split("/", 1)[1]: (shape, n) for n, (shape, _) in tensors.items()}
    missing = sorted(set(planned) - {n.split("/", 1)[1] for n in tensors if n.startswith("model/")})
    extra = sorted(set(stored) - set(planned))
    if missing or extra:
        raise CheckpointError(f"the tensors do not match the model: missing {missing[:3]}, unexpected {extra[:3]}")
    for name, (shape, full_name) in stored.items():
        if tuple(shape) != tuple(planned[name]):
            raise CheckpointError(f"{full_name}: shape {list(shape)}, the model has {list(planned[name])}")
    iteration = index["iteration"]
    created = not save.exists()
    by_rank: dict[int, list[PlannedPiece]] = {}
    for piece in plan:
        by_rank.setdefault(piece.rank, []).append(piece)
    ranks = sorted(set(by_rank) | set(rng or {}))
    # model and master first, then whatever optimizer state the tensors carry (any update rule's names)
    state_kinds = sorted({n.split("/", 1)[0] for n in tensors} - set(PARAM_KINDS))
    kinds = [*PARAM_KINDS, *state_kinds]
    folder = prepare_partial(save, iteration)
    try:
        entries: dict[str, dict] = {}
        files: dict[str, dict] = {}
        for rank in ranks:
            fname, out = rank_filename(rank), {}
            for piece in by_rank.get(rank, []):
                for kind in kinds:
                    full_name = f"{kind}/{piece.name}"
                    if full_name not in tensors:
                        continue
                    key = f"{full_name}/{piece.lo}"
                    out[key] = read(full_name, piece.start, piece.stop).reshape(-1)[piece.lo:piece.hi].clone()
                    shape, dtype = tensors[full_name]
                    entry = entries.setdefault(full_name, {"shape": list(shape), "dtype": dtype, "pieces": []})
                    entry["pieces"].append(Piece(fname, key, piece.start, piece.stop, piece.lo, piece.hi).to_json())
                if bar is not None:
                    bar.update(1)
            out.update((rng or {}).get(rank, {}))
            if out:
                meta = write_rank_file(folder, rank, out)
                files[meta["name"]] = {"sha256": meta["sha256"], "bytes": meta["bytes"]}
        for path in extra_files:  # checksummed like the tensor files (a save records its tokenizer copy so)
            copied = folder / Path(path).name
            shutil.copyfile(path, copied)
            files[copied.name] = {"sha256": sha256_of(copied), "bytes": copied.stat().st_size}
        full_index = {**copy.deepcopy(index), "format": FORMAT_NAME, "version": FORMAT_VERSION,
                      "tensors": entries, "files": files}
        full_index.setdefault("rng", {})
        return commit(save, iteration, full_index, keep_last=None)
    except BaseException:
        shutil.rmtree(partial_dir(save, iteration), ignore_errors=True)
        if created:
            shutil.rmtree(save, ignore_errors=True)
        raise
