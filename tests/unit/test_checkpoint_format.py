"""The checkpoint format without a trainer: pieces written by one "layout" read back as any region,
the commit protocol (latest, keep-last, re-saving an iteration, a crash mid-commit), checksums, and the
--load resolution errors. Training-level save/load lives in tests/integration/test_checkpoint.py."""

import json

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


def test_load_resolution_errors(tmp_path):
    assert not fmt.has_checkpoint(tmp_path / "missing") and not fmt.has_checkpoint(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        fmt.resolve_checkpoint(tmp_path)
    (tmp_path / "iter_0000005").mkdir()
    with pytest.raises(CheckpointError, match="has iter_\\* folders but no 'latest'"):
        fmt.resolve_checkpoint(tmp_path)
    (tmp_path / "latest").write_text("iter_0000009\n")
    with pytest.raises(CheckpointError, match="names iter_0000009, which is missing or incomplete"):
        fmt.resolve_checkpoint(tmp_path)
    bad = tmp_path / "iter_0000005"
    (bad / "index.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CheckpointError, match="not a megazero-checkpoint v1 index"):
        CheckpointReader(bad)
