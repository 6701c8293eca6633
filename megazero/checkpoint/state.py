"""Saving a running training into the checkpoint format (format.py) and loading one into any layout.

What is saved is a CheckpointSubject the trainer hands over: its TrainState (counters, loss scaler, RNG
streams), its ZeroEngine (export_state / import_state), the model chunks (names), topology and config.

Save: every rank writes the pieces it owns (its tensor-parallel region x its ZeRO fragment of each
parameter: model values, fp32 masters, the update rule's state), skipping copies another rank writes (TP-
replicated parameters: tp rank 0; stage 0: dp x cp rank 0; the tied embedding copy on the last stage);
the dp x cp rank 0 of each (pp, tp) adds its RNG streams. ZeRO shards over dp x cp (context-parallel
ranks replicate the parameters), so the shard owner is the dp_cp rank, and nothing saved depends on
cp: the pieces are regions and flat ranges of global tensors, which any layout, any cp, reads. Rank 0
gathers the piece lists, writes the index and commits. No tensor travels between ranks. Each phase
ends with the ranks agreeing on errors: a write that fails anywhere (full disk: checked up front
against the checkpoint's size, and caught when it happens) is one CheckpointSaveError on every rank,
the partial folder removed, `latest` unchanged.

Load: every rank reads, for each fragment it owns in *its* layout, the tensor-parallel region of the
global tensor and keeps its flat range; stages 1-2 then all-gather the parameter buffer as after a
step (ZeroEngine.import_state). The TrainState's counters, loss scaler and (same tp/pp/vp only) RNG
streams are restored too. The index records which update rule's state it holds (state.optimizer);
loading it into a run of another rule is refused unless the optimizer state is not loaded.
"""

from __future__ import annotations

import functools
import dataclasses
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError

import megazero
from megazero import comm
from megazero.checkpoint.format import (FORMAT_NAME, FORMAT_VERSION, CheckpointError, CheckpointReader, Piece,
                                        commit, iteration_dirname, partial_dir, prepare_partial, rank_filename,
                                        check_optimizer_state, sha256_of, write_rank_file)
from megazero.data.tokenizer_types import build_tokenizer, tokenizer_record, write_tokenizer_files
from megazero.errors import DataError
from megazero.optim.train_state import TrainState
from megazero.tensor_parallel.sharding import ShardSpec, counts_toward_norm, get_shard_spec
from megazero.topology import Topology
from megazero.zero.engine import ZeroEngine

# model fields that must agree between a checkpoint and the run loading it
# (the sequence length may change between runs, up to max positions)
SHAPE_FIELDS = ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "vocab_size",
                "max_position_embeddings")


