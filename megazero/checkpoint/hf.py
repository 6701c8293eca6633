"""Hugging Face export and import of whole checkpoints: what tools/convert_checkpoint.py --to-hf and
--from-hf do, apart from parsing flags, choosing the tokenizer and printing. docs/checkpoint_tools.md.

Two families, each with its exact tensor mapping in megazero/model/:

    family   Hugging Face classes                              mapping        megazero parts
    gpt2     GPT2LMHeadModel                                   hf_gpt2.py     the defaults (LayerNorm, learned
                                                                              positions, GELU, biases, tied)
    llama    Llama-, Mistral-, Qwen2-, Qwen3ForCausalLM        hf_llama.py    RMSNorm, rope, SwiGLU, GQA, ...

Export picks the family from the checkpoint's model config (`export_family`: any Llama part, i.e.
RMSNorm, rope or SwiGLU, means llama) before reading a tensor, and the family's refusal names the
setting it cannot represent. Import picks it from config.json's `model_type`. Every problem is a
ConfigError: one line naming the file and the setting or key. Writers are atomic: an HF folder is
written beside OUT and renamed; a checkpoint is committed as a training save commits (offline.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

import megazero
from megazero.checkpoint.api import model_state_dict
from megazero.checkpoint.format import INDEX, rank_filename
from megazero.checkpoint.offline import plan_layout, read_full_region, validate_layout, write_layout
from megazero.checkpoint.state import layout_dict
from megazero.config import ModelConfig, RunConfig, show_value
from megazero.errors import ConfigError
from megazero.model import hf_gpt2, hf_llama
from megazero.model.parts import check_parts

HF_WEIGHTS = "model.safetensors"
HF_WEIGHTS_INDEX = "model.safetensors.index.json"  # sharded safetensors: weight name -> file
HF_CONFIG = "config.json"
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
LLAMA_TYPES = tuple(hf_llama.ARCHITECTURES)

# ModelConfig fields the GPT-2 mapping represents; others must keep a value GPT-2 has (gpt2_refusal)
_GPT2_MAPPED = {"model_size", "num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size", "seq_length",
                "max_position_embeddings", "vocab_size", "make_vocab_size_divisible_by", "hidden_dropout",
                "attention_dropout", "init_method_std", "layernorm_epsilon", "fused_kernels", "attention_backend"}
_GPT2_VALUES = {"normalization": ("layernorm", "LayerNorm")}


# ----- export ----------------------------------------------------------------------------------------------
def export_family(model: dict) -> str:
    """'llama' when the checkpoint's model config has a Llama part (RMSNorm, rope, SwiGLU), else 'gpt2'."""
    llama = (model.get("normalization", "LayerNorm") == "RMSNorm" or model.get("position_embedding_type") == "rope"
             or bool(model.get("swiglu")))
    return "llama" if llama else "gpt2"


def gpt2_refusal(model: dict) -> str | None:
    """Why HF GPT-2 cannot represent this model (a checkpoint's config.model dict), or None."""
    defaults = {f: getattr(ModelConfig(), f) for f in ModelConfig.__dataclass_fields__}
    for key, value in sorted(model.items()):
        if key in _GPT2_MAPPED:
            continue
        if key in _GPT2_VALUES:
            if value in _GPT2_VALUES[key]:
                continue
        elif key in defaults and value == defaults[key]:
            continue  # a setting this megazero knows, at its (GPT-2) default
        return f"model setting {key}={value!r} has no Hugging Face GPT-2 equivalent (hf_gpt2 maps GPT-2 models only)"
    return None


def export_refusal(src: Path, index: dict) -> tuple[str, str]:
    """(family, the HF class name) of the checkpoint's model; ConfigError naming the setting HF cannot represent."""
    from megazero.checkpoint.api import model_config_from_dict

    model = index["config"]["model"]
    family = export_family(model)
    if family == "gpt2":
        why, name = gpt2_refusal(model), "GPT2LMHeadModel"
    else:
        cfg = model_config_from_dict(model, src / INDEX)
        why = hf_llama.llama_refusal(cfg)
        name = "a Llama-family model" if why else hf_llama.ARCHITECTURES[hf_llama.hf_llama_family(cfg)]
    if why:
        raise ConfigError(f"{src / INDEX}: cannot export to Hugging Face {name}: {why}")
    return family, name


