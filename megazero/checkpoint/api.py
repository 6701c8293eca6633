"""Checkpoints outside a training run: `load_model` (a single-process model for tools, notebooks and
evaluation), the readers the tools share (config, full tensors, tokenizer), and `plan_layout` /
`write_layout`, which write a checkpoint exactly as a given (tp, pp, vp, dp, ZeRO) layout saves it
(tools/convert_checkpoint.py: offline resharding and Hugging Face import). docs/checkpoint_tools.md.

`load_model(path)` builds megazero's GPTModel at tp=1, pp=1 and fills every parameter from the
checkpoint; the returned module maps token ids [batch, seq] to logits [batch, seq, vocab] over the
logical vocabulary (padding columns dropped), in eval mode (no dropout).

Process group: GPTModel's tensor-parallel layers ask their group for its size and rank, and
torch.distributed answers only for groups registered with an initialised default group. Outside a
distributed job `single_process_group()` initialises a private one-process gloo group (an in-memory
HashStore: no network, no environment variables), builds the model, and destroys the default group
again, so after `load_model` returns `torch.distributed.is_initialized()` is what it was before and
the caller may still call `init_process_group`. The model keeps the (destroyed) size-1 group object;
at tp=1 its forward only asks the group's size, which needs no live backend. Inside an initialised
job, a world of one is used as is; a larger world gets a one-member gloo group made with
`new_group(..., use_local_synchronization=True)`, so only the calling rank takes part (no
collective over the world: any subset of ranks may call load_model).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

import megazero
from megazero.checkpoint.format import (FORMAT_NAME, FORMAT_VERSION, KINDS, CheckpointError, CheckpointReader, Piece,
                                        commit, partial_dir, prepare_partial, rank_filename, resolve_checkpoint,
                                        sha256_of, write_rank_file)
from megazero.config import (CheckpointConfig, DataConfig, LoggingConfig, ModelConfig, OptimizerConfig,
                             ParallelConfig, PrecisionConfig, RunConfig, TrainingConfig, ZeroConfig)
from megazero.tensor_parallel.sharding import ShardSpec, get_shard_spec, set_shard_spec

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "precision": PrecisionConfig, "zero": ZeroConfig,
             "optimizer": OptimizerConfig, "data": DataConfig, "training": TrainingConfig, "logging": LoggingConfig,
             "checkpoint": CheckpointConfig}
TOKENIZER_FILE = "tokenizer.model"


# ----- reading -------------------------------------------------------------------------------------------
def checkpoint_folder(path: str | Path) -> Path:
    """The committed `iter_N` folder `path` names: a SAVE folder (its `latest`) or an iter_N folder."""
    try:
        return resolve_checkpoint(path)
    except CheckpointError as err:  # resolve_checkpoint words its errors for --load; tools name the path
        raise CheckpointError(str(err).removeprefix("--load ")) from None


def model_config_from_dict(d: dict, where: str | Path = "checkpoint") -> ModelConfig:
    """ModelConfig from an index's config["model"]; a field this megazero does not know (a checkpoint
    from a newer version) is an error: the model it describes may not be the one we would build."""
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(d) - known)
    if unknown:
        raise CheckpointError(f"{where}: model setting(s) {', '.join(unknown)} unknown to megazero "
                              f"{megazero.__version__} (saved by another version?)")
    cfg = ModelConfig(**d)
    if cfg.vocab_size is None:
        raise CheckpointError(f"{where}: the checkpoint's config has no model vocab_size")
    return cfg


def run_config_from_dict(d: dict, where: str | Path = "checkpoint") -> RunConfig:
    """RunConfig from an index's "config" (RunConfig.to_dict()); unknown non-model fields are dropped
    (they do not change the model), unknown model fields are an error (model_config_from_dict)."""
    sections = {}
    for name, cls in _SECTIONS.items():
        fields = d.get(name, {})
        if name == "model":
            sections[name] = model_config_from_dict(fields, where)
            continue
        known = {f.name for f in dataclasses.fields(cls)}
        sections[name] = cls(**{k: v for k, v in fields.items() if k in known})
    return RunConfig(**sections)


def to_dtype(dtype) -> torch.dtype:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"dtype {dtype!r}: use one of fp32, bf16, fp16")
    return DTYPES[dtype]


def read_region(reader: CheckpointReader, name: str, shape: Iterable[int]) -> torch.Tensor:
    """Tensor `name` as a tensor of `shape` from the origin (rows past the logical shape are zeros:
    the vocabulary padding of a model's word embedding)."""
    shape = tuple(shape)
    return reader.read(name, (0,) * len(shape), shape)


def parameter_values(reader: CheckpointReader, name: str, shape: Iterable[int], dtype: torch.dtype) -> torch.Tensor:
    """Parameter `name` (no kind prefix) in `dtype`: the stored model values when their dtype is
    `dtype` (bit-exact), else the fp32 master (if saved) or the model values, converted once."""
    stored = reader.tensors[f"model/{name}"]["dtype"]
    if getattr(torch, stored) == dtype or not reader.has(f"master/{name}"):
        return read_region(reader, f"model/{name}", shape).to(dtype)
    return read_region(reader, f"master/{name}", shape).to(dtype)


def model_state_dict(path: str | Path, dtype=None) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """(full megazero state dict with *logical* shapes (no vocabulary padding), ModelConfig, index) of
    the checkpoint at `path`: what megazero.model.hf_gpt2 maps. dtype None: fp32 (masters if saved)."""
    reader = CheckpointReader(checkpoint_folder(path))
    cfg = model_config_from_dict(reader.index["config"]["model"], reader.folder / "index.json")
    dtype = to_dtype(dtype) or torch.float32
    names = sorted(n.removeprefix("model/") for n in reader.tensors if n.startswith("model/"))
    state = {n: parameter_values(reader, n, reader.shape(f"model/{n}"), dtype) for n in names}
    return state, cfg, reader.index


# ----- a single-process model -------------------------------------------------------------------------------
@contextlib.contextmanager
def single_process_group() -> Iterator:
    """A size-1 process group for building a tp=1 model in this process (see the module docstring)."""
    if dist.is_initialized():
        if dist.get_world_size() == 1:
            yield dist.group.WORLD
        else:
            yield dist.new_group([dist.get_rank()], backend="gloo", use_local_synchronization=True)
        return
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()


def build_gpt(cfg: ModelConfig, tp_group, *, layer_range: range | None = None, pre_process: bool = True,
              post_process: bool = True, dtype: torch.dtype = torch.float32, device="cpu") -> nn.Module:
    """An uninitialised GPTModel (values are the caller's) that leaves the global RNG untouched."""
    from megazero.model import GPTModel
    from megazero.random import RNGStreams

    device = torch.device(device)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # RNGStreams seeds the ambient generator
        rng = RNGStreams(0, 0, 0, device if device.type == "cuda" else torch.device("cpu"))
        return GPTModel(cfg, tp_group=tp_group, rng=rng, layer_range=layer_range, pre_process=pre_process,
                        post_process=post_process, dtype=dtype, device=device)


class CheckpointLM(nn.Module):
    """A checkpoint's GPT as one module: token ids [b, s] -> logits [b, s, vocab_size] (logical vocab).

    `gpt` is the megazero GPTModel (tp=1; its word embedding keeps the zero padding rows);
    `config` the ModelConfig, `iteration` and `folder` where the weights came from."""

    def __init__(self, gpt: nn.Module, config: ModelConfig, iteration: int, folder: Path):
        super().__init__()
        self.gpt, self.config, self.iteration, self.folder = gpt, config, iteration, folder

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.shape[-1] > self.config.max_positions:
            raise ValueError(f"sequence length {tokens.shape[-1]} exceeds the model's {self.config.max_positions} "
                             f"positions")
        return self.gpt(tokens)[..., :self.config.vocab_size]


@torch.no_grad()
def load_model(path: str | Path, device="cpu", dtype=None) -> CheckpointLM:
    """A single-process model of the checkpoint at `path` (a SAVE folder: its `latest`; or an iter_N
    folder), whatever layout saved it: token ids (batch, seq) -> logits (batch, seq, vocab), eval mode.

    dtype None or fp32: fp32 values (the fp32 masters when the run was bf16/fp16); bf16 / fp16 (a
    torch.dtype or "bf16"...): the stored model values when they have that dtype, else converted.
    Every file read is checked against its sha256. Raises CheckpointError (one line) for a missing,
    corrupted or foreign checkpoint."""
    folder = checkpoint_folder(path)
    reader = CheckpointReader(folder)
    where = folder / "index.json"
    cfg = model_config_from_dict(reader.index["config"]["model"], where)
    dtype = to_dtype(dtype) or torch.float32
    with single_process_group() as group:
        gpt = build_gpt(cfg, group, dtype=dtype, device=device)
    names = {f"model/{n}" for n, _ in gpt.named_parameters()}
    saved = {n for n in reader.tensors if n.startswith("model/")}
    if names != saved:
        raise CheckpointError(f"{where}: parameters differ from the model its config describes (missing "
                              f"{sorted(names - saved)[:3]}, unexpected {sorted(saved - names)[:3]})")
    for name, param in gpt.named_parameters():
        param.copy_(parameter_values(reader, name, param.shape, dtype))
        param.requires_grad_(False)
    return CheckpointLM(gpt, cfg, reader.index["iteration"], folder).eval()


# ----- the tokenizer ----------------------------------------------------------------------------------------
def locate_tokenizer(folder: Path, index: dict) -> tuple[Path | None, str]:
    """(the sentencepiece model the checkpoint was trained with, or None; how it was found / why not).

    Looked for, in order: tokenizer.model in the iter folder or its SAVE folder (imports and
    conversions copy it there); config.data.tokenizer_model (runs on --data-path); for the default
    corpus (whose tokenizer the index does not record), the default-corpus cache this machine would
    use (config.data.cache_dir, $MEGAZERO_CACHE, ~/.cache/megazero). A candidate must have the model's
    vocabulary size."""
    from megazero.data.tokenizer import Tokenizer

    config = index.get("config", {})
    data, vocab = config.get("data", {}), config.get("model", {}).get("vocab_size")

    def fits(path: Path) -> bool:
        try:
            return path.is_file() and Tokenizer(path).vocab_size == vocab
        except Exception:  # not a sentencepiece model
            return False

    for path in (folder / TOKENIZER_FILE, folder.parent / TOKENIZER_FILE):
        if fits(path):
            return path, f"{path} (beside the checkpoint)"
    if data.get("tokenizer_model"):
        path = Path(data["tokenizer_model"])
        if fits(path):
            return path, f"{path} (the run's --tokenizer-model)"
        return None, (f"the run's --tokenizer-model {path} is missing here or has another vocabulary size than "
                      f"the model ({vocab}); pass --tokenizer-model FILE")
    if data.get("data_path"):
        return None, "the checkpoint's config names no tokenizer; pass --tokenizer-model FILE"
    from megazero.data import default_corpus

    caches = []
    for c in (data.get("cache_dir"), os.environ.get("MEGAZERO_CACHE"), Path.home() / ".cache" / "megazero"):
        if c and Path(c) not in caches:
            caches.append(Path(c))
    default_vocab = data.get("default_vocab_size") or 4096
    root, files = default_corpus.stdlib_source_files()
    key = default_corpus.cache_key(root, files, default_vocab) if files else None
    for cache in caches:
        if key and fits(cache / key / TOKENIZER_FILE):
            path = cache / key / TOKENIZER_FILE
            return path, f"{path} (the default corpus's tokenizer, from the data cache)"
    pattern = f"stdlib-py*-v{default_vocab}-*/{TOKENIZER_FILE}"
    found = sorted({p.resolve() for cache in caches for p in cache.glob(pattern) if fits(p)})
    if len(found) == 1:
        return found[0], f"{found[0]} (the default corpus's tokenizer, from the data cache)"
    searched = ", ".join(map(str, caches))
    why = "several candidates" if found else "not found"
    return None, (f"the checkpoint was trained on the default corpus, whose tokenizer lives in the data cache "
                  f"and is not recorded in the checkpoint: {why} in {searched}; pass --tokenizer-model FILE (or "
                  f"set MEGAZERO_CACHE to the training run's cache)")


# ----- writing a layout -------------------------------------------------------------------------------------
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
    """The layout checks a run of `cfg` on tp x pp x dp ranks would make (ConfigError, one line)."""
    from megazero.errors import ConfigError
    from megazero.topology import GridShape

    p, m = cfg.parallel, cfg.model
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    for name, value in (("tp", tp), ("pp", pp), ("dp", dp), ("vp", cfg.virtual_pipeline_size())):
        if value < 1:
            raise ConfigError(f"--target-{name} must be >= 1, got {value}")
    GridShape(tp * pp * dp, tp, pp)
    if m.hidden_size % m.num_attention_heads:
        raise ConfigError(f"hidden size {m.hidden_size} is not divisible by {m.num_attention_heads} heads")
    if m.num_attention_heads % tp:
        raise ConfigError(f"--target-tp {tp}: the model's {m.num_attention_heads} attention heads are not divisible "
                          f"by {tp}; choose a tp that divides {m.num_attention_heads}")
    if m.ffn_size % tp:
        raise ConfigError(f"--target-tp {tp}: the model's ffn hidden size {m.ffn_size} is not divisible by {tp}")
    if cfg.zero.stage not in (0, 1, 2, 3):
        raise ConfigError(f"--target-zero-stage must be 0, 1, 2 or 3, got {cfg.zero.stage}")
    cfg.layers_per_virtual_stage()  # layers divisible by pp x vp (or the first/last stage counts)


def plan_layout(cfg: RunConfig, dp: int) -> list[PlannedPiece]:
    """Every piece a run of `cfg` on tp x pp x dp ranks saves (state.save_checkpoint's rules), in rank
    order and, per rank, in its optimizer's fragment order: the same files, regions and flat ranges.

    Each pipeline rank's chunks are built at tp=1 on the meta device (no memory), then every parameter
    is swapped for a meta tensor of its target tp slice's shape, so the trainer's own ZeRO code
    (engine.parameter_groups, layout.BufferLayout) lays the buckets out."""
    from megazero.pipeline_parallel.partition import chunk_layer_ranges, virtual_stage
    from megazero.topology import GridShape, coords_to_rank
    from megazero.zero.engine import parameter_groups
    from megazero.zero.layout import BufferLayout

    p = cfg.parallel
    tp, pp, vp, stage = p.tensor_model_parallel_size, p.pipeline_model_parallel_size, cfg.virtual_pipeline_size(), \
        cfg.zero.stage
    grid = GridShape(tp * pp * dp, tp, pp)
    counts, last = cfg.layers_per_virtual_stage(), pp * vp - 1
    padded = cfg.model.padded_vocab_size(tp)
    plan: dict[int, list[PlannedPiece]] = {}
    with single_process_group() as group:
        for pp_rank in range(pp):
            # as training/model_builder.build_model_chunks: virtual stage 0 embeds, the last one has the
            # (tied) output layer; with pp > 1 the word embedding gets a ZeRO bucket of its own
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
                for chunk in chunks:
                    if pp > 1 and hasattr(chunk, "word_embeddings"):
                        chunk.word_embeddings.weight.own_bucket = True
                layout = BufferLayout(parameter_groups(chunks, stage), dp,
                                      None if stage == 3 else cfg.zero.reduce_bucket_size)
                for dp_rank in range(dp):
                    rank = coords_to_rank(pp_rank, dp_rank, tp_rank, grid)
                    for f in layout.fragments_of_rank(dp_rank, whole=stage == 0):
                        spec = get_shard_spec(f.param)
                        if spec.tied_copy or (spec.tp_dim is None and tp_rank != 0) or (stage == 0 and dp_rank != 0):
                            continue  # written by another rank (state.save_checkpoint's rule)
                        start, stop = _region(spec)
                        plan.setdefault(rank, []).append(PlannedPiece(rank, names[id(f.param)], _logical_shape(spec),
                                                                      start, stop, f.param_lo, f.param_hi))
    return [piece for rank in sorted(plan) for piece in plan[rank]]


def _region(spec: ShardSpec) -> tuple[tuple[int, ...], tuple[int, ...]]:
    from megazero.checkpoint.state import _region as region

    return region(spec)


def _logical_shape(spec: ShardSpec) -> tuple[int, ...]:
    from megazero.checkpoint.state import _logical_shape as logical_shape

    return tuple(logical_shape(spec))


def layout_dict(cfg: RunConfig, dp: int) -> dict:
    """The index's "layout" of a run of `cfg` on dp data-parallel ranks (state.layout_of's fields)."""
    p, z = cfg.parallel, cfg.zero
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    return {"world": tp * pp * dp, "tp": tp, "pp": pp, "vp": cfg.virtual_pipeline_size(), "dp": dp,
            "zero_stage": z.stage, "params_dtype": cfg.precision.params_dtype,
            "offload_optimizer": z.offload_optimizer, "offload_param": z.offload_param}


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
    folder = prepare_partial(save, iteration)
    try:
        entries: dict[str, dict] = {}
        files: dict[str, dict] = {}
        for rank in ranks:
            fname, out = rank_filename(rank), {}
            for piece in by_rank.get(rank, []):
                for kind in KINDS:
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
