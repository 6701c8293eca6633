"""Data pipeline: tokenizer, .bin/.idx store, GPT sample index, dp sampler, CLI, default corpus.

One small tokenizer (vocab 800) and one dataset (the first ~500 KB of each file of the tests' generated
corpus, see conftest.py) are built once per module in tmp.
"""

from __future__ import annotations

import fcntl
import json
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from megazero.data import (
    DataParallelSampler,
    GPTDataset,
    IndexedDataset,
    IndexedDatasetBuilder,
    Tokenizer,
    build_data_iterator,
    build_train_valid_test_datasets,
    dataset_exists,
    prepare_default_data,
    split_documents,
    train_tokenizer,
)
from megazero.errors import DataError

REPO_ROOT = Path(__file__).resolve().parents[2]
PREPROCESS = REPO_ROOT / "tools" / "preprocess_data.py"
SUBSET_BYTES = 500_000
VOCAB = 800


def paragraphs(text: str) -> list[str]:
    """Reference for --split-documents blank-lines: runs of non-blank lines, joined by \\n."""
    docs, current = [], []
    for line in text.split("\n"):
        if line.strip():
            current.append(line)
        elif current:
            docs.append("\n".join(current))
            current = []
    if current:
        docs.append("\n".join(current))
    return docs


def run_cli(*args: str | Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(PREPROCESS), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=120)


def leftovers(folder: Path, stem: str) -> list[str]:
    """Files in `folder` that belong to output `stem` (finished or temporary)."""
    return sorted(p.name for p in folder.iterdir() if stem in p.name)


# ---------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def subsets(corpus_dir, work) -> list[Path]:
    """The first ~500 KB of each generated corpus file (conftest.py), cut at a line end."""
    out = []
    for name in ("prose.txt", "verse.txt"):
        text = (corpus_dir / name).read_text(encoding="utf-8")[:SUBSET_BYTES]
        path = work / name
        path.write_text(text[:text.rindex("\n") + 1], encoding="utf-8")
        out.append(path)
    return out


@pytest.fixture(scope="module")
def tokenizer(subsets, work) -> Tokenizer:
    return Tokenizer(train_tokenizer(subsets, work / "tok.model", VOCAB))


@pytest.fixture(scope="module")
def prefix(subsets, tokenizer, work) -> Path:
    """The two subsets preprocessed with the module tokenizer (in-process, blank-line documents)."""
    sys.path.insert(0, str(PREPROCESS.parent))
    try:
        import preprocess_data
    finally:
        sys.path.remove(str(PREPROCESS.parent))
    out = work / "corpus"
    rc = preprocess_data.main(["--input", *map(str, subsets), "--output-prefix", str(out),
                               "--tokenizer-model", str(tokenizer.model_path), "--workers", "2"])
    assert rc == 0
    return out


# ---------------------------------------------------------------------------------------------
# tokenizer


@pytest.mark.parametrize("text", [
    "Shall I compare thee to a summer's day?\nThou art more lovely and more temperate:\n",
    "def f(x):\n    if x > 10:\n\treturn  x * 3.14159  # tab, double space\n\n\n",
    "  leading and trailing spaces  \n\n  ",
    "Unicode: naïve café — “quotes” 日本語 🙂 \x00\x7f",
    "\n", "", "1234567890",
])
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(np.asarray(ids)) == text


def test_tokenizer_properties(tokenizer):
    assert tokenizer.vocab_size == VOCAB
    assert tokenizer.eod_id == 1
    assert tokenizer.encode("a\nb").count(tokenizer.encode("\n")[0]) == 1  # "\n" is one piece
    assert tokenizer.decode([tokenizer.eod_id]) == ""