def _region(spec: ShardSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """This rank's tensor-parallel slice of the global tensor, as start/stop per dim."""
    start = [0] * len(spec.global_shape)
    stop = list(spec.global_shape)
    if spec.tp_dim is not None:
        start[spec.tp_dim] = spec.offset
        stop[spec.tp_dim] = spec.offset + spec.local_shape[spec.tp_dim]
    return tuple(start), tuple(stop)


def _logical_shape(spec: ShardSpec) -> list[int]:
    shape = list(spec.global_shape)
    if spec.tp_dim is not None and spec.logical_size is not None:
        shape[spec.tp_dim] = spec.logical_size
    return shape


def writes_fragment(param, tp_rank: int, replica_rank: int, stage: int) -> bool:
    """Whether the rank at tensor-parallel rank `tp_rank` and ZeRO shard index `replica_rank` (its rank
    in the dp x cp group: Topology.dp_cp_rank) saves its fragment of `param`: each element once. Copies
    are skipped like in the grad norm (TP-replicated: tp rank 0; the tied embedding's copy: its owner),
    and at stage 0, where every dp x cp replica holds everything, replica 0 writes."""
    return counts_toward_norm(param, tp_rank) and (stage > 0 or replica_rank == 0)


@dataclass
class CheckpointSubject:
    """What a checkpoint saves and restores, as the trainer hands it over (Trainer.checkpoint_subject()):
    the loop's TrainState, the ZeRO engine (export_state / import_state), the model chunks (parameter
    names), the topology and the config; checkpoint code reads nothing else of the trainer."""
    state: TrainState
    engine: ZeroEngine
    chunks: list  # this rank's model chunks (nn.Module), for the parameters' global names
    topo: Topology
    cfg: object  # the RunConfig
    tokenizer_model: Path | str | None = None  # copied into the checkpoint (Hugging Face export)


def _param_names(subject: CheckpointSubject) -> dict[int, str]:
    return {id(p): name for chunk in subject.chunks for name, p in chunk.named_parameters()}


def layout_dict(cfg, dp: int) -> dict:
    """The index's "layout": what a run of `cfg` on dp data-parallel ranks saves from (offline writers too).
    A record only: loading reads the pieces' regions, whatever tp, pp, dp or cp wrote them."""
    p, z = cfg.parallel, cfg.zero
    tp, pp, cp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, p.context_parallel_size
    return {"world": tp * cp * pp * dp, "tp": tp, "pp": pp, "vp": cfg.virtual_pipeline_size(), "dp": dp, "cp": cp,
            "zero_stage": z.stage, "params_dtype": cfg.precision.params_dtype,
            "offload_optimizer": z.offload_optimizer, "offload_param": z.offload_param}


def describe_cp(layout: dict) -> str:
    """" cp2" for a layout saved with context parallelism, "" otherwise (and for indexes before cp)."""
    return f" cp{layout['cp']}" if layout.get("cp", 1) > 1 else ""


# ----- save ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _tokenizer_copy(kind: str, path: str, stamp: tuple) -> tuple[dict, dict | None]:
    """({file name: source path or content}, the index's "tokenizer" entry) of the run's tokenizer, loaded
    once per process (stamp: the file's mtime and size, so a replaced file is read again)."""
    try:
        tok = build_tokenizer(kind, path)
    except DataError:  # gone or unreadable since start-up: save without it, as when there is none
        return {}, None
    files = tok.checkpoint_files()
    return files, tokenizer_record(tok, files)


def tokenizer_copy(subject: "CheckpointSubject") -> tuple[dict, dict | None]:
    """What a save keeps of the run's tokenizer (so exports need no data cache): {} and None without one."""
    path = subject.tokenizer_model
    if path is None or not Path(path).exists():
        return {}, None
    st = Path(path).stat()
    return _tokenizer_copy(subject.cfg.data.tokenizer_type, str(path), (st.st_mtime_ns, st.st_size))


class CheckpointSaveError(CheckpointError):
    """A save that could not be written (full disk, no permission): the same line on every rank; the
    interrupted `iter_N.partial` is removed and the previous checkpoint stays `latest`."""


def _mib(n: int) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def _reason(err: BaseException) -> str:
    """An OSError's or a safetensors write error's cause in words ("No space left on device")."""
    if isinstance(err, OSError) and err.errno:
        return os.strerror(err.errno)
    code = re.search(r"os error (\d+)|code: (\d+)", str(err))
    return os.strerror(int(code.group(1) or code.group(2))) if code else " ".join(str(err).split())


def _free(save: Path) -> int | None:
    try:
        return shutil.disk_usage(save).free
    except OSError:
        return None


def _raise_first(subject: CheckpointSubject, errors: list[str | None], save: Path, iteration: int) -> None:
    """Every rank's errors of one phase of a save (gathered): if any, rank 0 removes the partial folder
    and every rank raises the first one."""
    first = next((e for e in errors if e), None)
    if first is not None:
        if subject.topo.rank == 0:
            shutil.rmtree(partial_dir(save, iteration), ignore_errors=True)
        raise CheckpointSaveError(first)


def _agree(subject: CheckpointSubject, error: str | None, save: Path, iteration: int) -> None:
    """Collective (also the barrier between the phases of a save): _raise_first over all ranks' errors."""
    _raise_first(subject, comm.all_gather_object(error, subject.topo.world_group), save, iteration)


@torch.no_grad()
def save_checkpoint(subject: CheckpointSubject, save: str | Path, keep_last: int | None = None) -> dict:
    """Collective over all ranks. Returns {"path", "seconds", "bytes" (the whole checkpoint's files)}.
    A write that fails on any rank (a full disk, ...) is a CheckpointSaveError on every rank, naming the
    folder and the space the checkpoint needs; nothing of it is left and `latest` is unchanged."""
    t0 = time.perf_counter()
    save = Path(save)
    topo, engine = subject.topo, subject.engine
    exported = engine.export_state()  # collectives finished first
    iteration = subject.state.iteration
    names = _param_names(subject)
    tensors: dict[str, torch.Tensor] = {}
    entries: list[tuple[str, list[int], str, dict]] = []  # (kind/name, logical shape, dtype, piece json)
    fname = rank_filename(topo.rank)
    for (master, opt_state), f, value in zip(exported["state"], exported["fragments"], exported["values"]):
        spec = get_shard_spec(f.param)
        if not writes_fragment(f.param, topo.tp_rank, topo.dp_cp_rank, engine.stage):
            continue
        name = names[id(f.param)]
        start, stop = _region(spec)
        for kind, t in (("model", value), ("master", master), *opt_state.items()):
            if t is None:
                continue
            key = f"{kind}/{name}/{f.param_lo}"
            tensors[key] = t.reshape(-1)
            piece = Piece(fname, key, start, stop, f.param_lo, f.param_hi)
            entries.append((f"{kind}/{name}", _logical_shape(spec), str(t.dtype).removeprefix("torch."),
                            piece.to_json()))
    rng = None
    if topo.dp_cp_rank == 0:  # (dp, cp) = (0, 0): one writer per (pp, tp) model slice
        state = subject.state.rng.state_dict()
        prefix = f"rng/pp{topo.pp_rank}.tp{topo.tp_rank}"
        for stream, t in state["streams"].items():
            tensors[f"{prefix}/{stream}"] = t
        tensors[f"{prefix}/ambient"] = state["ambient"]
        rng = {"file": fname, "prefix": prefix, "streams": sorted(state["streams"])}
    # What the checkpoint will take: the tensors, a safetensors header per file, the index, the tokenizer.
    tokenizer_files, tokenizer_entry = tokenizer_copy(subject) if topo.rank == 0 else ({}, None)
    mine = sum(t.numel() * t.element_size() for t in tensors.values()) + 160 * len(tensors) \
        + sum(len(src) if isinstance(src, bytes) else src.stat().st_size for src in tokenizer_files.values())
    need = sum(comm.all_gather_object(mine, topo.world_group)) + 400 * len(entries) * topo.world_size + 2**16
    where = f"checkpoint {iteration_dirname(iteration)} into {save}"

    def failed(reason: str) -> str:
        free = _free(save)
        room = f"{_mib(free)} free there" if free is not None else "free space unknown"
        return (f"cannot save {where}: {reason}; it needs about {_mib(need)} ({room}); free space or choose another "
                f"--save folder (the previous checkpoint, if any, is intact)")

    error = None
    if topo.rank == 0:
        try:
            prepare_partial(save, iteration)
            free = _free(save)
            if free is not None and free < need:
                error = failed("not enough free space")
            else:  # the tokenizer's files, so exports need no data cache
                write_tokenizer_files(tokenizer_files, partial_dir(save, iteration))
        except OSError as err:
            error = failed(_reason(err))
    _agree(subject, error, save, iteration)
    folder = partial_dir(save, iteration)
    file_meta, error = None, None
    if tensors:
        try:
            file_meta = write_rank_file(folder, topo.rank, tensors)
        except (OSError, SafetensorError) as err:
            error = failed(f"{_reason(err)} writing {folder / fname}")
    everyone = comm.all_gather_object((error, file_meta, entries, rng, (topo.pp_rank, topo.tp_rank)),
                                      topo.world_group)
    _raise_first(subject, [e for e, *_ in everyone], save, iteration)
    total = sum(meta["bytes"] for _, meta, *_ in everyone if meta is not None)
    path, error = save / iteration_dirname(iteration), None
    if topo.rank == 0:
        index = {"format": FORMAT_NAME, "version": FORMAT_VERSION, "megazero_version": megazero.__version__,
                 "iteration": iteration, "layout": layout_dict(subject.cfg, topo.dp),
                 "config": subject.cfg.to_dict(),
                 "state": subject.state.to_index(exported["step_count"], exported["optimizer"]), "tensors": {}, "files": {}, "rng": {}}
        for name in tokenizer_files:  # checksummed like the tensor files
            index["files"][name] = {"sha256": sha256_of(folder / name), "bytes": (folder / name).stat().st_size}
        if tokenizer_entry is not None:
            index["tokenizer"] = tokenizer_entry
        for _, meta, rank_entries, rank_rng, (pp_rank, tp_rank) in everyone:
            if meta is not None:
                index["files"][meta["name"]] = {"sha256": meta["sha256"], "bytes": meta["bytes"]}
            for name, shape, dtype, piece in rank_entries:
                entry = index["tensors"].setdefault(name, {"shape": shape, "dtype": dtype, "pieces": []})
                entry["pieces"].append(piece)
            if rank_rng is not None:
                index["rng"][f"pp{pp_rank}.tp{tp_rank}"] = rank_rng
        try:
            path = commit(save, iteration, index, keep_last)
        except OSError as err:
            error = failed(f"{_reason(err)} committing it")
    _agree(subject, error, save, iteration)
    return {"path": path, "seconds": time.perf_counter() - t0, "bytes": total}


# ----- load ----------------------------------------------------------------------------------------------
# the block's parts (ModelConfig fields or properties) that must agree too: they change the math or the
# parameter set (an untied output layer, biases), so a mismatch would train a different model
PART_FIELDS = ("normalization", "layernorm_epsilon", "position_embedding_type", "rotary_base", "rotary_percent",
               "use_rope_scaling", "swiglu", "query_groups", "head_dim", "untie_embeddings_and_output_weights",
               "add_bias_linear", "qkv_bias", "qk_layernorm")
ROPE_SCALING_FIELDS = ("rope_scaling_factor", "rope_low_freq_factor", "rope_high_freq_factor",
                       "rope_original_max_positions")
# how a run sets a derived part
_PART_FLAGS = {"query_groups": "--group-query-attention --num-query-groups", "head_dim": "--kv-channels",
               "qkv_bias": "--add-qkv-bias (or leave out --disable-bias-linear)"}


def _setting(field: str, value) -> str:
    """How to give `field` = value on the command line (flags.spelled); Megatron's part switches only
    turn a part on, so a False the run lacks means dropping the switch."""
    from megazero.flags import spelled

    if field in _PART_FLAGS:
        return f"{_PART_FLAGS[field]} {value}" if not isinstance(value, bool) else _PART_FLAGS[field]
    if isinstance(value, bool):
        switch = spelled("model", field, value)
        return f"add {switch}" if " " not in switch else f"drop {spelled('model', field, not value)}"
    return spelled("model", field, value)


def check_model_shape(index: dict, cfg, where: Path) -> None:
    """The checkpoint's model against this run's: the shape (layers, widths, vocabulary, positions) and
    the block's parts (norm, positions, rope, MLP, query groups, head dim, biases, tying). One line
    naming the first difference and the flag that gives the checkpoint's value."""
    from megazero.config import ModelConfig

    known = {f.name for f in dataclasses.fields(ModelConfig)}
    saved_dict = index["config"]["model"]
    saved = ModelConfig(**{k: v for k, v in saved_dict.items() if k in known})  # older indexes: GPT-2 parts
    for field in SHAPE_FIELDS:
        mine, theirs = getattr(cfg.model, field), getattr(saved, field)
        if field == "ffn_hidden_size":
            mine, theirs = cfg.model.ffn_size, saved.ffn_size
        if field == "max_position_embeddings":
            mine, theirs = cfg.model.max_positions, saved.max_positions
        if mine != theirs:
            raise CheckpointError(f"{where}: checkpoint has {field.replace('_', '-')} {theirs}, this run has {mine}; "
                                  f"pass --{field.replace('_', '-')} {theirs} (the model shape must match)")
    parts = PART_FIELDS + (ROPE_SCALING_FIELDS if saved.use_rope_scaling and cfg.model.use_rope_scaling else ())
    for field in parts:
        mine, theirs = getattr(cfg.model, field), getattr(saved, field)
        if mine != theirs:
            raise CheckpointError(f"{where}: checkpoint has {field.replace('_', '-')} {theirs}, this run has {mine}; "
                                  f"{_setting(field, theirs)} (the block's parts must match the checkpoint's; its "
                                  f"config.json lists them)")


@torch.no_grad()
def load_checkpoint(subject: CheckpointSubject, folder: Path, *, load_optim: bool = True, load_rng: bool = True,
                    finetune: bool = False, log=print) -> dict:
    """Collective over all ranks: restore `subject` (its TrainState and ZeRO engine) from a committed
    checkpoint folder (iter_N). Every rank first reads what it needs; a bad file on any rank is the same
    CheckpointError on all ranks, before anything is changed."""
    t0 = time.perf_counter()
    with_optim, with_rng = load_optim and not finetune, load_rng and not finetune
    error, plan = None, None
    try:
        plan = _read_for_this_rank(subject, Path(folder), with_optim, with_rng)
    except CheckpointError as err:
        error = str(err)
    errors = [e for e in comm.all_gather_object(error, subject.topo.world_group) if e]
    if errors:
        raise CheckpointError(errors[0])
    index, values, masters, opt_states, rng = plan
    state = index["state"]
    subject.engine.import_state(values, masters, opt_states, state["adam_steps"] if with_optim else 0)
    if not finetune:
        subject.state.restore(state, loss_scaler=with_optim)
    if rng is not None:
        subject.state.rng.load_state_dict(rng)
    saved = index["layout"]
    optim_note = ("reset" if not with_optim else "restored" if opt_states is not None
                  else "fresh (the checkpoint's optimizer never stepped: none saved)")
    rng_note = ("restored" if rng is not None else "not restored (--no-load-rng / --finetune)" if not with_rng
                else "not restored: tp/pp/vp changed (or the checkpoint was resharded offline), streams keep this "
                     "run's seeds")
    seconds = time.perf_counter() - t0
    log(f"loaded checkpoint {folder} (iteration {state['iteration']}, saved from tp{saved['tp']} pp{saved['pp']} "
        f"vp{saved['vp']} dp{saved['dp']}{describe_cp(saved)} zero{saved['zero_stage']}) in {seconds:.2f} s; "
        f"optimizer state {optim_note}; RNG {rng_note}"
        f"{'; --finetune: iteration and data position start at 0' if finetune else ''}")
    return {"seconds": seconds, "iteration": state["iteration"]}


def _read_for_this_rank(subject: CheckpointSubject, folder: Path, with_optim: bool, with_rng: bool):
    """Everything this rank needs, read and checked, nothing applied."""
    reader = CheckpointReader(folder)
    index = reader.index
    where = folder / "index.json"
    check_model_shape(index, subject.cfg, where)
    topo = subject.topo
    names = _param_names(subject)
    has_master = any(n.startswith("master/") for n in reader.tensors)
    # the optimizer state is read when loaded and stepped at all (else every rule starts from its
    # initial state: a checkpoint of step 0, a Hugging Face import, --no-load-optim)
    state_names = _optimizer_state_to_read(index, subject, where) if with_optim else None
    values, masters, opt_states = [], [], [] if state_names is not None else None
    for f, dtype in zip(subject.engine.fragments(), subject.engine.value_dtypes()):
        spec = get_shard_spec(f.param)
        name = names[id(f.param)]
        if not reader.has(f"model/{name}"):
            raise CheckpointError(f"{where}: no parameter {name} (saved from a different model?)")
        saved_shape, mine = list(reader.shape(f"model/{name}")), _logical_shape(spec)
        if saved_shape != mine:
            raise CheckpointError(f"{where}: {name} has shape {saved_shape} in the checkpoint, {mine} in this model")
        start, stop = _region(spec)

        def fragment(kind: str) -> torch.Tensor:
            return reader.read(f"{kind}/{name}", start, stop).reshape(-1)[f.param_lo:f.param_hi]

        model = fragment("model")
        master = fragment("master") if has_master else model.float()
        # the stored values when the dtypes agree (exact resume), else the fp32 master rounded once
        values.append(model if model.dtype == dtype else master.to(dtype))
        masters.append(master)
        if opt_states is not None:
            opt_states.append({n: fragment(n) for n in state_names})
    rng = None
    saved = index["layout"]
    entry = index.get("rng", {}).get(f"pp{topo.pp_rank}.tp{topo.tp_rank}")  # none after an offline reshard
    same_grid = (saved["tp"], saved["pp"], saved["vp"]) == (topo.tp, topo.pp, subject.cfg.virtual_pipeline_size())
    if with_rng and entry is not None and same_grid:
        get = lambda k: reader.get(entry["file"], f"{entry['prefix']}/{k}")  # noqa: E731
        rng = {"streams": {s: get(s) for s in entry["streams"]}, "ambient": get("ambient")}
    return index, values, masters, opt_states, rng


def _optimizer_state_to_read(index: dict, subject: CheckpointSubject, where: Path) -> list[str] | None:
    """The state names to read (None: nothing to read, the rule starts fresh: a checkpoint whose rule
    never stepped). Another rule's state is refused in one line (format.check_optimizer_state)."""
    if index["state"]["adam_steps"] == 0:
        return None
    mine = subject.engine.optimizer_identity()
    check_optimizer_state(index, mine, where)
    return list(mine["state"])