def export_tensors(src: Path, family: str, dtype: str) -> tuple[dict[str, torch.Tensor], ModelConfig, dict]:
    """(HF state dict to save: tied output weights not stored, the checkpoint's ModelConfig, its index)."""
    state, cfg, index = model_state_dict(src, dtype=dtype)
    what = "GPT2LMHeadModel" if family == "gpt2" else "a Llama-family model"
    try:
        if family == "gpt2":
            hf = hf_gpt2.to_hf_gpt2_state_dict(state, cfg)
            hf.pop("lm_head.weight")  # tied to transformer.wte.weight (HF re-ties on load)
        else:
            hf = hf_llama.to_hf_llama_state_dict(state, cfg)  # tied: no lm_head.weight
    except (KeyError, ValueError) as err:  # parameters or shapes the mapping does not expect
        raise ConfigError(f"{src / INDEX}: cannot export to Hugging Face {what}: "
                          f"{str(err).strip(chr(34) + chr(39))}") from None
    return hf, cfg, index


def export_config(family: str, cfg: ModelConfig, *, src: Path, index: dict, dtype: str,
                  bos_token_id: int | None = None, eos_token_id: int | None = None,
                  pad_token_id: int | None = None) -> dict:
    """config.json for the exported model (model_type, architectures, torch_dtype, provenance)."""
    if family == "gpt2":
        config = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
                  **hf_gpt2.hf_gpt2_config(cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id),
                  "pad_token_id": pad_token_id}
    else:
        config = hf_llama.hf_llama_config(cfg, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                                          pad_token_id=pad_token_id)
    config["torch_dtype"] = DTYPE_NAMES[dtype]
    config["megazero"] = {"checkpoint": str(src.resolve()), "iteration": index["iteration"],
                          "megazero_version": index.get("megazero_version")}
    return config