def test_train_tokenizer_is_deterministic(subsets, work):
    a = train_tokenizer(subsets, work / "det_a.model", 400, max_chars=200_000, seed=7)
    b = train_tokenizer(subsets, work / "det_b.model", 400, max_chars=200_000, seed=7)
    c = train_tokenizer(subsets, work / "det_c.model", 400, max_chars=200_000, seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()  # a different sample of lines
    assert not [p for p in work.iterdir() if p.name.endswith(".tmp")]


def test_tokenizer_errors(work):
    with pytest.raises(DataError, match="missing.model"):
        Tokenizer(work / "missing.model")
    junk = work / "junk.model"
    junk.write_bytes(b"this is not a protobuf \xff\xfe")
    with pytest.raises(DataError, match="junk.model"):
        Tokenizer(junk)
    with pytest.raises(DataError, match="too small"):
        train_tokenizer([work / "prose.txt"], work / "small.model", 100)


# ---------------------------------------------------------------------------------------------
# indexed dataset: contents, dtype, validation


def test_plain_text_round_trip(prefix, subsets, tokenizer):
    ds = IndexedDataset(prefix)
    expected = [d for p in subsets for d in paragraphs(p.read_text(encoding="utf-8"))]
    assert len(ds) == len(expected) > 1000
    assert ds.dtype == np.uint16 and ds.vocab_size == VOCAB
    assert ds.num_tokens == int(ds.sizes.sum())
    assert np.array_equal(ds.doc_offsets[1:], np.cumsum(ds.sizes)[:-1])
    for i, text in enumerate(expected):
        doc = ds[i]
        assert doc[-1] == tokenizer.eod_id
        assert tokenizer.decode(doc[:-1]) == text, i
    assert np.array_equal(ds.get(5, 2, 3), ds[5][2:5])


def test_jsonl_round_trip(tokenizer, work):
    docs = ["first doc\nwith two lines", "", "tabs\tand  spaces\n\n", "ünïcödé ✓", "x" * 5000]
    src = work / "docs.jsonl"
    src.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    out = work / "jsonl"
    r = run_cli("--input", src, "--output-prefix", out, "--tokenizer-model", tokenizer.model_path,
                "--json-key", "body")
    assert r.returncode == 0, r.stderr
    ds = IndexedDataset(out)
    assert len(ds) == len(docs)
    for i, text in enumerate(docs):
        assert ds[i][-1] == tokenizer.eod_id
        assert tokenizer.decode(ds[i][:-1]) == text


def test_dtype_follows_vocab_size(work):
    docs = [np.array([0, 1, 65535, 69999]), np.array([], dtype=np.int64), np.arange(10)]
    for vocab, dtype in ((70000, np.int32), (65536, np.int32), (65535, np.uint16)):
        p = work / f"dtype{vocab}"
        with IndexedDatasetBuilder(p, vocab) as b:
            for d in docs:
                b.add_document(np.minimum(d, vocab - 1))
        ds = IndexedDataset(p)
        assert ds.dtype == dtype and ds.vocab_size == vocab
        assert bin_size(p) == 14 * np.dtype(dtype).itemsize
        assert [list(ds[i]) for i in range(3)] == [list(np.minimum(d, vocab - 1)) for d in docs]
    with pytest.raises(DataError, match="out of range"):
        IndexedDatasetBuilder(work / "bad_ids", 100).add_document([5, 100])


def bin_size(p: Path) -> int:
    return Path(f"{p}.bin").stat().st_size


def test_builder_leaves_nothing_on_error(work):
    p = work / "crash"
    with pytest.raises(RuntimeError):
        with IndexedDatasetBuilder(p, 100) as b:
            b.add_document([1, 2, 3])
            raise RuntimeError("simulated crash")
    assert leftovers(work, "crash") == []
    assert not dataset_exists(p)


def _corrupt_magic(p):
    with open(f"{p}.idx", "r+b") as f:
        f.write(b"XXXXXXXX")


def _corrupt_version(p):
    with open(f"{p}.idx", "r+b") as f:
        f.seek(8)
        f.write(struct.pack("<Q", 99))


def _corrupt_bin_size(p):
    with open(f"{p}.bin", "ab") as f:
        f.write(b"\x00\x00")


def _truncate_idx(p):
    data = Path(f"{p}.idx").read_bytes()
    Path(f"{p}.idx").write_bytes(data[:-8])


def _truncate_idx_header(p):
    data = Path(f"{p}.idx").read_bytes()
    Path(f"{p}.idx").write_bytes(data[:20])


@pytest.mark.parametrize("corrupt, bad_file, words", [
    (_corrupt_magic, "idx", "bad magic"),
    (_corrupt_version, "idx", "version 99"),
    (_corrupt_bin_size, "bin", "do not belong together"),
    (_truncate_idx, "idx", "truncated"),
    (_truncate_idx_header, "idx", "truncated"),
    (lambda p: Path(f"{p}.bin").unlink(), "bin", "not found"),
    (lambda p: Path(f"{p}.idx").unlink(), "idx", "not found"),
])
def test_bad_index_files(prefix, tmp_path, corrupt, bad_file, words):
    p = tmp_path / "copy"
    for ext in ("bin", "idx"):
        shutil.copy(f"{prefix}.{ext}", f"{p}.{ext}")
    IndexedDataset(p)  # the intact copy opens
    corrupt(p)
    with pytest.raises(DataError) as e:
        IndexedDataset(p)
    msg = str(e.value)
    assert f"{p}.{bad_file}" in msg and words in msg and "\n" not in msg


# ---------------------------------------------------------------------------------------------
# GPT dataset: index construction, determinism, splits


def test_samples_are_windows_of_the_shuffled_stream(prefix):
    ds = IndexedDataset(prefix)
    seq = 64
    gpt = GPTDataset(ds, np.arange(100, 600), 3000, seq, seed=3, name="train")
    assert len(gpt) == 3000 and gpt.num_epochs > 1
    # Every epoch is a permutation of the split's documents.
    for e in range(gpt.num_epochs):
        assert sorted(gpt.doc_idx[e * 500:(e + 1) * 500]) == list(range(100, 600))
    stream = np.concatenate([ds[d] for d in gpt.doc_idx]).astype(np.int64)
    for i in [0, 1, 2, 17, 1499, 2999]:
        w = int(gpt.shuffle_idx[i])
        window = stream[w * seq:w * seq + seq + 1]
        sample = gpt[i]
        assert sample["tokens"].dtype == torch.int64 and sample["tokens"].shape == (seq,)
        assert np.array_equal(sample["tokens"].numpy(), window[:-1])
        assert np.array_equal(sample["labels"].numpy(), window[1:])
    # The full epochs' windows come first, each exactly once.
    full = -(-((gpt.num_epochs - 1) * gpt.tokens_per_epoch) // seq)
    assert sorted(gpt.shuffle_idx[:full]) == list(range(full))
    assert len(set(gpt.shuffle_idx.tolist())) == 3000


def test_sample_order_is_deterministic(prefix):
    ds = IndexedDataset(prefix)
    docs = np.arange(len(ds))
    a = GPTDataset(ds, docs, 500, 32, seed=1, name="train")
    b = GPTDataset(ds, docs, 500, 32, seed=1, name="train")
    c = GPTDataset(ds, docs, 500, 32, seed=2, name="train")
    assert np.array_equal(a.shuffle_idx, b.shuffle_idx) and np.array_equal(a.doc_idx, b.doc_idx)
    assert all(torch.equal(a[i]["tokens"], b[i]["tokens"]) for i in range(0, 500, 50))
    assert not np.array_equal(a.doc_idx, c.doc_idx)
    assert not all(torch.equal(a[i]["tokens"], c[i]["tokens"]) for i in range(0, 500, 50))


def test_split_documents():
    tr, va, te = split_documents(1000, "969,30,1")
    assert (tr[0], tr[-1], va[0], va[-1], te[0], te[-1]) == (0, 968, 969, 998, 999, 999)
    assert [len(x) for x in split_documents(10, "8/2")] == [8, 2, 0]
    assert [len(x) for x in split_documents(7, "1,1,1")] == [2, 3, 2]
    assert [len(x) for x in split_documents(1, "969,30,1")] == [1, 0, 0]
    for n in (0, 1, 5, 999):
        assert np.array_equal(np.concatenate(split_documents(n, "98,1.5,0.5")), np.arange(n))
    for bad in ("", "a,b", "1,2,3,4", "-1,2", "0,0,0", "nan,1"):
        with pytest.raises(DataError, match="--split"):
            split_documents(10, bad)


def test_build_train_valid_test(prefix):
    tr, va, te = build_train_valid_test_datasets(prefix, "90,10,0", 64, 5, (1000, 50, 10))
    assert te is None and len(tr) == 1000 and len(va) == 50
    assert set(tr.document_ids.tolist()).isdisjoint(va.document_ids.tolist())
    assert set(tr.doc_idx.tolist()) <= set(tr.document_ids.tolist())
    assert build_train_valid_test_datasets(prefix, "1,1,1", 64, 5, (10, 0, 0))[1:] == (None, None)
    n = len(IndexedDataset(prefix))
    # A test split of a single short document cannot hold one 4097-token sample.
    with pytest.raises(DataError, match="test split") as e:
        build_train_valid_test_datasets(prefix, f"{n - 1},0,1", 4096, 5, (10, 0, 10))
    assert "--split" in str(e.value) and "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# sampler


def all_batches(total, consumed, mbs, dp):
    """batches[r] = the list of index lists dp rank r yields."""
    return [list(DataParallelSampler(total, consumed, mbs, r, dp)) for r in range(dp)]


def test_sampler_global_batch_is_dp_invariant():
    total, global_batch = 101, 8
    reference = all_batches(total, 0, global_batch, 1)[0]
    assert len(reference) == 12 and reference[3] == list(range(24, 32))
    for dp in (2, 4, 8):
        mbs = global_batch // dp
        per_rank = all_batches(total, 0, mbs, dp)
        assert all(len(b) == 12 for b in per_rank)
        for k in range(12):
            union = [i for r in range(dp) for i in per_rank[r][k]]
            assert union == reference[k]
        assert per_rank[1][0] == list(range(mbs, 2 * mbs))


def test_sampler_resume_matches_uninterrupted():
    total, mbs, dp = 200, 3, 4
    full = all_batches(total, 0, mbs, dp)
    for k in (0, 1, 7, 16):
        resumed = all_batches(total, k * mbs * dp, mbs, dp)
        for r in range(dp):
            assert resumed[r] == full[r][k:]
    assert all_batches(total, 192, mbs, dp) == [[]] * dp  # 8 left < 12 per step: dropped


@pytest.mark.parametrize("kwargs, words", [
    (dict(total_samples=0), "total_samples"),
    (dict(consumed_samples=11), "consumed_samples"),
    (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(dp_rank=2), "dp_rank"),
    (dict(dp_size=0), "dp_size"),
])
def test_sampler_validation(kwargs, words):
    args = dict(total_samples=10, consumed_samples=0, micro_batch_size=2, dp_rank=0, dp_size=2)
    with pytest.raises(ValueError, match=words):
        DataParallelSampler(**{**args, **kwargs})


def test_data_iterator(prefix):
    tr, _, _ = build_train_valid_test_datasets(prefix, "1", 32, 0, (40, 0, 0))
    assert build_data_iterator(None, 0, 2, 0, 1) is None
    batches = list(build_data_iterator(tr, 8, 2, 1, 2))
    assert len(batches) == 8
    assert batches[0]["tokens"].shape == (2, 32) and batches[0]["tokens"].dtype == torch.int64
    assert torch.equal(batches[0]["tokens"][0], tr[10]["tokens"])  # 8 consumed + rank 1 * mbs 2
    assert torch.equal(batches[0]["labels"][:, :-1], batches[0]["tokens"][:, 1:])
    with_workers = list(build_data_iterator(tr, 8, 2, 1, 2, num_workers=1))
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(batches, with_workers))


# ---------------------------------------------------------------------------------------------
# tools/preprocess_data.py


def test_cli_trains_tokenizer_and_writes_dataset(subsets, tmp_path):
    out = tmp_path / "out" / "cli"
    r = run_cli("--input", *subsets, "--output-prefix", out, "--vocab-size", 500, "--workers", 2,
                cwd=tmp_path)  # from another directory
    assert r.returncode == 0, r.stderr
    assert "documents" in r.stdout and "tokens" in r.stdout
    assert leftovers(out.parent, "cli") == ["cli.bin", "cli.idx", "cli.model"]
    tok = Tokenizer(f"{out}.model")
    ds = IndexedDataset(out)
    assert tok.vocab_size == ds.vocab_size == 500
    assert tok.decode(ds[0][:-1]) == paragraphs(subsets[0].read_text())[0]
    r = run_cli("--input", subsets[0], "--output-prefix", tmp_path / "noeod", "--tokenizer-model",
                f"{out}.model", "--split-documents", "file", "--no-append-eod")
    assert r.returncode == 0, r.stderr
    ds = IndexedDataset(tmp_path / "noeod")
    assert len(ds) == 1 and tok.decode(ds[0]) == subsets[0].read_text()


def test_cli_bad_inputs(subsets, tokenizer, tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(3000)))
    late_bad = tmp_path / "late.jsonl"
    late_bad.write_text(good.read_text() + json.dumps({"txt": "no text key"}) + "\n")
    model = tokenizer.model_path
    cases = [
        (["--input", tmp_path / "nope.txt", "--vocab-size", 500], "nope.txt"),
        (["--input", subsets[0]], "--tokenizer-model"),
        (["--input", subsets[0], "--vocab-size", 500, "--tokenizer-model", model], "not allowed"),
        (["--input", good, "--tokenizer-model", model, "--json-key", "body"], "'body'"),
        (["--input", good, "--vocab-size", 500, "--json-key", "body"], "'body'"),
        (["--input", subsets[0], "--tokenizer-model", tmp_path / "none.model"], "none.model"),
        (["--input", good, late_bad, "--tokenizer-model", model], "late.jsonl:3001"),
    ]
    for args, words in cases:
        r = run_cli(*args, "--output-prefix", tmp_path / "bad")
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (args, r.stderr)
        assert lines[-1].startswith("error: ") and words in lines[-1], (args, r.stderr)
        if "late.jsonl" not in words:  # failed before any progress bar: exactly one line
            assert len(lines) == 1, r.stderr
        assert leftovers(tmp_path, "bad") == [], args


