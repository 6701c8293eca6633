"""The checkpoint format without a trainer: pieces written by one "layout" read back as any region,
the commit protocol (latest, keep-last, re-saving an iteration, a crash mid-commit), checksums, and the
--load resolution rules and errors, a malformed index. Training-level save/load lives in tests/integration/test_checkpoint.py."""

import json
from pathlib import Path

import pytest
import torch

from megazero.checkpoint import format as fmt
from megazero.checkpoint.format import CheckpointError, CheckpointReader, Piece


def _save(folder, iteration, tensors_by_layout, keep_last=None):
    """Write `tensors_by_layout`: {rank: [(global name, full tensor, region start, stop, lo, hi)]} the
    way ranks would, then commit."""
    part = fmt.prepare_partial(folder, iteration)
    index = {"format": fmt.FORMAT_NAME, "version": fmt.FORMAT_VERSION, "tensors": {}, "files": {}}
    for rank, items in tensors_by_layout.items():
        tensors = {}
        for name, full, start, stop, lo, hi in items:
            region = full[tuple(slice(a, b) for a, b in zip(start, stop))].reshape(-1)
            key = f"{name}/{lo}"
            tensors[key] = region[lo:hi]
            entry = index["tensors"].setdefault(name, {"shape": list(full.shape), "dtype": "float32", "pieces": []})
            entry["pieces"].append(Piece(fmt.rank_filename(rank), key, start, stop, lo, hi).to_json())
        meta = fmt.write_rank_file(part, rank, tensors)
        index["files"][meta["name"]] = {"sha256": meta["sha256"], "bytes": meta["bytes"]}
    return fmt.commit(folder, iteration, index, keep_last)


def test_regions_read_back_from_any_saved_split(tmp_path):
    full = torch.randn(6, 10)
    # "tp 2 along dim 1" x "ZeRO flat ranges": rank 0 holds columns 0-4 elements [0, 17), rank 1 the rest
    # of that region, rank 2 the whole column 5-9 region
    layout = {0: [("model/w", full, (0, 0), (6, 5), 0, 17)],
              1: [("model/w", full, (0, 0), (6, 5), 17, 30)],
              2: [("model/w", full, (0, 5), (6, 10), 0, 30)]}
    reader = CheckpointReader(_save(tmp_path, 1, layout))
    assert torch.equal(reader.read("model/w", (0, 0), (6, 10)), full)
    assert torch.equal(reader.read("model/w", (2, 3), (5, 8)), full[2:5, 3:8])  # crosses both regions
    padded = reader.read("model/w", (4, 0), (8, 10))  # rows 6-7 lie past the logical shape: zeros
    assert torch.equal(padded[:2], full[4:6]) and not padded[2:].any()


def test_commit_latest_keep_last_and_resave(tmp_path):
    t = torch.arange(4.0)
    for it in (1, 2, 3):
        _save(tmp_path, it, {0: [("model/t", t * it, (0,), (4,), 0, 4)]}, keep_last=2)
    assert fmt.resolve_checkpoint(tmp_path).name == "iter_0000003"
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000002", "iter_0000003"]
    _save(tmp_path, 3, {0: [("model/t", t * 30, (0,), (4,), 0, 4)]}, keep_last=2)  # same iteration again
    assert torch.equal(CheckpointReader(fmt.resolve_checkpoint(tmp_path)).read("model/t", (0,), (4,)), t * 30)
    assert not list(tmp_path.glob("*.old")) and not list(tmp_path.glob("*.partial"))


def test_crash_during_commit_keeps_previous_checkpoint(tmp_path, monkeypatch):
    t = torch.arange(4.0)
    _save(tmp_path, 1, {0: [("model/t", t, (0,), (4,), 0, 4)]})
    real_replace = fmt.os.replace

    def crash_on_folder_rename(src, dst):
        if str(src).endswith(".partial"):
            raise KeyboardInterrupt("killed mid-commit")
        return real_replace(src, dst)

    monkeypatch.setattr(fmt.os, "replace", crash_on_folder_rename)
    with pytest.raises(KeyboardInterrupt):
        _save(tmp_path, 2, {0: [("model/t", t * 2, (0,), (4,), 0, 4)]})
    monkeypatch.undo()
    folder = fmt.resolve_checkpoint(tmp_path)
    assert folder.name == "iter_0000001" and (tmp_path / "iter_0000002.partial").exists()
    assert torch.equal(CheckpointReader(folder).read("model/t", (0,), (4,)), t)
    _save(tmp_path, 2, {0: [("model/t", t * 2, (0,), (4,), 0, 4)]})  # the next save replaces the leftover
    assert fmt.resolve_checkpoint(tmp_path).name == "iter_0000002"


def test_corrupted_or_truncated_file_is_named(tmp_path):
    folder = _save(tmp_path, 1, {0: [("model/t", torch.arange(64.0), (0,), (64,), 0, 64)]})
    shard = folder / fmt.rank_filename(0)
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0xFF
    shard.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=rf"{shard}: checksum mismatch"):
        CheckpointReader(folder).read("model/t", (0,), (64,))
    shard.write_bytes(bytes(raw[:-8]))
    with pytest.raises(CheckpointError, match=rf"{shard}: truncated"):
        CheckpointReader(folder).read("model/t", (0,), (64,))


