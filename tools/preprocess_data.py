r"""Tokenize text or JSON Lines files into a megazero indexed dataset (PREFIX.bin + PREFIX.idx).

    python tools/preprocess_data.py --input a.txt b.jsonl --output-prefix data/corpus --vocab-size 8192
    python tools/preprocess_data.py --input more.txt --output-prefix data/more \
        --tokenizer-model data/corpus.model
    python tools/preprocess_data.py --input a.jsonl --output-prefix data/hf \
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model path/to/tokenizer.json

With --vocab-size a byte-fallback BPE sentencepiece tokenizer is trained on the inputs first and
written to PREFIX.model; --tokenizer-type HuggingFaceTokenizer encodes with a Hugging Face
tokenizer.json (or a model folder holding one), offline. Plain-text inputs are cut into documents at
blank lines by default (--split-documents file keeps each file whole); .jsonl/.json inputs give one
document per line (the string under --json-key). Every document is followed by the tokenizer's eod
(eos) token unless --no-append-eod. Outputs appear only when complete; on any error none are left behind.
Bad input: one line `error: ...` on stderr and exit code 2. See docs/data.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

try:
    import megazero  # noqa: F401
except ImportError:  # run as a script from a checkout: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tqdm import tqdm

from megazero.data.indexed_dataset import bin_path, idx_path
from megazero.data.preprocess import write_dataset
from megazero.data.text_input import SPLIT_MODES, check_input_file, is_json_lines, iter_documents
from megazero.data.tokenizer import Tokenizer, train_tokenizer
from megazero.data.tokenizer_types import build_tokenizer
from megazero.cli import OneLineParser, run_tool
from megazero.config import SEED_MAX
from megazero.errors import ConfigError


def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(description="Tokenize text/JSONL files into a megazero .bin/.idx dataset.")
    p.add_argument("--input", nargs="+", required=True, metavar="FILE",
                   help="plain-text files, or JSON Lines files (.jsonl/.json) with one document per line")
    p.add_argument("--output-prefix", required=True, metavar="PREFIX",
                   help="writes PREFIX.bin and PREFIX.idx (and PREFIX.model with --vocab-size)")
    tok = p.add_mutually_exclusive_group(required=True)
    tok.add_argument("--tokenizer-model", metavar="FILE",
                     help="an existing sentencepiece .model file, or with --tokenizer-type HuggingFaceTokenizer a "
                          "tokenizer.json or the folder holding it")
    tok.add_argument("--vocab-size", type=int, metavar="N",
                     help="train a BPE tokenizer with N pieces on the inputs, saved as PREFIX.model")
    p.add_argument("--tokenizer-type", choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"],
                   default="SentencePieceTokenizer",
                   help="what --tokenizer-model is (default SentencePieceTokenizer; --vocab-size trains one)")
    p.add_argument("--json-key", default="text", help="key of the text in JSON Lines records (default: text)")
    p.add_argument("--split-documents", choices=SPLIT_MODES, default="blank-lines",
                   help="how plain text is cut into documents: at blank lines (default) or one per file")
    p.add_argument("--append-eod", action=argparse.BooleanOptionalAction, default=True,
                   help="append the eod token after every document (default: on)")
    p.add_argument("--workers", type=int, default=1, metavar="N", help="tokenizer threads (default: 1)")
    p.add_argument("--tokenizer-max-chars", type=int, default=20_000_000, metavar="N",
                   help="with --vocab-size: train on a sample of at most N characters (default: 20M)")
    p.add_argument("--seed", type=int, default=1234, help="with --vocab-size: sampling seed (default: 1234)")
    return p


def _documents(paths: Sequence[Path], args: argparse.Namespace, bar: tqdm) -> Iterator[str]:
    for path in paths:
        for doc in iter_documents(path, json_key=args.json_key, split=args.split_documents):
            bar.update(len(doc.encode("utf-8")) + 1)  # +1: the separator; progress is approximate
            yield doc


def run(args: argparse.Namespace) -> None:
    if args.workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {args.workers}")
    if not 0 <= args.seed <= SEED_MAX:  # numpy's seed range, as for pretrain_gpt.py --seed
        raise ConfigError(f"--seed must be in [0, {SEED_MAX}], got {args.seed}")
    if args.tokenizer_max_chars < 1:
        raise ConfigError(f"--tokenizer-max-chars must be >= 1, got {args.tokenizer_max_chars}")
    if args.vocab_size is not None and args.tokenizer_type != "SentencePieceTokenizer":
        raise ConfigError(f"--vocab-size trains a sentencepiece tokenizer; with --tokenizer-type {args.tokenizer_type} "
                          f"pass --tokenizer-model (its tokenizer.json) instead")
    paths = [check_input_file(p) for p in args.input]
    for path in paths:  # fail fast on a wrong --json-key, before any long work
        if is_json_lines(path):
            next(iter_documents(path, json_key=args.json_key), None)
    if args.tokenizer_model is not None:  # loaded before any long work: a bad file fails fast
        tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    prefix = Path(args.output_prefix)
    outputs = [bin_path(prefix), idx_path(prefix)]
    start = time.time()

    model_path = Path(f"{prefix}.model")
    tmp_model = model_path.with_name(f".{model_path.name}.{os.getpid()}.tmp")
    try:
        if args.vocab_size is not None:
            train_tokenizer(paths, tmp_model, args.vocab_size, json_key=args.json_key,
                            max_chars=args.tokenizer_max_chars, seed=args.seed)
            tokenizer = Tokenizer(tmp_model)
        total_bytes = sum(p.stat().st_size for p in paths)
        with tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing",
                  disable=None) as bar:  # None: no bar unless stderr is a terminal
            stats = write_dataset(_documents(paths, args, bar), tokenizer, prefix,
                                  append_eod=args.append_eod, num_threads=args.workers)
            bar.update(max(0, bar.total - bar.n))
        if args.vocab_size is not None:
            tmp_model.replace(model_path)
            tokenizer = Tokenizer(model_path)
            outputs.append(model_path)
    finally:
        tmp_model.unlink(missing_ok=True)

    print(f"wrote {stats.num_documents:,} documents, {stats.num_tokens:,} tokens "
          f"(vocab {tokenizer.vocab_size:,}, tokenizer {tokenizer.model_path} ({tokenizer.type}), "
          f"eod {'appended' if args.append_eod else 'not appended'}) to "
          f"{', '.join(map(str, outputs))} in {time.time() - start:.1f} s")


def main(argv: Sequence[str] | None = None) -> int:
    return run_tool(run, build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