def write_hf_folder(out: Path, weights: dict[str, torch.Tensor], config: dict,
                    write_extra: Callable[[Path], Any] | None = None) -> Any:
    """model.safetensors + config.json (+ whatever `write_extra(folder)` adds: the tokenizer) into a
    hidden sibling of OUT, then renamed to OUT (which must be absent or empty): never half-written.
    Returns what write_extra returned (None without it)."""
    from safetensors.torch import save_file

    tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save_file({n: weights[n].contiguous() for n in sorted(weights)}, str(tmp / HF_WEIGHTS),
                  metadata={"format": "pt"})
        os.chmod(tmp / HF_WEIGHTS, 0o644)  # safetensors creates 0600
        (tmp / HF_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        extra = write_extra(tmp) if write_extra is not None else None
        if out.exists():
            out.rmdir()  # empty (checked by the caller)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return extra


# ----- import ----------------------------------------------------------------------------------------------
def read_hf_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise ConfigError(f"--from-hf {folder}: no such folder")
    config_path = folder / HF_CONFIG
    try:
        return json.loads(config_path.read_text())
    except (OSError, ValueError) as err:
        raise ConfigError(f"{config_path}: unreadable Hugging Face config ({' '.join(str(err).split())})") from None


def read_hf_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict of a Hugging Face folder (names as saved): model.safetensors, the sharded
    model.safetensors.index.json (every file its weight_map names), or pytorch_model.bin."""
    from safetensors import safe_open

    if (folder / HF_WEIGHTS).is_file():
        files = [folder / HF_WEIGHTS]
    elif (folder / HF_WEIGHTS_INDEX).is_file():
        try:
            weight_map = json.loads((folder / HF_WEIGHTS_INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{folder / HF_WEIGHTS_INDEX}: unreadable shard index "
                              f"({' '.join(str(err).split())})") from None
        files = [folder / f for f in sorted(set(weight_map.values()))]
    elif (folder / "pytorch_model.bin").is_file():
        files = [folder / "pytorch_model.bin"]
    else:
        raise ConfigError(f"--from-hf {folder}: no {HF_WEIGHTS}, {HF_WEIGHTS_INDEX} or pytorch_model.bin")
    state: dict[str, torch.Tensor] = {}
    for path in files:
        try:
            if path.suffix == ".bin":
                state.update(torch.load(path, map_location="cpu", weights_only=True))
            else:
                with safe_open(str(path), framework="pt") as f:
                    state.update({k: f.get_tensor(k) for k in f.keys()})
        except Exception as err:
            raise ConfigError(f"{path}: unreadable weights file ({' '.join(str(err).split())})") from None
    return state


def import_family(config: dict, where: Path) -> str:
    model_type = config.get("model_type")
    if model_type == "gpt2":
        return "gpt2"
    if model_type in LLAMA_TYPES:
        return "llama"
    raise ConfigError(f"{where}: cannot import: model_type={model_type!r} is not a GPT-2 model (gpt2) or a "
                      f"Llama-family model ({', '.join(LLAMA_TYPES)})")


def _gpt2_fields(config: dict, refuse) -> dict:
    if config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        refuse(f"activation_function {config['activation_function']!r}; megazero's GPT uses tanh-approximate GELU "
               f"(gelu_new)")
    for key, gpt2 in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                      ("add_cross_attention", False), ("tie_word_embeddings", True)):
        if config.get(key, gpt2) != gpt2:
            refuse(f"{key} {config[key]}; megazero's GPT has {key} {gpt2}")
    try:
        n_positions = config.get("n_positions", config.get("n_ctx", 1024))
        return dict(num_layers=config["n_layer"], hidden_size=config["n_embd"], num_attention_heads=config["n_head"],
                    ffn_hidden_size=config.get("n_inner"), max_position_embeddings=n_positions,
                    vocab_size=config["vocab_size"], hidden_dropout=config.get("resid_pdrop", 0.1),
                    attention_dropout=config.get("attn_pdrop", 0.1),
                    init_method_std=config.get("initializer_range", 0.02),
                    layernorm_epsilon=config.get("layer_norm_epsilon", 1e-5))
    except KeyError as err:
        refuse(f"config has no {err}")


def model_config_from_hf(config: dict, where: Path, *, seq_length: int | None,
                         make_vocab_size_divisible_by: int) -> ModelConfig:
    """The ModelConfig of the network config.json describes; seq_length None: the positions (or, with
    llama3 rope scaling, the original positions it scales from)."""
    def refuse(why: str):
        raise ConfigError(f"{where}: cannot import: {why}")

    if import_family(config, where) == "gpt2":
        fields = _gpt2_fields(config, refuse)
    else:
        try:
            fields = hf_llama.model_config_from_hf_llama(config)
        except ValueError as err:
            refuse(str(err))
    # default training length: the positions; with llama3 rope scaling the pretraining context it scales
    # from (Llama 3.1: 8192 of 131072 positions, as the presets)
    default_seq = fields.get("rope_original_max_positions") if fields.get("use_rope_scaling") else None
    cfg = ModelConfig(**fields, seq_length=seq_length or min(default_seq or fields["max_position_embeddings"],
                                                             fields["max_position_embeddings"]),
                      make_vocab_size_divisible_by=make_vocab_size_divisible_by)
    try:
        check_parts(cfg)
    except ConfigError as err:
        refuse(str(err))
    if cfg.seq_length > cfg.max_positions:
        raise ConfigError(f"--seq-length {cfg.seq_length} exceeds the model's {cfg.max_positions} positions")
    return cfg


def import_state(config: dict, hf_state: dict[str, torch.Tensor], mcfg: ModelConfig,
                 where: Path) -> dict[str, torch.Tensor]:
    """The megazero state dict (logical vocabulary: a checkpoint stores no padding rows) of HF weights."""
    try:
        if import_family(config, where) == "gpt2":
            if not any(k.startswith("transformer.") for k in hf_state):  # saved from GPT2Model (the hub's "gpt2")
                hf_state = {(k if k == "lm_head.weight" else f"transformer.{k}"): v for k, v in hf_state.items()}
            return hf_gpt2.from_hf_gpt2_state_dict(hf_state, mcfg, padded_vocab_size=mcfg.vocab_size)
        return hf_llama.from_hf_llama_state_dict(hf_state, mcfg, padded_vocab_size=mcfg.vocab_size)
    except (KeyError, ValueError) as err:
        raise ConfigError(f"{where}: weights do not match {HF_CONFIG}: {str(err).strip(chr(34) + chr(39))}") from None


def import_run_config(mcfg: ModelConfig, *, tp: int, pp: int, vp: int, dp: int, zero_stage: int,
                      params_dtype: str) -> RunConfig:
    """The run config an imported checkpoint records: the model, the target layout, megazero's defaults
    elsewhere with the batch sizes made explicit (a resume keeps the checkpoint's global batch)."""
    cfg = RunConfig(model=mcfg).replace(
        parallel={"tensor_model_parallel_size": tp, "pipeline_model_parallel_size": pp,
                  "virtual_pipeline_model_parallel_size": vp if vp != 1 else None},
        zero={"stage": zero_stage}, precision={"params_dtype": params_dtype})
    validate_layout(cfg, dp)
    return cfg.resolved(tp * pp * dp)


def run_flags(cfg: ModelConfig) -> tuple[str, list[str]]:
    """(pretrain_gpt.py's model flags for cfg, the fields at a non-default value no flag sets): what a run
    that --loads the import gives, since a run takes its model from its flags (the checkpoint's shape
    is checked against them). Fields at megazero's defaults, the vocabulary (from the tokenizer) and
    kernel choices are left out."""
    from megazero.flags import FLAG_GROUPS

    by_dest = {f.dest: f for _, group in FLAG_GROUPS for f in group}
    defaults, flags, missing = ModelConfig(), [], []
    for field in dataclasses.fields(ModelConfig):
        value = getattr(cfg, field.name)
        if field.name in ("vocab_size", "model_size", "fused_kernels", "attention_backend") \
                or value == getattr(defaults, field.name):
            continue
        flag = by_dest.get(f"model.{field.name}")
        if flag is None or (flag.is_switch and flag.const != value):
            missing.append(f"{field.name}={show_value(value)}")
        else:  # the canonical spelling (Megatron's)
            flags.append(flag.names[0] if flag.is_switch else f"{flag.names[0]} {show_value(value)}")
    return " ".join(flags), missing


def write_import(out: Path, cfg: RunConfig, dp: int, state: dict[str, torch.Tensor], *, source: Path,
                 source_format: str,
                 extra_files: Iterable[Path] = (), index_extra: dict | None = None,
                 make_bar: Callable[[int], Any] | None = None) -> tuple[Path, dict]:
    """Commit `state` as a checkpoint at iteration 0 in cfg's layout at data-parallel size dp: model values
    in the params dtype (bf16/fp16 also store fp32 masters), no optimizer state (a --load starts whichever
    optimizer the run uses fresh), counters zero, a fresh run's loss scaler and RNG streams.
    extra_files are copied into the folder and index_extra's keys added to the index (the tokenizer and its
    record); make_bar(total) -> a progress bar context. Returns (the iter folder, the layout dict)."""
    from megazero.optim.loss_scaler import build_loss_scaler
    from megazero.random import RNGStreams
    from megazero.topology import Coords, GridShape, coords_to_rank

    pr = cfg.precision
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[pr.params_dtype]
    full: dict[str, torch.Tensor] = {}
    for name, value in state.items():
        full[f"model/{name}"] = value.to(dtype)
        if dtype != torch.float32:
            full[f"master/{name}"] = value.float()
    tensors = {n: (list(t.shape), str(t.dtype).removeprefix("torch.")) for n, t in full.items()}
    scaler = build_loss_scaler(pr.params_dtype, pr.loss_scale, pr.initial_loss_scale, pr.loss_scale_window,
                               pr.hysteresis, pr.min_loss_scale)
    layout = layout_dict(cfg, dp)
    grid = GridShape(layout["world"], tp=layout["tp"], pp=layout["pp"], cp=layout["cp"])
    rng, rng_index = {}, {}
    with torch.random.fork_rng(devices=[]):  # the streams a fresh run of this config starts with
        for pp_rank in range(layout["pp"]):
            for tp_rank in range(layout["tp"]):
                streams = RNGStreams(cfg.training.seed, tp_rank, pp_rank, torch.device("cpu")).state_dict()
                rank = coords_to_rank(Coords(tp=tp_rank, cp=0, dp=0, pp=pp_rank), grid)  # (dp, cp) 0 saves them
                prefix = f"rng/pp{pp_rank}.tp{tp_rank}"
                rng[rank] = {f"{prefix}/{s}": t for s, t in streams["streams"].items()}
                rng[rank][f"{prefix}/ambient"] = streams["ambient"]
                rng_index[f"pp{pp_rank}.tp{tp_rank}"] = {"file": rank_filename(rank), "prefix": prefix,
                                                         "streams": sorted(streams["streams"])}
    index = {"megazero_version": megazero.__version__, "iteration": 0, "layout": layout, "config": cfg.to_dict(),
             "state": {"iteration": 0, "consumed_samples": 0, "optimizer_steps": 0, "consecutive_skips": 0,
                       "adam_steps": 0, "loss_scaler": scaler.state_dict(),
                       # no optimizer state: a --load starts whichever optimizer the run uses fresh
                       "optimizer": {"type": None, "state": []}},
             "rng": rng_index, "imported_from": {"path": str(source.resolve()), "format": source_format},
             **(index_extra or {})}
    plan = plan_layout(cfg, dp)
    with make_bar(len(plan)) if make_bar else contextlib.nullcontext() as bar:
        path = write_layout(out, index, plan, tensors, lambda n, a, b: read_full_region(full[n], a, b), rng=rng,
                            extra_files=extra_files, bar=bar)
    return path, layout