def _committed(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "index.json").write_text("{}")
    return folder


def test_load_resolution_rules(tmp_path):
    """docs/checkpoints.md: what --load resolves to, and the one-line errors."""
    assert fmt.find_checkpoint(tmp_path / "missing") == (None, f"no checkpoint in {tmp_path / 'missing'}: starting "
                                                                f"from scratch")
    assert fmt.find_checkpoint(tmp_path)[0] is None  # empty
    (tmp_path / fmt.LOCK).write_text("{}")  # the run lock and an interrupted first save: still nothing
    (tmp_path / "iter_0000002.partial").mkdir()
    folder, note = fmt.find_checkpoint(tmp_path)
    assert folder is None and "only the interrupted save iter_0000002.partial" in note and "starting from scratch" in note
    with pytest.raises(CheckpointError, match="not a checkpoint folder .empty, or only interrupted saves"):
        fmt.resolve_checkpoint(tmp_path)
    assert fmt.remove_interrupted_saves(tmp_path) == [tmp_path / "iter_0000002.partial"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [fmt.LOCK]
    # no `latest` but complete iter_N folders (a first save interrupted between rename and `latest`)
    _committed(tmp_path / "iter_0000002")
    _committed(tmp_path / "iter_0000004")
    (tmp_path / "iter_0000006.partial").mkdir()
    folder, note = fmt.find_checkpoint(tmp_path)
    assert folder == tmp_path / "iter_0000004" and "resuming from the newest complete checkpoint iter_0000004" in note
    # `latest` wins, and must name a complete folder
    (tmp_path / "latest").write_text("iter_0000002\n")
    assert fmt.find_checkpoint(tmp_path) == (tmp_path / "iter_0000002", None)
    assert fmt.resolve_checkpoint(tmp_path / "iter_0000004") == tmp_path / "iter_0000004"
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(CheckpointError, match="names iter_0000009, which is missing or incomplete"):
        fmt.resolve_checkpoint(tmp_path)
    for garbage in (b"\xff\xfe\x00garbage", b"../../etc\n", b"iter_0000002\niter_0000004\n", b""):
        (tmp_path / "latest").write_bytes(garbage)
        with pytest.raises(CheckpointError, match="latest: corrupted: it must hold one checkpoint name like "
                                                  "iter_0000100"):
            fmt.find_checkpoint(tmp_path)
    # not checkpoints
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("hello")
    (other / "iter_0000005").mkdir()  # no index.json: not a checkpoint either
    with pytest.raises(CheckpointError, match="not a checkpoint folder .no 'latest' and no index.json; it holds "
                                              "iter_0000005, notes.txt"):
        fmt.find_checkpoint(other)
    with pytest.raises(CheckpointError, match="is a file, not a checkpoint folder"):
        fmt.find_checkpoint(other / "notes.txt")
    bad = tmp_path / "other" / "iter_0000005"
    (bad / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a megazero-checkpoint v1 index"):
        CheckpointReader(bad)
    (bad / "index.json").write_text(json.dumps({"format": "megazero-checkpoint", "version": 1, "iteration": "7",
                                                "tensors": {}, "files": []}))
    with pytest.raises(CheckpointError, match="malformed checkpoint index .missing or bad files.$"):
        CheckpointReader(bad)
    with pytest.raises(CheckpointError, match="malformed checkpoint index .missing or bad iteration, layout, config, "
                                              "state, files.$"):
        fmt.read_index(bad, resume=True)
    (bad / "index.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(CheckpointError, match="unreadable checkpoint index"):
        CheckpointReader(bad)


def test_save_lock(tmp_path):
    """One holder at a time (another process is refused, naming the holder); released on exit, by the
    kernel even on SIGKILL; a record left by a killed holder is explained, not an error."""
    import os
    import signal
    import subprocess
    import sys

    from megazero.checkpoint.lock import SaveLock

    save = tmp_path / "a" / "ckpt"
    try_lock = ("import sys; from megazero.checkpoint.lock import SaveLock\n"
                "try:\n    print(SaveLock(sys.argv[1]).acquire())\nexcept Exception as e:\n    print(e)\n")
    lock = SaveLock(save)
    assert lock.acquire() is None and (save / fmt.LOCK).is_file()
    other = subprocess.run([sys.executable, "-c", try_lock, str(save)], capture_output=True, text=True, timeout=60)
    assert other.stdout.startswith(f"--save {save} is in use by another run (pid {os.getpid()} on host "), other
    lock.release(remove_created_if_empty=True)
    assert not (tmp_path / "a").exists()  # the folders acquire() created, empty again
    holder = subprocess.Popen([sys.executable, "-c", try_lock + "import time; time.sleep(60)\n", str(save)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline() == "None\n"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    lock = SaveLock(save)
    note = lock.acquire()
    lock.release()
    assert note.startswith(f"{save / fmt.LOCK}: the previous run saving here (pid {holder.pid} on host ")
    assert note.endswith("ended without releasing it (killed or crashed; a torchrun restart looks like this too): "
                         "taking it over")
    file = save.parent / "file"
    file.write_text("x")
    with pytest.raises(CheckpointError, match="exists and is not a folder"):
        SaveLock(file).acquire()
