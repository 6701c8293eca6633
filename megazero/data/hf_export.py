"""Writing a run's tokenizer into a Hugging Face model folder: `write_hf_tokenizer(out_dir, tokenizer)`, so
that `transformers.AutoTokenizer.from_pretrained(out_dir)` loads it offline and encodes text to the ids the
run trained on. Model exporters (GPT-2, Llama) call it and put the ids it returns into config.json.

* HuggingFaceTokenizer: its tokenizer.json as is, tokenizer_config.json with the special tokens it resolved
  (HuggingFaceTokenizer.completed_config), special_tokens_map.json when it had one.
* SentencePieceTokenizer: tokenizer.model (for sentencepiece users), and a tokenizer.json converted from it
  (`spm_to_tokenizers`) with a tokenizer_config.json naming the generic fast class
  (PreTrainedTokenizerFast), its eos/unk/bos/pad pieces, and `split_special_tokens: true`: sentencepiece
  never reads "</s>" in text as the eos token, so neither does the export (transformers would by default).

The conversion follows the sentencepiece model's own settings the way transformers converts one
(SpmConverter.build_tokenizer_from_spm_proto): its normalizer spec, BPE merges ranked by piece score, byte
fallback, user-defined pieces emitted whole. For megazero's own models (BPE, identity normalisation, no
dummy prefix, "\\n" user-defined) it is exact: the export checks it on a fixed sample of prose, code,
whitespace runs, digits and characters that need byte fallback, and says so. A Unigram model converts
too, but its ties can split a few words differently; the check reports them.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from megazero.data.hf_tokenizer import SPECIAL_TOKENS_MAP, TOKENIZER_CONFIG, TOKENIZER_JSON, _tokenizers
from megazero.data.tokenizer_types import TokenizerLike

# The export's self-check: text whose ids must agree between sentencepiece and the converted tokenizer.
CHECK_SAMPLE = (
    "The quick brown fox jumps over the lazy dog. It said: \u201cno!\u201d",
    "def f(x, y=0x1F):\n    return {'k': [x ** 2 for x in range(10)]}  # comment\n\t\tindented\n",
    "  leading spaces, trailing spaces  ", "\n\n\nnew\nlines\n", "3.14159 2024-01-31 1,234,567",
    "caf\u00e9 na\u00efve \u00fcber \u00c5ngstr\u00f6m \u65e5\u672c\u8a9e \u0442\u0435\u043a\u0441\u0442 "
    "\U0001f600\U0001f680 \u200b\u00a0", "</s> <unk> <s> <0x41> \u2581 literal markers", "", " ", "x",
)


def write_hf_tokenizer(out_dir: str | Path, tokenizer: TokenizerLike, *, model_max_length: int | None = None) -> dict:
    """Write `tokenizer` (a megazero tokenizer: megazero.data.build_tokenizer, or
    megazero.checkpoint.api.checkpoint_tokenizer for a checkpoint's) into the existing folder `out_dir`.

    Returns {"bos_token_id", "eos_token_id", "pad_token_id": ids or None, for config.json;
    "files": the names written; "note": one line on how AutoTokenizer will load it}."""
    out = Path(out_dir)
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    if tokenizer.type == "HuggingFaceTokenizer":
        shutil.copyfile(tokenizer.json_path, out / TOKENIZER_JSON)
        config = tokenizer.completed_config()
        if model_max_length is not None:
            config.setdefault("model_max_length", model_max_length)
        _write_json(out / TOKENIZER_CONFIG, config)
        files = [TOKENIZER_JSON, TOKENIZER_CONFIG]
        if (tokenizer.json_path.parent / SPECIAL_TOKENS_MAP).is_file():
            shutil.copyfile(tokenizer.json_path.parent / SPECIAL_TOKENS_MAP, out / SPECIAL_TOKENS_MAP)
            files.append(SPECIAL_TOKENS_MAP)
        return {**ids, "files": files, "note": f"{TOKENIZER_JSON} copied (HuggingFaceTokenizer)"}

    shutil.copyfile(tokenizer.model_path, out / tokenizer.CHECKPOINT_FILE)
    files = [tokenizer.CHECKPOINT_FILE]
    converted, why = spm_to_tokenizers(tokenizer.model_path)
    if converted is None:
        return {**ids, "files": files, "note": f"{tokenizer.CHECKPOINT_FILE} only ({why}): AutoTokenizer cannot load "
                                               f"it; use sentencepiece"}
    converted.save(str(out / TOKENIZER_JSON))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "split_special_tokens": True,
              "clean_up_tokenization_spaces": False}
    for role in ("bos", "eos", "unk", "pad"):  # null when absent: an import reads no other source then
        config[f"{role}_token"] = tokenizer.token_string(getattr(tokenizer, f"{role}_id"))
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    _write_json(out / TOKENIZER_CONFIG, config)
    files += [TOKENIZER_JSON, TOKENIZER_CONFIG]
    differ = sum(tokenizer.encode(t) != converted.encode(t, add_special_tokens=False).ids for t in CHECK_SAMPLE)
    check = (f"encodes the {len(CHECK_SAMPLE)} check texts as sentencepiece does" if not differ else
             f"differs from sentencepiece on {differ} of {len(CHECK_SAMPLE)} check texts ({why}); "
             f"{tokenizer.CHECKPOINT_FILE} is the reference")
    return {**ids, "files": files, "note": f"{TOKENIZER_JSON} converted from the sentencepiece model, {check}"}


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def spm_to_tokenizers(model_path: str | Path):
    """(a `tokenizers.Tokenizer` encoding like the sentencepiece model at `model_path`, or None; a word on
    the model kind, or why it could not be converted). BPE and Unigram models convert; word and char
    models do not."""
    tokenizers = _tokenizers()
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from tokenizers.models import BPE, Unigram

    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:  # sentencepiece's generated module needs protobuf
        return None, "reading a sentencepiece model's settings needs protobuf: pip install protobuf"
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    trainer, spec = proto.trainer_spec, proto.normalizer_spec
    pieces = list(proto.pieces)
    # sentencepiece piece types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    user = [p.piece for p in pieces if p.type == 4]
    if trainer.model_type == 2:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        normal = {p.piece: (p.score, i) for i, p in enumerate(pieces) if p.type == 1}
        # sentencepiece merges the adjacent pair whose union has the best score: rank merges by that score
        ranked = sorted((-score, i, piece[:k], piece[k:]) for piece, (score, i) in normal.items()
                        for k in range(1, len(piece)) if piece[:k] in normal and piece[k:] in normal)
        # ignore_merges emits a whole chunk found in the vocabulary as is: needed for a multi-character
        # user-defined piece (isolated below), but it would also turn a line reading "</s>" into the control
        # token, so it is off when every user-defined piece is one character (megazero's "\n")
        model = BPE(vocab=vocab, merges=[(a, b) for _, _, a, b in ranked], unk_token=trainer.unk_piece,
                    fuse_unk=True, byte_fallback=trainer.byte_fallback,
                    ignore_merges=any(len(u) > 1 for u in user))
        kind = "BPE"
    elif trainer.model_type == 1:
        model = Unigram([(p.piece, p.score) for p in pieces], unk_id=trainer.unk_id,
                        byte_fallback=trainer.byte_fallback)
        kind = "a Unigram model: ties may split words differently"
    else:
        return None, f"sentencepiece model type {trainer.model_type} (word/char) has no tokenizer.json equivalent"
    tok = tokenizers.Tokenizer(model)
    steps = []  # sentencepiece's normaliser, in its order
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:  # spaces only: sentencepiece leaves newlines alone
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.escape_whitespaces:
        steps.append(normalizers.Replace(" ", "\u2581"))
    if spec.add_dummy_prefix:  # sentencepiece prefixes "▁" even before a leading "▁"; Metaspace would not
        steps.append(normalizers.Replace(Regex("\\A\u2581"), "\u2581\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    pre = []
    if spec.add_dummy_prefix:
        pre.append(pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always", split=False))
    if user:  # sentencepiece emits user-defined pieces whole and never merges into them
        pattern = "|".join(re.escape(u) for u in sorted(user, key=len, reverse=True))
        pre.append(pre_tokenizers.Split(Regex(pattern), behavior="isolated"))
    if pre:
        tok.pre_tokenizer = pre_tokenizers.Sequence(pre)
    dec = [decoders.Replace("\u2581", " ")]
    if trainer.byte_fallback:
        dec.append(decoders.ByteFallback())
    if spec.add_dummy_prefix:
        dec += [decoders.Fuse(), decoders.Strip(content=" ", left=1)]
    elif trainer.byte_fallback:
        dec.append(decoders.Fuse())
    tok.decoder = decoders.Sequence(dec)
    # Control pieces (</s>) are not added tokens here: sentencepiece never reads them in text. transformers
    # registers the ones tokenizer_config.json names as special tokens (decode(skip_special_tokens=True)
    # drops them), and split_special_tokens there keeps it from reading them in text either.
    return tok, kind
