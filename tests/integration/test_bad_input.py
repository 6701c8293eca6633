"""Bad input: each case ends with one line naming the problem and the fix, exit code 2, before any
training and without creating or changing files. Most cases call pretrain_gpt.main() in-process
(validation happens before any process group); one case launches 3 real processes to show the line
is printed once, not once per rank."""

import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import pretrain_gpt
from megazero.data import Tokenizer, train_tokenizer

REPO = Path(__file__).resolve().parents[2]


def run_main(argv, capsys, monkeypatch, world_size=1):
    monkeypatch.setenv("WORLD_SIZE", str(world_size))
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(SystemExit) as exc:
        pretrain_gpt.run(argv)
    err = capsys.readouterr().err.strip()
    return exc.value.code, err


@pytest.fixture
def data_copy(tiny_dataset, tmp_path):
    """A private copy of the tiny dataset that a test may corrupt."""
    prefix, model = tiny_dataset
    for suffix in (".bin", ".idx"):
        shutil.copy(f"{prefix}{suffix}", tmp_path / f"d{suffix}")
    return tmp_path / "d", model


@pytest.fixture(autouse=True)
def in_tmp_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    yield
    assert not (tmp_path / "output").exists(), "a failed start must not create a run directory"


def _tiny(prefix_model):
    prefix, model = prefix_model
    return ["--data-path", str(prefix), "--tokenizer-model", str(model)]


CASES = [
    # (argv, world_size, substrings the one-line message must contain)
    (["--tp", "2"], 3, ["world size 3 is not divisible by tensor-parallel size 2", "launch a multiple of 2"]),
    (["--tp", "4", "--num-attention-heads", "6", "--hidden-size", "96"], 4,
     ["--num-attention-heads 6 is not divisible by tensor-parallel size 4"]),
    (["--hidden-size", "100", "--num-attention-heads", "8"], 1,
     ["--hidden-size 100 is not divisible by --num-attention-heads 8"]),
    (["--tp", "2", "--ffn-hidden-size", "101"], 2, ["--ffn-hidden-size 101 is not divisible by tensor-parallel size 2"]),
    (["--make-vocab-size-divisible-by", "0"], 1, ["--make-vocab-size-divisible-by must be >= 1"]),
    (["--micro-batch-size", "4", "--global-batch-size", "10"], 2,
     ["--global-batch-size 10 is not divisible by --micro-batch-size 4 x data-parallel size 2 = 8"]),
    (["--seq-length", "256", "--max-position-embeddings", "128"], 1,
     ["--seq-length 256 exceeds --max-position-embeddings 128"]),
    (["--vp", "2"], 1, ["interleaved pipeline", "needs --pipeline-model-parallel-size > 1"]),
    (["--pp", "2", "--vp", "3", "--num-layers", "4"], 2, ["--num-layers 4", "is not divisible by pp x vp = 6"]),
    (["--pp", "2", "--vp", "2", "--micro-batch-size", "8", "--global-batch-size", "24"], 2,
     ["number of microbatches (3", "multiple of the pipeline size 2"]),
    (["--pp", "2", "--num-layers-per-virtual-pipeline-stage", "3", "--num-layers", "4"], 2,
     ["--num-layers 4 is not divisible by --pp 2 x --num-layers-per-virtual-pipeline-stage 3"]),
    (["--tp", "2", "--pp", "2"], 6, ["world size 6 is not divisible by tensor-parallel size 2 x pipeline-parallel size 2"]),
    (["--split", "abc"], 1, ["bad --split 'abc'"]),
    (["--num-workers", "-1"], 1, ["--num-workers must be >= 0"]),
    (["--timeline-out", "no/such/folder/t.json"], 1, ["--timeline-out no/such/folder/t.json: folder"]),
    (["--no-tensorboard", "--tensorboard-dir", "tb"], 1, ["--tensorboard-dir with --no-tensorboard"]),
    (["--micro-batch-size", "4", "--gradient-accumulation-steps", "3", "--global-batch-size", "16"], 2,
     ["batch sizes disagree: global batch 16 != micro batch 4 x gradient accumulation 3 x data-parallel size 2 = 24"]),
    (["--data-path", "nowhere/data", "--tokenizer-model", __file__], 1, ["nowhere/data.bin not found"]),
    (["--offload-optimizer", "cpu"], 1, ["--offload-optimizer cpu needs --zero-stage 1, 2 or 3"]),
    (["--zero-stage", "2", "--offload-param", "cpu"], 1, ["--offload-param cpu needs --zero-stage 3"]),
    (["--zero-stage", "1", "--offload-optimizer", "nvme"], 1, ["--offload-optimizer nvme needs --offload-nvme-path"]),
    (["--zero-stage", "1", "--offload-optimizer", "nvme", "--offload-nvme-path", __file__], 1,
     [f"--offload-nvme-path {__file__}: not an existing folder"]),
    (["--zero-stage", "1", "--offload-optimizer", "cpu", "--offload-nvme-path", "."], 1,
     ["--offload-nvme-path is only used with --offload-optimizer nvme"]),
    (["--zero-stage", "1", "--offload-sub-group-size", "0"], 1, ["--offload-sub-group-size must be >= 1"]),
]


def test_default_corpus_flags_with_data_path(data_copy, capsys, monkeypatch):
    code, err = run_main(_tiny(data_copy) + ["--vocab-size", "999"], capsys, monkeypatch)
    assert code == 2 and "--vocab-size and --data-cache-dir apply only to the default corpus" in err