# ---------------------------------------------------------------------------------------------
# default corpus


def test_prepare_default_data(tmp_path):
    logs: list[str] = []
    start = time.time()
    data, model = prepare_default_data(tmp_path, vocab_size=512, log=logs.append, max_bytes=1_000_000)
    built = time.time() - start
    assert "standard-library source files" in logs[0] and "built" in logs[0]
    ds, tok = IndexedDataset(data), Tokenizer(model)
    assert tok.vocab_size == ds.vocab_size == 512 and len(ds) > 20
    assert ds.num_tokens > 100_000
    code = ('import os\n\n\nclass Foo(Bar):\n    """Doc."""\n\n    def run(self, x=0x1F):\n'
            '\t\treturn {"k": [x ** 2 for x in range(10)]}  # comment\n')
    assert tok.decode(tok.encode(code)) == code
    texts = [tok.decode(ds[i][:-1]) for i in range(len(ds))]
    assert all(ds[i][-1] == tok.eod_id for i in range(len(ds)))
    assert sum("def " in t or "import" in t for t in texts) > len(texts) // 2  # Python source
    # Large files are stored last, so the short trailing valid/test ranges can hold samples.
    assert len(tok.decode(ds[len(ds) - 1])) >= 16_000

    start = time.time()
    again = prepare_default_data(tmp_path, vocab_size=512, log=logs.append, max_bytes=1_000_000)
    assert again == (data, model) and "cached" in logs[1] and "built" not in logs[1]
    assert time.time() - start < max(1.0, built / 2)


