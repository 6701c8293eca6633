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
    text.write_text((corpus_dir / "prose.txt").read_text(encoding="utf-8")[:50_000], encoding="utf-8")
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


# ----- the error contract, class by class: exact one-line messages, nothing on disk changed ----------------
def tree(root: Path) -> dict[str, bytes | None]:
    """Every path under root with its bytes (None for folders): "nothing on disk changed"."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def assert_one_line_error(argv, capsys, monkeypatch, tmp_path, expected: str, world_size: int = 1) -> None:
    before = tree(tmp_path)
    code, err = run_main(argv, capsys, monkeypatch, world_size)
    assert code == 2, err
    assert err == f"error: {expected}", err  # exactly this line, once, and no traceback
    assert tree(tmp_path) == before


# Class 1: numbers outside what their config field declares (config.num), non-finite floats.
RANGE_CASES = {
    "lr nan": (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    "lr inf": (["--lr", "inf"], "--lr must be a finite number > 0, got inf"),
    "weight-decay nan": (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
    "clip-grad nan": (["--clip-grad", "nan"], "--clip-grad must be a finite number >= 0, got nan"),
    "clip-grad -inf": (["--clip-grad=-inf"], "--clip-grad must be a finite number >= 0, got -inf"),
    "seed -1": (["--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    "seed 2**32": (["--seed", str(2**32)], "--seed must be in [0, 4294967295], got 4294967296"),
    "micro 0": (["--micro-batch-size", "0"], "--micro-batch-size must be >= 1, got 0"),
    "train-iters 0": (["--train-iters", "0"], "--train-iters must be >= 1, got 0"),
    "tp alias 0": (["--tp", "0"], "--tp must be >= 1, got 0"),
    "beta2 1": (["--adam-beta2", "1"], "--adam-beta2 must be in [0, 1), got 1"),
    "adam-eps 0": (["--adam-eps", "0"], "--adam-eps must be > 0, got 0"),
    "dropout -0.1": (["--hidden-dropout", "-0.1"], "--hidden-dropout must be in [0, 1), got -0.1"),
    "warmup -5": (["--lr-warmup-iters", "-5"], "--lr-warmup-iters must be >= 0, got -5"),
    "init std 0": (["--init-method-std", "0"], "--init-method-std must be > 0, got 0"),
    "eps nan": (["--layernorm-epsilon", "nan"], "--layernorm-epsilon must be a finite number > 0, got nan"),
    "exit mins nan": (["--exit-duration-in-mins", "nan"], "--exit-duration-in-mins must be a finite number > 0, got nan"),
    "loss scale inf": (["--fp16", "--loss-scale", "inf"], "--loss-scale must be a finite number > 0, got inf"),
    "keep-last 0": (["--keep-last", "0"], "--keep-last must be >= 1, got 0"),
    "min-lr > lr": (["--min-lr", "1e-3", "--lr", "1e-4"],
                    "--min-lr 0.001 exceeds --lr 0.0001; the schedule decays from --lr down to --min-lr, so lower "
                    "--min-lr or raise --lr"),
    "min > initial loss scale": (["--fp16", "--min-loss-scale", "8", "--initial-loss-scale", "4"],
                                 "--min-loss-scale 8 exceeds --initial-loss-scale 4; lower --min-loss-scale or raise "
                                 "--initial-loss-scale"),
}
# Class 2: two settings of one thing that disagree (aliases, exclusive switches, repeats, static vs dynamic).
CONTRADICTION_CASES = {
    "bf16 fp16": (["--bf16", "--fp16"],
                  "--bf16 and --fp16 contradict each other (both set the params dtype); give only one of them"),
    "tp aliases": (["--tp", "2", "--tensor-model-parallel-size", "1"],
                   "--tp 2 and --tensor-model-parallel-size 1 contradict each other (both set the tensor model "
                   "parallel size); give only one of them"),
    "pp aliases": (["--pipeline-model-parallel-size", "2", "--pp", "1"],
                   "--pipeline-model-parallel-size 2 and --pp 1 contradict each other (both set the pipeline model "
                   "parallel size); give only one of them"),
    "vp aliases": (["--vp", "2", "--virtual-pipeline-model-parallel-size", "3"],
                   "--vp 2 and --virtual-pipeline-model-parallel-size 3 contradict each other (both set the virtual "
                   "pipeline model parallel size); give only one of them"),
    "bucket aliases": (["--ddp-bucket-size", "100", "--reduce-bucket-size", "200"],
                       "--ddp-bucket-size 100 and --reduce-bucket-size 200 contradict each other (both set the reduce "
                       "bucket size); give only one of them"),
    "ds-config aliases": (["--deepspeed-config", "a.json", "--deepspeed_config", "b.json"],
                          "--deepspeed-config a.json and --deepspeed_config b.json contradict each other (both set "
                          "the config); give only one of them"),
    "loss scale with bf16": (["--bf16", "--loss-scale", "1024"],
                             "--loss-scale 1024 applies only to --fp16 training, and this run is bf16 (no loss "
                             "scaling); add --fp16 or drop --loss-scale"),
    "loss scale without fp16": (["--hysteresis", "3"],
                                "--hysteresis 3 applies only to --fp16 training, and this run is fp32 (no loss "
                                "scaling); add --fp16 or drop --hysteresis"),
    "static and dynamic scale": (["--fp16", "--loss-scale", "1024", "--initial-loss-scale", "4096"],
                                 "--loss-scale 1024 (a static loss scale) and --initial-loss-scale 4096 (dynamic loss "
                                 "scaling) contradict each other; give --loss-scale alone, or only the dynamic flags"),
    "finetune without load": (["--finetune"], "--finetune changes what --load restores, and there is no --load; add "
                                              "--load CHECKPOINT or drop --finetune"),
}


@pytest.mark.parametrize("case", [*RANGE_CASES, *CONTRADICTION_CASES])
def test_flag_errors_are_one_exact_line(case, capsys, monkeypatch, tmp_path):
    argv, expected = RANGE_CASES.get(case) or CONTRADICTION_CASES[case]
    assert_one_line_error(argv, capsys, monkeypatch, tmp_path, expected)


def test_agreeing_aliases_are_fine_and_a_repeated_flag_overrides():
    from megazero.cli import parse_args

    cfg = parse_args(["--bf16", "--bf16", "--tp", "2", "--tensor-model-parallel-size", "2", "--lr", "1e-3",
                      "--lr", "2e-3"])  # `$COMMON_ARGS --lr 2e-3`: the last --lr wins, as in argparse
    assert (cfg.precision.params_dtype, cfg.parallel.tensor_model_parallel_size, cfg.optimizer.lr) == ("bf16", 2, 2e-3)


@pytest.mark.parametrize("obj,expected", [
    ({"gradient_clipping": -1}, "ds.json: gradient_clipping -1 must be >= 0"),
    ({"steps_per_print": 0}, "ds.json: steps_per_print 0 must be >= 1"),
    ({"train_micro_batch_size_per_gpu": 0}, "ds.json: train_micro_batch_size_per_gpu 0 must be >= 1"),
    ({"optimizer": {"type": "Adam", "params": {"lr": 0}}}, "ds.json: optimizer.params.lr 0 must be > 0"),
    ({"optimizer": {"type": "Adam", "params": {"betas": [0.9, 1.0]}}},
     "ds.json: optimizer.params.betas [0.9, 1.0] must be in [0, 1)"),
    ({"fp16": {"enabled": True, "hysteresis": 0}}, "ds.json: fp16.hysteresis 0 must be >= 1"),
    ({"zero_optimization": {"stage": 1, "sub_group_size": 0}}, "ds.json: zero_optimization.sub_group_size 0 must be >= 1"),
    ('{"gradient_clipping": NaN}', 'ds.json: gradient_clipping must be a number (or "auto"), got nan'),
])
def test_ds_config_values_are_range_checked_like_flags(obj, expected, capsys, monkeypatch, tmp_path):
    import json

    (tmp_path / "ds.json").write_text(obj if isinstance(obj, str) else json.dumps(obj))
    assert_one_line_error(["--deepspeed-config", str(tmp_path / "ds.json")], capsys, monkeypatch, tmp_path, expected)


# Class 3: a path that must be a folder (or a file) and is not.
def test_paths_of_the_wrong_kind(capsys, monkeypatch, tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("not a folder\n")
    (tmp_path / "adir").mkdir()
    cases = [
        (["--output-dir", str(afile)], f"--output-dir {afile}: exists and is not a folder; choose a folder"),
        (["--output-dir", str(afile / "run")], f"--output-dir {afile / 'run'}: {afile} is a file, so the folder "
                                               f"cannot be created there; choose another path"),
        (["--tensorboard-dir", str(afile)], f"--tensorboard-dir {afile}: exists and is not a folder; choose a folder"),
        (["--data-cache-dir", str(afile)], f"--data-cache-dir {afile}: exists and is not a folder; choose a folder"),
        (["--save", str(afile)], f"--save {afile}: exists and is not a folder; choose a folder"),
        (["--save", str(afile / "ckpt")], f"--save {afile / 'ckpt'}: {afile} is a file, so the folder cannot be "
                                          f"created there; choose another path"),
        (["--timeline-out", str(tmp_path / "adir")], f"--timeline-out {tmp_path / 'adir'}: is a folder; name a file, "
                                                     f"e.g. {tmp_path / 'adir' / 'timeline.json'}"),
    ]
    for argv, expected in cases:
        assert_one_line_error(argv, capsys, monkeypatch, tmp_path, expected)


# Class 4: data that does not fit the tokenizer.
def test_token_ids_beyond_the_vocab_are_refused_when_the_dataset_opens(data_copy, capsys, monkeypatch, tmp_path):
    import numpy as np

    prefix, _ = data_copy
    tokens = np.memmap(f"{prefix}.bin", dtype="<u2", mode="r+")
    tokens[123] = 600  # the tokenizer (and the .idx header) have 512 ids
    tokens.flush()
    del tokens
    assert_one_line_error(_tiny(data_copy), capsys, monkeypatch, tmp_path,
                          f"{prefix}.bin: token ids out of range: max id 600, but the vocabulary has 512 ids [0, 512) "
                          f"(d.idx); the tokens were not made with this tokenizer: rebuild it with "
                          f"tools/preprocess_data.py and the tokenizer the run uses")


def test_token_id_check_is_cached_beside_the_dataset(data_copy, monkeypatch):
    """One pass over the .bin the first time (P.ids.json), none the next time; a changed .bin is rescanned."""
    import json

    import numpy as np

    from megazero.data import indexed_dataset as ids

    prefix, _ = data_copy
    IndexedDataset = ids.IndexedDataset
    IndexedDataset(prefix)
    cached = json.loads(Path(f"{prefix}.ids.json").read_text())
    tokens = np.fromfile(f"{prefix}.bin", dtype="<u2")
    assert (cached["min_id"], cached["max_id"]) == (tokens.min(), tokens.max()) and tokens.max() < 512
    monkeypatch.setattr(ids, "_scan_ids", lambda tokens: pytest.fail("scanned again despite the cache"))
    IndexedDataset(prefix)
    monkeypatch.undo()
    tokens = np.memmap(f"{prefix}.bin", dtype="<u2", mode="r+")
    tokens[5] = 700
    tokens.flush()
    del tokens
    os.utime(f"{prefix}.bin", ns=(1, 1))  # a different mtime: the cache no longer matches
    with pytest.raises(Exception, match="max id 700"):
        IndexedDataset(prefix)


# Class 8: an output that cannot be written leaves nothing behind.
def test_preprocess_onto_a_full_disk_leaves_no_temporary(tiny_dataset, tmp_path):
    """tools/preprocess_data.py with a 64 KiB file-size limit (the .bin needs several times that): the
    write fails (EFBIG, as ENOSPC would) with data still buffered, so closing the temporary fails too;
    one line, exit 2, and the output folder is left empty."""
    import resource
    import signal

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 2**10, 64 * 2**10))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write with EFBIG instead of killing

    _, model = tiny_dataset
    text = tmp_path / "in.txt"
    text.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox jumps over the lazy dog. " * 12
                                for i in range(1000)), encoding="utf-8")
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(text),
                           "--output-prefix", str(out / "corpus"), "--tokenizer-model", str(model)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, preexec_fn=small_files)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error") or "Traceback" in line]
    assert lines == [f"error: {out / 'corpus.bin'}: cannot write the dataset (File too large); free space there or "
                     f"write the dataset elsewhere (nothing was left behind)"], proc.stderr
    assert list(out.iterdir()) == []


# Class 10: under torchrun the one line is also the failure summary's root cause.
def test_torchrun_summary_names_the_one_line_cause(tmp_path):
    """Rank 0 starts 2 s late (as on a busy machine): rank 1 finds the same bad flag first, and must not
    exit before rank 0 has printed the line (torchrun terminates the other workers when one exits)."""
    late = tmp_path / "rank0_late.py"
    late.write_text("import os, runpy, sys, time\n"
                    "if os.environ['RANK'] == '0':\n    time.sleep(2)\n"
                    f"sys.argv[0] = {str(REPO / 'pretrain_gpt.py')!r}\n"
                    "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(late), "--tp", "3"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=180)
    line = ("error: world size 2 is not divisible by tensor-parallel size 3 x pipeline-parallel size 1 = 3; launch "
            "a multiple of 3 processes or change --tp/--pp")
    err = proc.stderr
    assert proc.returncode != 0
    assert err.splitlines().count(line) == 1, err  # printed once, by rank 0
    root = err.split("Root Cause (first observed failure):", 1)[1]
    assert f"traceback : {line}" in root, err  # torchrun's summary names it ...
    assert "To enable traceback see" not in err  # ... instead of pointing at docs for a traceback
    assert err.count("Traceback (most recent call last)") == 1  # torchrun's own (the launcher), none from a worker
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank0_late.py"]


@pytest.mark.parametrize("flags,expected", [
    (["--vocab-size", "400", "--seed", "-1"], "--seed must be in [0, 4294967295], got -1"),
    (["--vocab-size", "400", "--tokenizer-max-chars", "0"], "--tokenizer-max-chars must be >= 1, got 0"),
])
def test_preprocess_numbers_out_of_range(flags, expected, tmp_path):
    text = tmp_path / "in.txt"
    text.write_text("a few words\n\nand a second document\n", encoding="utf-8")
    proc = subprocess.run([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(text),
                           "--output-prefix", str(tmp_path / "out" / "corpus"), *flags],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stderr) == (2, f"error: {expected}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]
