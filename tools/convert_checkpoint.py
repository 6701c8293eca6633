r"""Convert megazero checkpoints: reshard offline, export to / import from Hugging Face (GPT-2, Llama family).

    # reshard: write the checkpoint exactly as a tp1 pp2 dp2 ZeRO-2 run would have saved it
    python tools/convert_checkpoint.py --load ckpt --save ckpt_tp1pp2 --target-tp 1 --target-pp 2 \
        --target-dp 2 --target-zero-stage 2
    # Hugging Face export: model.safetensors + config.json (GPT2LMHeadModel, or for a Llama-style model
    # LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM) + the run's tokenizer (tokenizer.json +
    # tokenizer_config.json, for transformers.AutoTokenizer; and tokenizer.model if sentencepiece)
    python tools/convert_checkpoint.py --load ckpt --to-hf hf_model
    # Hugging Face import: a GPT-2 or Llama/Mistral/Qwen2/Qwen3 folder -> a megazero checkpoint at iteration 0
    python tools/convert_checkpoint.py --from-hf hf_model --save ckpt_from_hf --target-tp 2

Loading needs no conversion (any layout reads any checkpoint); resharding offline gives files shaped
for the target layout (each rank reads one file) and a config/layout that says what it is. Outputs
appear only complete: a checkpoint is committed like a training save (iter_N.partial, then renamed,
then `latest`); an HF folder is written beside OUT and renamed. Bad input: one line `error: ...` on
stderr and exit code 2, naming the file and the mismatch. Reading, mapping and writing Hugging Face
models is megazero/checkpoint/hf.py's; this file parses flags, handles the tokenizer and reports. See
docs/checkpoint_tools.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

try:
    import megazero  # noqa: F401
except ImportError:  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

import megazero
from megazero.checkpoint import hf
from megazero.checkpoint.api import TOKENIZER_FILE, checkpoint_folder, checkpoint_tokenizer, run_config_from_dict
from megazero.checkpoint.format import CheckpointReader, rank_filename
from megazero.checkpoint.offline import plan_layout, validate_layout, write_layout
from megazero.checkpoint.state import layout_dict
from megazero.cli import OneLineParser, run_tool
from megazero.config import RunConfig
from megazero.model.parts import describe_parts
from megazero.data.tokenizer_types import tokenizer_in_folder, tokenizer_record, write_tokenizer_files
from megazero.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Reshard a megazero checkpoint offline, or convert it to / from a Hugging "
                                  "Face folder (GPT2LMHeadModel; Llama, Mistral, Qwen2, Qwen3 ForCausalLM).")
    p.add_argument("--load", metavar="DIR", help="the checkpoint: a --save folder (its latest) or one iter_N folder")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--save", metavar="OUT",
                      help="write a checkpoint (reshard with --load, or import with --from-hf)")
    mode.add_argument("--to-hf", metavar="OUT", help="write a Hugging Face folder: GPT2LMHeadModel, or a "
                                                      "Llama-family model for a Llama-style checkpoint")
    p.add_argument("--from-hf", metavar="IN", help="import a Hugging Face GPT-2 or Llama-family folder (config.json + "
                   "model.safetensors, sharded or not, or pytorch_model.bin) into --save OUT at iteration 0")
    g = p.add_argument_group("target layout (--save)")
    g.add_argument("--target-tp", type=int, metavar="T", help="tensor-parallel size (reshard: required; import: 1)")
    g.add_argument("--target-pp", type=int, metavar="P", help="pipeline-parallel size (reshard: required; import: 1)")
    g.add_argument("--target-vp", type=int, default=1, metavar="V", help="model chunks per pipeline stage (default 1)")
    g.add_argument("--target-dp", type=int, default=1, metavar="D",
                   help="data-parallel size: decides the ZeRO fragments in the files (default 1)")
    g.add_argument("--target-zero-stage", type=int, choices=[0, 1, 2, 3], metavar="Z",
                   help="ZeRO stage (default: the checkpoint's; import: 0)")
    g = p.add_argument_group("Hugging Face")
    g.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="--to-hf: weights dtype (default fp32: the fp32 masters when the run was bf16/fp16)")
    g.add_argument("--tokenizer-model", metavar="FILE",
                   help="--to-hf: the tokenizer to export: a sentencepiece .model, or a Hugging Face tokenizer.json "
                        "or its folder (default: the one saved with the checkpoint, else found from its config)")
    g.add_argument("--tokenizer-type", choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"],
                   help="--to-hf: what --tokenizer-model is (default: HuggingFaceTokenizer for a folder or .json)")
    g.add_argument("--params-dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="--from-hf: the checkpoint's model dtype (bf16/fp16 also store fp32 masters; default fp32)")
    g.add_argument("--seq-length", type=int, metavar="N",
                   help="--from-hf: training sequence length in the config (default: the model's positions)")
    g.add_argument("--make-vocab-size-divisible-by", type=int, default=128, metavar="N",
                   help="--from-hf: vocabulary padding multiple (default 128)")
    return p


def check_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> str:
    """The mode (reshard / to-hf / from-hf), or a usage error."""
    if args.from_hf is not None:
        if args.load is not None:
            p.error("--from-hf IN imports a Hugging Face folder: drop --load")
        if args.save is None:
            p.error("--from-hf IN needs --save OUT")
        return "from-hf"
    if args.load is None:
        p.error("--load DIR is required (or --from-hf IN)")
    if args.to_hf is not None:
        given = [f for f in ("target_tp", "target_pp", "target_zero_stage") if getattr(args, f) is not None]
        if given or args.target_vp != 1 or args.target_dp != 1:
            p.error("--target-* options apply to --save, not --to-hf")
        return "to-hf"
    if args.target_tp is None or args.target_pp is None:
        p.error("resharding (--load DIR --save OUT) needs --target-tp and --target-pp")
    return "reshard"


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, unit="piece", file=sys.stderr, leave=False, dynamic_ncols=True,
                disable=None)  # None: no bar when stderr is not a terminal (logs stay clean)


def check_new_output(out: Path, flag: str) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConfigError(f"{flag} {out}: already exists and is not an empty folder; choose a new folder")


def target_config(config: dict, args: argparse.Namespace) -> tuple[dict, RunConfig, list[str]]:
    """(the index config with the target layout, its RunConfig, notes)."""
    notes = []
    new = copy.deepcopy(config)
    par, zero = new.setdefault("parallel", {}), new.setdefault("zero", {})
    old_pp, old_vp = par.get("pipeline_model_parallel_size", 1), run_config_from_dict(config).virtual_pipeline_size()
    if par.get("context_parallel_size", 1) != 1:  # nothing saved depends on cp; the target is written as cp 1
        notes.append(f"context-parallel size {par['context_parallel_size']} -> 1 in the target's config (the "
                     f"checkpoint loads at any --context-parallel-size)")
    par.update(tensor_model_parallel_size=args.target_tp, pipeline_model_parallel_size=args.target_pp,
               context_parallel_size=1,
               virtual_pipeline_model_parallel_size=args.target_vp if args.target_vp != 1 else None,
               num_layers_per_virtual_pipeline_stage=None)
    if (args.target_pp, args.target_vp) != (old_pp, old_vp):
        for key in ("decoder_first_pipeline_num_layers", "decoder_last_pipeline_num_layers"):
            if par.get(key) is not None:
                notes.append(f"{key.replace('_', '-')} {par[key]} dropped (the pipeline changed): layers split evenly")
                par[key] = None
    if args.target_zero_stage is not None:
        zero["stage"] = args.target_zero_stage
    if zero.get("stage", 0) == 0 and zero.get("offload_optimizer", "none") != "none":
        notes.append(f"offload-optimizer {zero['offload_optimizer']} dropped (ZeRO stage 0 cannot offload)")
        zero["offload_optimizer"], zero["offload_nvme_path"] = "none", None
    if zero.get("stage", 0) != 3 and zero.get("offload_param", "none") != "none":
        notes.append(f"offload-param {zero['offload_param']} dropped (only ZeRO stage 3 shards parameters)")
        zero["offload_param"] = "none"
    cfg = run_config_from_dict(new)
    try:
        validate_layout(cfg, args.target_dp)
    except ConfigError as err:
        raise ConfigError(f"target layout tp{args.target_tp} pp{args.target_pp} vp{args.target_vp} dp{args.target_dp}: "
                          f"{err}") from None
    return new, cfg, notes


# ----- reshard -------------------------------------------------------------------------------------------
def reshard(args: argparse.Namespace) -> None:
    src = checkpoint_folder(args.load)
    out = Path(args.save)
    check_new_output(out, "--save")
    if out.resolve() in (src.resolve(), src.parent.resolve()):
        raise ConfigError(f"--save {out}: the same folder as --load; choose a new folder")
    reader = CheckpointReader(src)
    index = reader.index
    config, cfg, notes = target_config(index["config"], args)
    target = layout_dict(cfg, args.target_dp)
    saved = index["layout"]
    plan = plan_layout(cfg, args.target_dp)
    tensors = {n: (list(t["shape"]), t["dtype"]) for n, t in reader.tensors.items()}
    rng, rng_index = {}, {}
    if (saved["tp"], saved["pp"], saved["vp"]) == (target["tp"], target["pp"], target["vp"]):
        from megazero.topology import Coords, GridShape, coords_to_rank

        grid = GridShape(target["world"], tp=target["tp"], pp=target["pp"], cp=target["cp"])
        for coords, entry in index.get("rng", {}).items():
            pp_rank, tp_rank = (int(x[2:]) for x in coords.split("."))
            rank = coords_to_rank(Coords(tp=tp_rank, cp=0, dp=0, pp=pp_rank), grid)  # (dp, cp) 0 saves them
            names = [*entry["streams"], "ambient"]
            rng[rank] = {f"{entry['prefix']}/{s}": reader.get(entry["file"], f"{entry['prefix']}/{s}") for s in names}
            rng_index[coords] = {**entry, "file": rank_filename(rank)}
        rng_note = "RNG streams copied (tp, pp and vp unchanged)"
    else:
        rng_note = ("RNG streams not copied: tp/pp/vp changed, so a run loading this checkpoint keeps its own seeds "
                    "(as when it loads the original)")
    new_index = {key: value for key, value in index.items() if key not in ("tensors", "files", "rng")}
    new_index.update(megazero_version=megazero.__version__, layout=target, config=config, rng=rng_index,
                     converted_from={"path": str(src.resolve()), "layout": saved,
                                     "megazero_version": index.get("megazero_version")})
    extra = _tokenizer_files(src, index)
    with _bar(len(plan), "resharding") as bar:
        path = write_layout(out, new_index, plan, tensors, reader.read, rng=rng, extra_files=extra, bar=bar)
    describe = lambda lt: (f"tp{lt['tp']} pp{lt['pp']} vp{lt['vp']} dp{lt['dp']}"  # noqa: E731
                           f"{' cp%d' % lt['cp'] if lt.get('cp', 1) > 1 else ''} zero{lt['zero_stage']}")
    for note in notes:
        print(f"note: {note}")
    print(f"note: {rng_note}")
    print(f"wrote {path} (iteration {index['iteration']}): {describe(saved)} -> {describe(target)}, "
          f"{target['world']} rank(s), {_size(path)}")


def _tokenizer_files(src: Path, index: dict) -> list[Path]:
    """The tokenizer files a checkpoint holds (its index's "tokenizer" entry; or an older checkpoint's
    tokenizer.model): a converted checkpoint carries them, and the entry comes along with the index."""
    names = {*index["tokenizer"]["files"], TOKENIZER_FILE} if index.get("tokenizer") else {TOKENIZER_FILE}
    return [src / name for name in sorted(names) if (src / name).is_file()]


def _size(folder: Path) -> str:
    total = sum(p.stat().st_size for p in folder.iterdir() if p.is_file())
    return f"{total / 2**20:.1f} MiB"


# ----- Hugging Face export -------------------------------------------------------------------------------
def to_hf(args: argparse.Namespace) -> None:
    src = checkpoint_folder(args.load)
    out = Path(args.to_hf)
    check_new_output(out, "--to-hf")
    index = CheckpointReader(src, verify=False).index
    family, arch = hf.export_refusal(src, index)  # GPT-2 or Llama family, from the config; before any tensor
    if args.tokenizer_model and not Path(args.tokenizer_model).exists():
        raise ConfigError(f"--tokenizer-model {args.tokenizer_model}: file not found")
    if args.tokenizer_type and not args.tokenizer_model:
        raise ConfigError("--tokenizer-type says what --tokenizer-model is: add --tokenizer-model PATH or drop it")
    tokenizer, how = checkpoint_tokenizer(src, index, args.tokenizer_model, args.tokenizer_type)
    weights, cfg, _ = hf.export_tensors(src, family, args.dtype)
    eos = tokenizer.eos_id if tokenizer is not None else None
    bos = tokenizer.bos_id if tokenizer is not None and tokenizer.bos_id is not None else eos  # GPT-2's convention
    pad = tokenizer.pad_id if tokenizer is not None else None
    config = hf.export_config(family, cfg, src=src, index=index, dtype=args.dtype, bos_token_id=bos,
                              eos_token_id=eos, pad_token_id=pad)

    def write_tokenizer(folder: Path):
        if tokenizer is None:
            return None
        from megazero.data.hf_export import write_hf_tokenizer

        return write_hf_tokenizer(folder, tokenizer, model_max_length=cfg.max_positions)
    written = hf.write_hf_folder(out, weights, config, write_tokenizer)
    print(f"wrote {out}: {arch} ({cfg.num_layers} layers, hidden {cfg.hidden_size}, vocab {cfg.vocab_size}, "
          f"{args.dtype}) from {src} (iteration {index['iteration']}), {_size(out)}")
    if written is not None:
        print(f"tokenizer: {how} -> {', '.join(written['files'])}: {written['note']}; bos/eos/pad ids "
              f"{bos}/{eos}/{pad} in {hf.HF_CONFIG}")
    else:
        print(f"note: no tokenizer copied: {how}")


# ----- Hugging Face import -------------------------------------------------------------------------------
def from_hf(args: argparse.Namespace) -> None:
    src, out = Path(args.from_hf), Path(args.save)
    check_new_output(out, "--save")
    config = hf.read_hf_config(src)
    mcfg = hf.model_config_from_hf(config, src / hf.HF_CONFIG, seq_length=args.seq_length,
                                   make_vocab_size_divisible_by=args.make_vocab_size_divisible_by)
    tokenizer = _import_tokenizer(src, mcfg.vocab_size)  # before the weights: a bad file fails fast
    cfg = hf.import_run_config(mcfg, tp=args.target_tp or 1, pp=args.target_pp or 1, vp=args.target_vp,
                               dp=args.target_dp, zero_stage=args.target_zero_stage or 0,
                               params_dtype=args.params_dtype)
    state = hf.import_state(config, hf.read_hf_weights(src), mcfg, src)
    with tempfile.TemporaryDirectory() as staging:
        extra = [src / TOKENIZER_FILE] if (src / TOKENIZER_FILE).is_file() else []  # for sentencepiece users
        index_extra = None
        if tokenizer is not None:
            files = tokenizer.checkpoint_files()
            index_extra = {"tokenizer": tokenizer_record(tokenizer, files)}
            extra = [Path(staging) / n for n in write_tokenizer_files(files, staging)] + \
                [f for f in extra if f.name not in files]
        path, layout = hf.write_import(out, cfg, args.target_dp, state, source=src,
                                       source_format=f"huggingface-{config['model_type']}", extra_files=extra,
                                       index_extra=index_extra, make_bar=lambda total: _bar(total, "importing"))
    print(f"wrote {path} (iteration 0) from {src} ({config['model_type']}: {describe_parts(mcfg)}): "
          f"{mcfg.num_layers} layers, hidden {mcfg.hidden_size}, {mcfg.num_attention_heads} heads, vocab "
          f"{mcfg.vocab_size}, positions {mcfg.max_positions}; "
          f"tp{layout['tp']} pp{layout['pp']} vp{layout['vp']} dp{layout['dp']} zero{layout['zero_stage']}, "
          f"{args.params_dtype}; "
          f"no optimizer state: a plain --load starts a fresh optimizer (any --optimizer), {_size(path)}")
    flags, missing = hf.run_flags(mcfg)
    print(f"model flags for pretrain_gpt.py --load {out}: {flags}"
          + (f" (no flag sets {', '.join(missing)}: a run cannot reproduce them)" if missing else ""))
    if tokenizer is not None:
        print(f"tokenizer: {tokenizer.type} from {src}, copied as {', '.join(sorted(p.name for p in extra))} "
              f"(bos/eos/pad ids {tokenizer.bos_id}/{tokenizer.eos_id}/{tokenizer.pad_id}); train on with "
              f"--tokenizer-type {tokenizer.type} --tokenizer-model "
              f"{path / TOKENIZER_FILE if tokenizer.type == 'SentencePieceTokenizer' else path}")
    else:
        print(f"tokenizer: copied {path / TOKENIZER_FILE}" if extra
              else f"tokenizer: none (no tokenizer.json or {TOKENIZER_FILE} in {src})")


def _import_tokenizer(src: Path, vocab: int):
    """The tokenizer of the Hugging Face folder `src` (tokenizer.json, else tokenizer.model), or None."""
    tokenizer = tokenizer_in_folder(src)
    if tokenizer is not None and tokenizer.vocab_size > vocab:
        raise ConfigError(f"{src}: its tokenizer has {tokenizer.vocab_size} ids but the model's vocabulary only "
                          f"{vocab}; the folder's tokenizer does not belong to this model")
    return tokenizer


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()

    def convert(args: argparse.Namespace) -> None:
        {"reshard": reshard, "to-hf": to_hf, "from-hf": from_hf}[check_args(parser, args)](args)
    return run_tool(convert, parser, argv)


if __name__ == "__main__":
    sys.exit(main())
