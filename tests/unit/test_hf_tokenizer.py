"""Tokenizers users already have (#12 item 6): `--tokenizer-type HuggingFaceTokenizer` (a tokenizer.json read
offline with the `tokenizers` package) in preprocessing and training; checkpoints copy the run's tokenizer and
record it ({"type", "files", "bos_id", "eos_id", "pad_id"}); `--to-hf` writes it so that
`transformers.AutoTokenizer.from_pretrained(OUT)` encodes text to the ids the run trained on, for
sentencepiece and Hugging Face tokenizers alike, and config.json carries the special ids; `--from-hf` brings a
folder's tokenizer.json in. The tokenizers are trained here on the generated corpus (no network, no data)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from megazero.config import DataConfig, RunConfig
from megazero.data import IndexedDataset, Tokenizer, build_tokenizer
from megazero.data.hf_export import spm_to_tokenizers
from megazero.errors import ConfigError, DataError

pytest.importorskip("tokenizers")  # comes with transformers (the test extra)
REPO = Path(__file__).resolve().parents[2]
HF_VOCAB = 600
# Prose, code, whitespace runs, digits, special-token strings and characters only byte fallback can encode.
SAMPLE = ["The quick brown fox jumps over the lazy dog.", "def f(x):\n    return x ** 2  # square\n\n\tdone",
          "  two  spaces  ", "12345 3.14159", "caf\u00e9 \u65e5\u672c\u8a9e \U0001f600 \u0442\u0435\u043a\u0441\u0442",
          "</s> <s> <unk> <|endoftext|> <0x41>", "\n", ""]
TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--seq-length", "32",
        "--micro-batch-size", "2", "--global-batch-size", "4", "--lr", "2e-3", "--split", "90,10,0",
        "--train-iters", "2", "--log-interval", "1", "--eval-interval", "100", "--eval-iters", "0",
        "--no-tensorboard"]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


preprocess, convert = _tool("preprocess_data"), _tool("convert_checkpoint")


def _train_hf(folder: Path, lines: list[str], llama: bool) -> Path:
    """A byte-level BPE tokenizer.json (lossless for any text). llama: <s>/</s>/<pad>, a post-processor that
    starts every text with <s>, and a tokenizer_config.json naming them; else GPT-2 style: <|endoftext|>
    only and no config file (megazero finds the eos by its name)."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    folder.mkdir(parents=True)
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>"] if llama else ["<|endoftext|>"]
    trainer = trainers.BpeTrainer(vocab_size=HF_VOCAB, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(lines, trainer)
    if llama:
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        eos = {"__type": "AddedToken", "content": "</s>", "lstrip": False, "normalized": False, "rstrip": False,
               "single_word": False, "special": True}  # as older hub configs write a token
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": eos, "pad_token": "<pad>"}))
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def hf(corpus_dir, tmp_path_factory):
    """{"gpt2": a bare tokenizer.json file, "llama": a folder with tokenizer.json + tokenizer_config.json,
    "text": the 100 KB the datasets are made of}."""
    root = tmp_path_factory.mktemp("hf_tokenizers")
    text = (corpus_dir / "prose.txt").read_text(encoding="utf-8")[:100_000]
    (root / "text.txt").write_text(text, encoding="utf-8")
    lines = text.splitlines()
    return {"gpt2": _train_hf(root / "gpt2", lines, llama=False) / "tokenizer.json",
            "llama": _train_hf(root / "llama", lines, llama=True), "text": root / "text.txt"}


def _preprocess(capsys, *args) -> tuple[int, str]:
    code = preprocess.main([str(a) for a in args])
    return code, capsys.readouterr().err.strip()


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def hf_dataset(hf, tmp_path_factory):
    """The llama-style tokenizer's dataset of hf["text"] (prefix)."""
    prefix = tmp_path_factory.mktemp("hf_data") / "corpus"
    assert preprocess.main(["--input", str(hf["text"]), "--output-prefix", str(prefix),
                            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(hf["llama"])]) == 0
    return prefix


# ----- the tokenizer -----------------------------------------------------------------------------------------
def test_special_ids_from_config_or_by_name(hf, tmp_path):
    bare = build_tokenizer("HuggingFaceTokenizer", hf["gpt2"])  # a file, no config: eos found by its name
    assert (bare.vocab_size, bare.bos_id, bare.eos_id, bare.eod_id, bare.pad_id) == (HF_VOCAB, None, 0, 0, None)
    llama = build_tokenizer("HuggingFaceTokenizer", hf["llama"])  # a folder: tokenizer_config.json names them
    assert (llama.vocab_size, llama.bos_id, llama.eos_id, llama.pad_id) == (HF_VOCAB, 0, 1, 2)
    for text in SAMPLE:
        ids = llama.encode(text)
        assert ids[0] == 0 and llama.decode(ids) == "<s>" + text  # its post-processor adds <s>; lossless
        assert bare.decode(bare.encode(text)) == text
    assert llama.encode_batch(SAMPLE) == [llama.encode(t) for t in SAMPLE]
    # a model folder's config.json supplies ids its tokenizer files do not name
    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(hf["gpt2"], folder / "tokenizer.json")
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2", "bos_token_id": 0, "eos_token_id": [0, 5]}))
    from_model_config = build_tokenizer("HuggingFaceTokenizer", folder)
    assert (from_model_config.bos_id, from_model_config.eos_id) == (0, 0)


def test_wrong_tokenizer_files_are_one_line_errors(hf, tiny_dataset, tmp_path):
    _, spm_model = tiny_dataset
    (tmp_path / "empty").mkdir()
    (tmp_path / "bad.json").write_text('{"not": "a tokenizer"}')
    (tmp_path / "cfg").mkdir()
    shutil.copy(hf["gpt2"], tmp_path / "cfg" / "tokenizer.json")
    (tmp_path / "cfg" / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<nope>"}))
    cases = [("HuggingFaceTokenizer", spm_model, "--tokenizer-type SentencePieceTokenizer"),
             ("SentencePieceTokenizer", hf["gpt2"], "--tokenizer-type HuggingFaceTokenizer"),
             ("SentencePieceTokenizer", hf["llama"], "--tokenizer-type HuggingFaceTokenizer"),
             ("HuggingFaceTokenizer", tmp_path / "none.json", "not found"),
             ("HuggingFaceTokenizer", tmp_path / "empty", "no tokenizer.json in this folder"),
             ("HuggingFaceTokenizer", tmp_path / "bad.json", "not a Hugging Face tokenizer.json"),
             ("HuggingFaceTokenizer", tmp_path / "cfg", "eos_token '<nope>' is not in tokenizer.json"),
             ("WordPiece", hf["gpt2"], "--tokenizer-type must be one of")]
    for kind, path, words in cases:
        with pytest.raises(DataError) as err:
            build_tokenizer(kind, path)
        assert words in str(err.value) and "\n" not in str(err.value), (kind, path, str(err.value))


# ----- preprocessing -----------------------------------------------------------------------------------------
def test_preprocess_with_a_hugging_face_tokenizer(hf, hf_dataset, tmp_path, capsys):
    from megazero.data.text_input import iter_documents

    llama = build_tokenizer("HuggingFaceTokenizer", hf["llama"])
    ds = IndexedDataset(hf_dataset)
    docs = list(iter_documents(hf["text"]))
    assert ds.vocab_size == HF_VOCAB and ds.dtype == np.uint16 and len(ds) == len(docs) > 100
    for i in (0, 1, len(docs) - 1):  # <s> (its post-processor), the text, </s> (appended once)
        assert ds[i].tolist() == llama.encode(docs[i]) + [1] and llama.decode(ds[i][1:-1]) == docs[i]
    # the GPT-2 style file: eos <|endoftext|> (id 0) found by name and appended
    code, err = _preprocess(capsys, "--input", hf["text"], "--output-prefix", tmp_path / "gpt2",
                            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf["gpt2"])
    assert code == 0, err
    bare, gpt2 = build_tokenizer("HuggingFaceTokenizer", hf["gpt2"]), IndexedDataset(tmp_path / "gpt2")
    assert gpt2[0].tolist() == bare.encode(docs[0]) + [0]


def test_preprocess_bad_tokenizer_input_is_one_line(hf, tiny_dataset, tmp_path, capsys):
    _, spm_model = tiny_dataset
    no_eos = tmp_path / "noeos"
    no_eos.mkdir()
    shutil.copy(hf["gpt2"], no_eos / "tokenizer.json")
    (no_eos / "tokenizer_config.json").write_text(json.dumps({"eos_token": None}))
    hf_type = ["--tokenizer-type", "HuggingFaceTokenizer"]
    cases = [([*hf_type, "--tokenizer-model", spm_model], "SentencePieceTokenizer"),
             (["--tokenizer-model", hf["gpt2"]], "--tokenizer-type HuggingFaceTokenizer"),
             ([*hf_type, "--tokenizer-model", tmp_path / "missing"], "not found"),
             ([*hf_type, "--vocab-size", "500"], "--vocab-size trains a sentencepiece tokenizer"),
             ([*hf_type, "--tokenizer-model", no_eos], "no eos token")]
    for args, words in cases:
        code, err = _preprocess(capsys, "--input", hf["text"], "--output-prefix", tmp_path / "out", *args)
        assert code == 2 and words in _one_line(err), (args, err)
        assert not list(tmp_path.glob("out*")), args
    code, err = _preprocess(capsys, "--input", hf["text"], "--output-prefix", tmp_path / "out", *hf_type,
                            "--tokenizer-model", no_eos, "--no-append-eod")
    assert code == 0, err


# ----- training ----------------------------------------------------------------------------------------------
def test_training_resolves_the_hugging_face_tokenizer(hf, hf_dataset, tiny_dataset):
    from megazero.training.data_setup import build_datasets, resolve_data
    from megazero.validation import validate

    def config(**data) -> RunConfig:
        return RunConfig(data=DataConfig(**data)).replace(
            model={"seq_length": 32}, training={"micro_batch_size": 2, "train_iters": 2, "eval_iters": 1})

    cfg = config(data_path=str(hf_dataset), tokenizer_model=str(hf["llama"]), tokenizer_type="HuggingFaceTokenizer",
                 split="90,10,0")
    validate(cfg, 1)  # a folder is a valid --tokenizer-model
    data = resolve_data(cfg, log=lambda _: None)
    assert data.vocab_size == HF_VOCAB and data.tokenizer_model == hf["llama"]
    assert build_datasets(cfg.resolved(1), data, 1)["train"][0]["tokens"].shape == (32,)
    with pytest.raises(ConfigError, match="HuggingFaceTokenizer needs --tokenizer-model"):
        validate(config(tokenizer_type="HuggingFaceTokenizer"), 1)
    with pytest.raises(ConfigError, match="--tokenizer-type must be one of"):
        validate(config(data_path=str(hf_dataset), tokenizer_model=str(hf["llama"]), tokenizer_type="gpt2"), 1)
    with pytest.raises(DataError, match="vocab size 512 .* vocab size 600"):  # the data's tokenizer, another's file
        resolve_data(config(data_path=str(hf_dataset), tokenizer_model=str(tiny_dataset[1])), log=lambda _: None)
    with pytest.raises(DataError, match="--tokenizer-type SentencePieceTokenizer"):  # right file, wrong type
        resolve_data(config(data_path=str(tiny_dataset[0]), tokenizer_model=str(tiny_dataset[1]),
                            tokenizer_type="HuggingFaceTokenizer"), log=lambda _: None)


@pytest.fixture
def run(tmp_path, monkeypatch):
    """pretrain_gpt.run in this process (one rank), from tmp_path."""
    import pretrain_gpt

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # AutoTokenizer below must never reach the network
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    return lambda *argv: pretrain_gpt.run([*TINY, *(str(a) for a in argv)])


def _export(src: Path, out: Path, capsys) -> tuple[dict, str]:
    code = convert.main(["--load", str(src), "--to-hf", str(out)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads((out / "config.json").read_text()), captured.out


def test_hugging_face_tokenizer_through_training_checkpoint_and_export(hf, hf_dataset, run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from megazero.checkpoint.format import read_index, resolve_checkpoint

    run("--data-path", hf_dataset, "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", hf["llama"],
        "--save", tmp_path / "ckpt")
    folder = resolve_checkpoint(tmp_path / "ckpt")
    index = read_index(folder)
    assert index["config"]["data"]["tokenizer_type"] == "HuggingFaceTokenizer"
    assert index["tokenizer"] == {"type": "HuggingFaceTokenizer", "files": ["tokenizer.json", "tokenizer_config.json"],
                                  "bos_id": 0, "eos_id": 1, "pad_id": 2}
    assert (folder / "tokenizer.json").read_bytes() == (hf["llama"] / "tokenizer.json").read_bytes()
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(index["files"])  # checksummed with the tensors
    run_tokenizer = build_tokenizer("HuggingFaceTokenizer", hf["llama"])

    config, out = _export(tmp_path / "ckpt", tmp_path / "hf", capsys)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (0, 1, 2)
    assert "HuggingFaceTokenizer" in out
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id) == (0, 1, 2)
    for text in SAMPLE:
        assert auto(text)["input_ids"] == run_tokenizer.encode(text), text

    # back in: the export's tokenizer.json becomes the imported checkpoint's, and resharding carries it
    assert convert.main(["--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "back")]) == 0
    back = resolve_checkpoint(tmp_path / "back")
    assert read_index(back)["tokenizer"] == index["tokenizer"]
    assert convert.main(["--load", str(tmp_path / "back"), "--save", str(tmp_path / "tp2"), "--target-tp", "2",
                         "--target-pp", "1"]) == 0
    resharded = resolve_checkpoint(tmp_path / "tp2")
    assert read_index(resharded)["tokenizer"] == index["tokenizer"]
    assert build_tokenizer("HuggingFaceTokenizer", resharded).encode(SAMPLE[1]) == run_tokenizer.encode(SAMPLE[1])


def test_sentencepiece_run_exports_a_tokenizer_autotokenizer_loads(tiny_dataset, hf, run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from megazero.checkpoint.format import read_index, resolve_checkpoint

    prefix, model = tiny_dataset
    run("--data-path", prefix, "--tokenizer-model", model, "--save", tmp_path / "ckpt")
    index = read_index(resolve_checkpoint(tmp_path / "ckpt"))
    assert index["tokenizer"] == {"type": "SentencePieceTokenizer", "files": ["tokenizer.model"], "bos_id": None,
                                  "eos_id": 1, "pad_id": None}
    config, out = _export(tmp_path / "ckpt", tmp_path / "hf", capsys)
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == [
        "config.json", "model.safetensors", "tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    assert config["eos_token_id"] == 1 and config["pad_token_id"] is None
    assert "as sentencepiece does" in out
    sp = Tokenizer(model)
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert auto.eos_token_id == 1 and auto.bos_token_id is None
    texts = SAMPLE + [(prefix.parent / "prose.txt").read_text(encoding="utf-8")[:20_000]]
    for text in texts:  # byte fallback (emoji, CJK), "\n" pieces, whitespace runs, literal "</s>": same ids
        ids = sp.encode(text)
        assert auto(text)["input_ids"] == ids, text[:60]
        assert auto.decode(ids) == sp.decode(ids)
    # imported back, the export's tokenizer.json serves (same ids), its missing bos stays missing
    assert convert.main(["--from-hf", str(tmp_path / "hf"), "--save", str(tmp_path / "back")]) == 0
    back = resolve_checkpoint(tmp_path / "back")
    assert read_index(back)["tokenizer"] == {"type": "HuggingFaceTokenizer", "bos_id": None, "eos_id": 1,
                                             "pad_id": None, "files": ["tokenizer.json", "tokenizer_config.json"]}
    assert (back / "tokenizer.model").is_file()
    assert build_tokenizer("HuggingFaceTokenizer", back).encode(texts[-1]) == sp.encode(texts[-1])
    # a tokenizer with more ids than the model has rows is refused in one line, nothing written
    capsys.readouterr()  # (transformers warned about the long text above)
    code = convert.main(["--load", str(tmp_path / "ckpt"), "--to-hf", str(tmp_path / "bad"),
                         "--tokenizer-model", str(hf["gpt2"])])
    assert code == 2 and "600 ids, the model's vocabulary 512" in _one_line(capsys.readouterr().err)
    assert not (tmp_path / "bad").exists()


def test_spm_conversion_of_other_sentencepiece_settings(corpus_dir, tmp_path):
    """A Llama-2-style model (dummy prefix, a multi-character user-defined piece) converts exactly too."""
    import sentencepiece as spm

    text = (corpus_dir / "verse.txt").read_text(encoding="utf-8")[:150_000]
    (tmp_path / "v.txt").write_text(text, encoding="utf-8")
    spm.SentencePieceTrainer.train(input=str(tmp_path / "v.txt"), model_prefix=str(tmp_path / "llama"),
                                   vocab_size=700, model_type="bpe", byte_fallback=True, minloglevel=2,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   split_digits=True, user_defined_symbols=["<|im_start|>"])
    sp = Tokenizer(tmp_path / "llama.model")
    converted, kind = spm_to_tokenizers(tmp_path / "llama.model")
    assert kind == "BPE"
    for sample in SAMPLE + ["<|im_start|>user\nhi  there", " <|im_start|> x", text[:5000]]:
        assert converted.encode(sample, add_special_tokens=False).ids == sp.encode(sample), sample[:60]
