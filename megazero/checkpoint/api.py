"""Checkpoints outside a training run: `load_model` (a single-process model for tools, notebooks and
evaluation) and the readers the tools share (config, full tensors, the tokenizer: `checkpoint_tokenizer`).
Writing a checkpoint offline in a chosen layout is offline.py's. docs/checkpoint_tools.md.

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
import dataclasses
import os
from pathlib import Path
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

import megazero
from megazero.checkpoint.format import (CheckpointError, CheckpointReader, resolve_checkpoint)
from megazero.config import (CheckpointConfig, DataConfig, LoggingConfig, ModelConfig, OptimizerConfig,
                             ParallelConfig, PrecisionConfig, RunConfig, TrainingConfig, ZeroConfig)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16,
          "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_SECTIONS = {"model": ModelConfig, "parallel": ParallelConfig, "precision": PrecisionConfig, "zero": ZeroConfig,
             "optimizer": OptimizerConfig, "data": DataConfig, "training": TrainingConfig, "logging": LoggingConfig,
             "checkpoint": CheckpointConfig}
TOKENIZER_FILE = "tokenizer.model"  # a sentencepiece tokenizer's copy (Tokenizer.CHECKPOINT_FILE)


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
def checkpoint_tokenizer(folder: Path, index: dict, path: str | Path | None = None, kind: str | None = None):
    """(the tokenizer the checkpoint at `folder` was trained with, loaded (megazero.data.tokenizer_types), or
    None; how it was found / why not).

    `path` (a tool's --tokenizer-model; `kind` guessed from it when not given) wins. Else the copy a save
    (or an import or conversion) put beside the index, recorded in its "tokenizer" entry; else, for
    checkpoints saved before that entry existed, `locate_tokenizer`'s search for the sentencepiece
    model. A tokenizer with more ids than the model's vocabulary is refused (CheckpointError); fewer is
    fine (a Hugging Face model may pad its embedding past the tokenizer)."""
    from megazero.data.tokenizer_types import build_tokenizer, guess_tokenizer_type

    config = index.get("config", {})
    data, vocab = config.get("data", {}), config.get("model", {}).get("vocab_size")
    if path is not None:
        kind = kind or guess_tokenizer_type(path)
        tok, how = build_tokenizer(kind, path), f"{path} (--tokenizer-model, {kind})"
    elif index.get("tokenizer"):
        entry = index["tokenizer"]
        kind = entry.get("type", "SentencePieceTokenizer")
        where = folder / TOKENIZER_FILE if kind == "SentencePieceTokenizer" else folder
        tok, how = build_tokenizer(kind, where), f"{', '.join(entry.get('files', []))} ({kind}, saved with {folder})"
    elif data.get("tokenizer_type") == "HuggingFaceTokenizer" and data.get("tokenizer_model"):
        tok, how = build_tokenizer("HuggingFaceTokenizer", data["tokenizer_model"]), \
            f"{data['tokenizer_model']} (the run's --tokenizer-model, HuggingFaceTokenizer)"
    else:
        found, how = locate_tokenizer(folder, index)
        if found is None:
            return None, how
        tok = build_tokenizer("SentencePieceTokenizer", found)
    if vocab is not None and tok.vocab_size > vocab:
        raise CheckpointError(f"{how}: the tokenizer has {tok.vocab_size} ids, the model's vocabulary {vocab}; pass "
                              f"the --tokenizer-model the checkpoint was trained with")
    return tok, how


def locate_tokenizer(folder: Path, index: dict) -> tuple[Path | None, str]:
    """(the sentencepiece model the checkpoint was trained with, or None; how it was found / why not).

    Looked for, in order: tokenizer.model in the iter folder or its SAVE folder (imports and
    conversions copy it there); config.data.tokenizer_model (runs on --data-path); for the default
    corpus (whose tokenizer the index does not record), the default-corpus cache this machine would
    use (config.data.cache_dir, $MEGAZERO_CACHE, ~/.cache/megazero). A candidate must have the model's
    vocabulary size. Checkpoints that record their tokenizer ("tokenizer" in the index) need no search:
    `checkpoint_tokenizer` reads that first."""
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