def test_split_too_small_for_one_sample_fails_before_start(data_copy, capsys, monkeypatch):
    code, err = run_main(_tiny(data_copy) + ["--split", "1000000,1,0", "--seq-length", "128"], capsys, monkeypatch)
    assert code == 2 and len(err.splitlines()) == 1 and "valid" in err, err


def test_output_dir_holding_a_run_is_refused(tmp_path, capsys, monkeypatch):
    run_dir = tmp_path / "old_run"
    run_dir.mkdir()
    (run_dir / "training_metrics.csv").write_text("iteration\n1\n")
    code, err = run_main(["--output-dir", str(run_dir)], capsys, monkeypatch)
    assert code == 2 and "already holds a run" in err
    assert (run_dir / "training_metrics.csv").read_text() == "iteration\n1\n"


@pytest.mark.parametrize("argv,world_size,needles", CASES, ids=[" ".join(c[0])[:40] for c in CASES])
def test_config_errors(argv, world_size, needles, capsys, monkeypatch):
    code, err = run_main(argv, capsys, monkeypatch, world_size)
    assert code == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for needle in needles:
        assert needle in err


def test_unreadable_data_path(data_copy, capsys, monkeypatch):
    prefix, model = data_copy
    os.remove(f"{prefix}.idx")
    os.mkdir(f"{prefix}.idx")  # a directory where the index file should be
    code, err = run_main(_tiny(data_copy), capsys, monkeypatch)
    assert code == 2 and len(err.splitlines()) == 1 and "d.idx not found or not a file" in err


@pytest.mark.parametrize("corruption,needle", [
    ("magic", "bad magic"),
    ("version", "index format version 7"),
    ("bin-size", "do not belong together"),
    ("truncated-idx", "truncated index"),
])
def test_bad_idx_is_rejected_and_left_alone(data_copy, corruption, needle, capsys, monkeypatch):
    prefix, _ = data_copy
    idx, bin_ = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    raw = bytearray(idx.read_bytes())
    if corruption == "magic":
        raw[:8] = b"NOTMAGIC"
    elif corruption == "version":
        raw[8:16] = struct.pack("<Q", 7)
    elif corruption == "truncated-idx":
        raw = raw[: len(raw) - 8]
    idx.write_bytes(bytes(raw))
    if corruption == "bin-size":
        with open(bin_, "ab") as f:
            f.write(b"\x00\x00")
    before = {p: p.read_bytes() for p in (idx, bin_)}
    code, err = run_main(_tiny(data_copy), capsys, monkeypatch)
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err
    assert str(idx if corruption != "bin-size" else bin_) in err  # names the file
    assert {p: p.read_bytes() for p in (idx, bin_)} == before  # nothing on disk changed


def test_tokenizer_vocab_mismatch(data_copy, corpus_dir, tmp_path, capsys, monkeypatch):
    prefix, _ = data_copy
    text = tmp_path / "small.txt"
    text.write_text((corpus_dir / "austen.txt").read_text()[:50_000])
    other = train_tokenizer([text], tmp_path / "other.model", vocab_size=400)
    assert Tokenizer(other).vocab_size == 400
    code, err = run_main(["--data-path", str(prefix), "--tokenizer-model", str(other)], capsys, monkeypatch)
    assert code == 2 and len(err.splitlines()) == 1
    assert "vocab size 400" in err and "vocab size 512" in err and "--tokenizer-model" in err


@pytest.mark.parametrize("argv,needle", [(["--hiden-size", "64"], "unrecognized arguments: --hiden-size"),
                                         (["--zero-stage", "4"], "argument --zero-stage: invalid choice: 4")])
def test_argparse_errors(argv, needle, capsys, monkeypatch):
    code, err = run_main(argv, capsys, monkeypatch)
    assert code == 2 and needle in err


def test_error_is_printed_once_across_ranks(tmp_path):
    """3 real processes with a bad layout: rank 0 prints the line, ranks 1-2 print nothing, all exit 2."""
    procs = []
    for rank in range(3):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="3", LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, str(REPO / "pretrain_gpt.py"), "--tp", "2"], cwd=tmp_path,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [2, 2, 2]
    assert outputs[0][1].strip().startswith("error: world size 3 is not divisible")
    assert len(outputs[0][1].strip().splitlines()) == 1
    assert all(out == ("", "") for out in outputs[1:]), outputs[1:]


def test_nvme_offload_without_room_fails_before_training(tiny_dataset, tmp_path):
    """A disk that cannot hold the optimizer state (here: a 2 MiB file-size limit against ~39 MiB of
    state) is one line, exit 2, before the first step, and leaves neither state files nor a run folder."""
    import resource
    import signal

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 2**20, 2 * 2**20))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing

    nvme, run_dir = tmp_path / "nvme", tmp_path / "run"
    nvme.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "pretrain_gpt.py"), *_tiny(tiny_dataset), "--zero-stage", "1",
                           "--offload-optimizer", "nvme", "--offload-nvme-path", str(nvme), "--train-iters", "2",
                           "--output-dir", str(run_dir)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, preexec_fn=small_files)
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.stdout, err)
    assert len(err.splitlines()) == 1 and err.startswith(f"error: --offload-nvme-path {nvme}: cannot create"), err
    assert "File too large" in err and "free space there or choose another path" in err
    assert list(nvme.iterdir()) == [] and not run_dir.exists()
