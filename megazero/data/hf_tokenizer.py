"""A Hugging Face `tokenizer.json` as a megazero tokenizer (`--tokenizer-type HuggingFaceTokenizer`).

Loaded with the `tokenizers` package from local files only (never from the hub): `--tokenizer-model` names
a tokenizer.json, or a folder holding one (a Hugging Face model folder). Encoding is what
`AutoTokenizer.from_pretrained(folder)(text).input_ids` gives, and what Megatron's HuggingFaceTokenizer
feeds its preprocessing: the tokenizer's own post-processor runs, so a tokenizer that adds a bos token
(Llama) starts every document with it; special-token strings in the text are matched as special tokens.

Special tokens (bos, eos, pad) are read, first found wins, from:
1. `tokenizer_config.json` beside the tokenizer.json (`"eos_token": "</s>"` or `{"content": "</s>", ...}`),
2. `special_tokens_map.json` beside it,
3. `config.json` beside it (a model folder: `eos_token_id`; the first id of a list),
4. else a special token of the tokenizer.json with a conventional name (`</s>`, `<|endoftext|>`, ...), so a
   tokenizer trained with the `tokenizers` library alone, with no config files, still has its eos.
`eod_id` (appended after every document by preprocessing) is the eos id, None when there is none.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from megazero.errors import DataError

TOKENIZER_JSON = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
SPECIAL_TOKENS_MAP = "special_tokens_map.json"
ROLES = ("bos", "eos", "pad")
# Step 4 above: names the common tokenizers give these tokens (GPT-2, Llama 2/3, Gemma, Mistral, BERT-likes).
_CONVENTIONAL = {"bos": ("<s>", "<|begin_of_text|>", "<bos>", "<|startoftext|>"),
                 "eos": ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"),
                 "pad": ("<pad>", "[PAD]", "<|pad|>", "<|padding|>")}


def _tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise DataError("--tokenizer-type HuggingFaceTokenizer needs the `tokenizers` package; "
                        "pip install tokenizers") from None
    return tokenizers


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DataError(f"{path}: unreadable JSON ({' '.join(str(err).split())}); fix or remove the file") from None
    if not isinstance(data, dict):
        raise DataError(f"{path}: expected a JSON object; fix or remove the file")
    return data


def _token_content(value) -> str | None:
    """A special token as tokenizer_config.json / special_tokens_map.json write it: a string or an
    AddedToken dict {"content": ...}."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _model_config(path: Path) -> dict:
    """A model folder's config.json, read only for its special-token ids (step 3): {} when absent or not
    a JSON object (a folder may hold some other config.json)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


class HuggingFaceTokenizer:
    """A tokenizer.json (`tokenizers.Tokenizer.from_file`) with megazero's tokenizer interface
    (megazero/data/tokenizer_types.py). `model_path` is what was given (file or folder); `json_path` the
    tokenizer.json; `config` the tokenizer_config.json beside it ({} when absent)."""

    type = "HuggingFaceTokenizer"

    def __init__(self, model_path: str | Path):
        self.model_path = Path(model_path)
        path = self.model_path
        if path.is_dir():
            path = path / TOKENIZER_JSON
            if not path.is_file():
                spm_model = self.model_path / "tokenizer.model"
                hint = (f"; it has {spm_model.name}: pass --tokenizer-type SentencePieceTokenizer --tokenizer-model "
                        f"{spm_model}" if spm_model.is_file() else "; pass the tokenizer.json or its folder")
                raise DataError(f"{self.model_path}: no {TOKENIZER_JSON} in this folder{hint}")
        elif not path.is_file():
            raise DataError(f"{path}: tokenizer not found; pass a Hugging Face tokenizer.json or the folder holding it")
        self.json_path = path
        tokenizers = _tokenizers()
        try:
            with open(path, "rb") as f:
                is_json = f.read(64).lstrip().startswith(b"{")
        except OSError as err:
            raise DataError(f"{path}: cannot read the tokenizer ({err.strerror}); check the file") from None
        if not is_json:  # a sentencepiece .model is binary protobuf
            raise DataError(f"{path}: not a Hugging Face tokenizer.json (not JSON: a sentencepiece model? then pass "
                            f"--tokenizer-type SentencePieceTokenizer)")
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust side raises a bare Exception for a malformed file
            first = " ".join(str(err).split())[:200]
            raise DataError(f"{path}: not a Hugging Face tokenizer.json ({first}); pass the tokenizer.json "
                            f"the tokenizers library saved") from None
        folder = path.parent
        self.config = _read_json(folder / TOKENIZER_CONFIG) if (folder / TOKENIZER_CONFIG).is_file() else {}
        self._special_map = (_read_json(folder / SPECIAL_TOKENS_MAP)
                             if (folder / SPECIAL_TOKENS_MAP).is_file() else {})
        self._model_config = _model_config(folder / "config.json")
        vocab = self._tok.get_vocab(with_added_tokens=True)
        if not vocab:
            raise DataError(f"{path}: the tokenizer has an empty vocabulary; pass a trained tokenizer.json")
        # ids index the embedding table: the size is one past the largest id (added tokens included)
        self.vocab_size: int = max(vocab.values()) + 1
        ids = {role: self._special_id(role) for role in ROLES}
        self.bos_id: int | None = ids["bos"]
        self.eos_id: int | None = ids["eos"]
        self.pad_id: int | None = ids["pad"]
        self.eod_id: int | None = self.eos_id

    def _special_id(self, role: str) -> int | None:
        key = f"{role}_token"
        for source, where in ((self.config, TOKENIZER_CONFIG), (self._special_map, SPECIAL_TOKENS_MAP)):
            if key in source:
                content = _token_content(source[key])
                if content is None:
                    return None  # named as null: the tokenizer has none
                token_id = self._tok.token_to_id(content)
                if token_id is None:
                    raise DataError(f"{self.json_path.parent / where}: {key} {content!r} is not in "
                                    f"{self.json_path.name}; fix the {key} entry")
                return token_id
        value = self._model_config.get(f"{role}_token_id")
        if isinstance(value, list):
            value = value[0] if value else None
        if isinstance(value, int) and self._tok.id_to_token(value) is not None:
            return value
        specials = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        for name in _CONVENTIONAL[role]:
            if name in specials:
                return self._tok.token_to_id(name)
        return None

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        """Encode many texts at once (the Rust library parallelises this itself; num_threads is for
        the interface: sentencepiece's batch encoder takes it)."""
        return [e.ids for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        if hasattr(ids, "tolist"):  # numpy array or torch tensor
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def token_string(self, i: int | None) -> str | None:
        return None if i is None else self._tok.id_to_token(int(i))

    def completed_config(self) -> dict:
        """tokenizer_config.json as the checkpoint and an export keep it: the original's keys, plus the
        special tokens this tokenizer resolved, null for those it has none of (so a copy read without
        config.json or the name guess of step 4 resolves the same ids), and a tokenizer class (PreTrainedTokenizerFast: transformers'
        class for a plain tokenizer.json) when the original names none."""
        config = dict(self.config)
        for role in ROLES:
            token_id = getattr(self, f"{role}_id")
            if token_id is not None and _token_content(config.get(f"{role}_token")) is None:
                config[f"{role}_token"] = self._tok.id_to_token(token_id)
            elif token_id is None:
                config[f"{role}_token"] = None  # none, said explicitly: a config.json beside it is not asked
        config.setdefault("tokenizer_class", "PreTrainedTokenizerFast")
        return config

    def checkpoint_files(self) -> dict[str, Path | bytes]:
        """What a checkpoint keeps of this tokenizer: {file name: source path or content}."""
        files: dict[str, Path | bytes] = {TOKENIZER_JSON: self.json_path}
        files[TOKENIZER_CONFIG] = (json.dumps(self.completed_config(), indent=2, ensure_ascii=False) + "\n").encode()
        if (self.json_path.parent / SPECIAL_TOKENS_MAP).is_file():
            files[SPECIAL_TOKENS_MAP] = self.json_path.parent / SPECIAL_TOKENS_MAP
        return files

    def __reduce__(self):
        return (HuggingFaceTokenizer, (self.model_path,))

    def __repr__(self) -> str:
        return (f"HuggingFaceTokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size}, "
                f"bos_id={self.bos_id}, eos_id={self.eos_id}, pad_id={self.pad_id})")