def test_prepare_default_data_concurrent(tmp_path):
    """Two processes start while the build lock is held: after release, one builds, one reuses."""
    from megazero.data.default_corpus import cache_key, stdlib_source_files

    max_bytes, vocab = 300_000, 400
    root, files = stdlib_source_files(max_bytes)
    code = ("import sys; from megazero.data import prepare_default_data; "
            f"print(prepare_default_data(sys.argv[1], {vocab}, max_bytes={max_bytes}))")
    logs = [tmp_path / f"rank{r}.log" for r in range(2)]
    with open(tmp_path / f"{cache_key(root, files, vocab)}.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        procs = []
        for log in logs:
            with open(log, "w") as out:
                procs.append(subprocess.Popen([sys.executable, "-u", "-c", code, str(tmp_path)],
                                              cwd=REPO_ROOT, stdout=out, stderr=subprocess.STDOUT))
        deadline = time.time() + 60
        while not all("waiting" in log.read_text() for log in logs) and time.time() < deadline:
            time.sleep(0.05)
        fcntl.flock(lock, fcntl.LOCK_UN)
    assert [p.wait(timeout=120) for p in procs] == [0, 0], [log.read_text() for log in logs]
    outs = [log.read_text() for log in logs]
    assert all("waiting for another process" in o for o in outs), outs
    assert outs[0].splitlines()[-1] == outs[1].splitlines()[-1]  # same returned paths
    assert sum("built in" in o for o in outs) == 1 and sum("cached in" in o for o in outs) == 2, outs
